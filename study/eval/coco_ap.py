"""COCO mask AP through pycocotools itself (docs/paper.md section 7: the paper's numbers are pycocotools').

We only prepare the inputs so that pycocotools sees what it expects, and check them for readable errors:
- ground-truth annotation ids are renumbered from 1 when any is < 1 or repeated: pycocotools marks a
  detection matched by storing the GT id, so a GT id of 0 reads as "unmatched" (AP 0.981 instead of 1.0
  for the GT scored against itself on the panopticapi sample);
- ``iscrowd`` defaults to 0 and a missing ``area`` is the mask's pixel count (the GT's area decides the
  small / medium / large ranges);
- a result naming an image or category the GT lacks, or whose mask size differs from its image's, raises
  an :class:`EvalInputError` subclass naming the image and the id.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Optional

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from study.eval.errors import EvalInputError, SizeMismatchError, UnknownCategoryError, UnknownImageError

# pycocotools' 12 summary numbers, in the order of COCOeval.stats.
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _to_int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EvalInputError(f"{what} must be an integer, got {value!r}") from None


def segmentation_area(seg, h: int, w: int) -> float:
    """Pixel area of a COCO segmentation (polygons, uncompressed or compressed RLE)."""
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return float(mask_utils.area(rle))


def prepare_ground_truth(gt: dict) -> dict:
    """A copy of a COCO instance dict that pycocotools scores correctly (ids from 1, areas, crowd flags)."""
    gt = copy.deepcopy(gt)
    images = {}
    for im in gt.get("images", []):
        im["id"] = _to_int(im.get("id"), "image id")
        images[im["id"]] = im
    if not images:
        raise EvalInputError("the ground truth lists no images")
    if not gt.get("categories"):
        raise EvalInputError("the ground truth lists no categories")
    for c in gt["categories"]:
        c["id"] = _to_int(c.get("id"), "category id")
    anns = gt.setdefault("annotations", [])
    ids = [a.get("id") for a in anns]
    renumber = any(i is None or _to_int(i, "annotation id") < 1 for i in ids) or len(set(ids)) != len(ids)
    for k, a in enumerate(anns):
        a["image_id"] = _to_int(a["image_id"], "annotation image_id")
        a["category_id"] = _to_int(a["category_id"], "annotation category_id")
        a["id"] = k + 1 if renumber else _to_int(a["id"], "annotation id")
        a["iscrowd"] = _to_int(a.get("iscrowd", 0), "iscrowd")
        if isinstance(a.get("segmentation"), str):  # some exports keep the RLE dict as its repr string
            raise EvalInputError(f"annotation {a['id']} has a string segmentation; expected polygons or RLE")
        if "area" not in a:
            im = images[a["image_id"]]
            a["area"] = segmentation_area(a["segmentation"], im["height"], im["width"])
        a["area"] = float(a["area"])
        if "bbox" not in a:
            im = images[a["image_id"]]
            seg = a["segmentation"]
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, im["height"], im["width"])) \
                if isinstance(seg, list) else seg
            a["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
    return gt


def check_results(gt: dict, results: list[dict]) -> None:
    """Each result must name a GT image and category and carry a mask of its image's size."""
    images = {im["id"]: im for im in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    for r in results:
        for key in ("image_id", "category_id", "segmentation", "score"):
            if key not in r:
                raise EvalInputError(f"a result lacks '{key}': {str(r)[:120]}")
        im = images.get(r["image_id"])
        if im is None:
            raise UnknownImageError(f"a result names image id {r['image_id']}, absent from the ground truth")
        name = f"{im.get('file_name', '?')} (id {im['id']})"
        if r["category_id"] not in cats:
            raise UnknownCategoryError(f"image {name}: a result has category id {r['category_id']}, unknown to "
                                       f"the ground truth categories")
        size = r["segmentation"].get("size") if isinstance(r["segmentation"], dict) else None
        if size is not None and tuple(size) != (im["height"], im["width"]):
            raise SizeMismatchError(f"image {name}: a result mask is {size[1]}x{size[0]} (WxH), the image is "
                                    f"{im['width']}x{im['height']}")


def quiet_coco(dataset: dict) -> COCO:
    """A pycocotools COCO object from a dict, without its prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate_masks(gt: dict, results: list[dict], prepared: bool = False) -> dict:
    """Mask AP of COCO results (RLE masks) against a COCO instance dict, with pycocotools' COCOeval.

    Returns ``stats`` (the 12 summary numbers), each under its name (``AP``, ``AP50``, ...), the summary
    text, and ``per_class`` AP (IoU 0.50:0.95, all areas, 100 detections; NaN for a class without GT).
    """
    gt = gt if prepared else prepare_ground_truth(gt)
    check_results(gt, results)
    coco_gt = quiet_coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        else:  # loadRes cannot take an empty list; an empty result set scores 0
            coco_dt = quiet_coco({"images": gt["images"], "categories": gt["categories"], "annotations": []})
    ev = COCOeval(coco_gt, coco_dt, iouType="segm")
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    precision = ev.eval["precision"]  # (T iou thresholds, R recall points, K classes, A areas, M max dets)
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[int(cat_id)] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    out = {"stats": stats, **dict(zip(STAT_NAMES, stats)), "per_class": per_class, "summary": text.getvalue()}
    return out


def encode_mask(mask: np.ndarray) -> dict:
    """Bool (H, W) -> COCO compressed RLE with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def format_table(result: dict, categories: list[dict], per_class: bool = True) -> str:
    """Per-class AP and the 12 summary numbers, in percent."""
    names = {c["id"]: c.get("name", str(c["id"])) for c in categories}
    lines = []
    if per_class:
        lines.append(f"{'class':24s} {'AP':>6s}")
        for cid, ap in result["per_class"].items():
            if not np.isnan(ap):
                lines.append(f"{names.get(cid, str(cid))[:24]:24s} {100 * ap:6.2f}")
        lines.append("")
    lines.extend(f"{n:6s} {100 * v:6.2f}" if v >= 0 else f"{n:6s}    n/a" for n, v in zip(STAT_NAMES,
                                                                                            result["stats"]))
    return "\n".join(lines)


def results_from_ground_truth(gt: dict, score: Optional[float] = 1.0) -> list[dict]:
    """The non-crowd GT annotations as results (RLE masks): the perfect prediction, for tests and checks."""
    images = {im["id"]: im for im in gt["images"]}
    out = []
    for a in gt["annotations"]:
        if a.get("iscrowd", 0):
            continue
        im = images[a["image_id"]]
        seg = a["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, im["height"], im["width"])) \
            if isinstance(seg, list) else (mask_utils.frPyObjects(seg, im["height"], im["width"])
                                           if isinstance(seg.get("counts"), list) else dict(seg))
        if isinstance(rle["counts"], bytes):
            rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": rle,
                    "score": score})
    return out
