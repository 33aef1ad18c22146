"""COCO mask AP (docs/paper.md section 7: the paper's numbers are pycocotools'), through an engine of
study/eval/engines.py: hotcoco by default, pycocotools' own COCOeval or faster-coco-eval on request, all equal
to pycocotools to 1e-9 (tests/test_engines_parity.py).

We prepare the inputs so that every engine sees what pycocotools expects, and check them for readable errors:
- ground-truth annotation ids are renumbered from 1 when any is < 1 or repeated: pycocotools marks a
  detection matched by storing the GT id, so a GT id of 0 reads as "unmatched" (AP 0.981 instead of 1.0
  for the GT scored against itself on the panopticapi sample);
- ``iscrowd`` defaults to 0 and must be 0 or 1 (study/coco_format.py, the rule of every reader); a missing
  ``area`` is the mask's pixel count (the GT's area decides the small / medium / large ranges);
- a result naming an image or category the GT lacks, or whose mask size differs from its image's, raises
  an :class:`EvalInputError` subclass naming the image and the id;
- ids must be integers and scores finite numbers (pycocotools sorts NaN scores anyhow: all-NaN scores give
  AP 100), and every RLE is decoded in Python first (:mod:`study.data.rle`): pycocotools loops forever on
  run lengths that do not add up to the mask's size;
- pycocotools' COCOeval runs in a forked child process with a time limit (:func:`evaluate_masks`'
  ``timeout_s``), so that a native call that hangs ends in an error instead of a stuck job; the other
  engines run in this process.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import multiprocessing
import sys
from numbers import Integral, Real
from typing import Optional

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from study.coco_format import crowd_flag
from study.eval.strict import segmentation_ok_fast
from study.eval.errors import (EvalInputError, EvalTimeoutError, SizeMismatchError, UnknownCategoryError,
                               UnknownImageError)

# pycocotools' 12 summary numbers, in the order of COCOeval.stats.
from study.eval.engines import STAT_NAMES  # noqa: E402  (pycocotools' 12 summary numbers, in order)


def _to_int(value, what: str) -> int:
    """An integer id; a float (even 3.0), a string or a bool is refused, never rounded or parsed."""
    if type(value) is int:  # the common case, without the ABC check
        return value
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    raise EvalInputError(f"{what} must be an integer, got {value!r:.60}")


def _compressed(seg, h: int, w: int) -> dict:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as one compressed RLE."""
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg.get("counts"), list):
        return mask_utils.frPyObjects(seg, h, w)
    return seg


def segmentation_area(seg, h: int, w: int) -> float:
    """Pixel area of a COCO segmentation (polygons, uncompressed or compressed RLE)."""
    return float(mask_utils.area(_compressed(seg, h, w)))


def prepare_ground_truth(gt: dict) -> dict:
    """A copy of a COCO instance dict that pycocotools scores correctly (ids from 1, areas, crowd flags)."""
    if not isinstance(gt, dict):
        raise EvalInputError(f"the ground truth must be a COCO object with images, annotations and categories, "
                             f"not a {type(gt).__name__}")
    # A copy of every object this function changes (images, categories, annotations), not of their
    # segmentations, which it only reads: a deep copy of COCO's polygons costs more than scoring them.
    gt = {**gt, "images": [dict(im) if isinstance(im, dict) else im for im in gt.get("images") or []],
          "categories": [dict(c) if isinstance(c, dict) else c for c in gt.get("categories") or []],
          "annotations": [dict(a) if isinstance(a, dict) else a for a in gt.get("annotations") or []]}
    images = {}
    for k, im in enumerate(gt.get("images") or []):
        if not isinstance(im, dict):
            raise EvalInputError(f"ground-truth images[{k}] is not an object")
        im["id"] = _to_int(im.get("id"), f"ground-truth images[{k}] field 'id'")
        if im["id"] in images:
            raise EvalInputError(f"the ground truth lists image id {im['id']} twice (field 'id')")
        for key in ("height", "width"):
            im[key] = _to_int(im.get(key), f"ground-truth image id {im['id']} field '{key}'")
        images[im["id"]] = im
    if not images:
        raise EvalInputError("the ground truth lists no images")
    if not gt.get("categories"):
        raise EvalInputError("the ground truth lists no categories")
    seen = set()
    for k, c in enumerate(gt["categories"]):
        c["id"] = _to_int(c.get("id"), f"ground-truth categories[{k}] field 'id'")
        if c["id"] in seen:
            raise EvalInputError(f"the ground truth lists category id {c['id']} twice (field 'id')")
        seen.add(c["id"])
    anns = gt.setdefault("annotations", [])
    ids = [a.get("id") for a in anns]
    renumber = any(i is None or _to_int(i, "annotation id") < 1 for i in ids) or len(set(ids)) != len(ids)
    for k, a in enumerate(anns):
        what = f"ground-truth annotation {a.get('id', k)}"
        a["image_id"] = _to_int(a.get("image_id"), f"{what} field 'image_id'")
        a["category_id"] = _to_int(a.get("category_id"), f"{what} (image id {a['image_id']}) field 'category_id'")
        a["id"] = k + 1 if renumber else _to_int(a["id"], "annotation id")
        a["iscrowd"] = int(crowd_flag(a, what, EvalInputError))  # the one rule of every reader (0 or 1)
        if isinstance(a.get("segmentation"), str):  # some exports keep the RLE dict as its repr string
            raise EvalInputError(f"annotation {a['id']} has a string segmentation; expected polygons or RLE")
        im = images.get(a["image_id"])
        if im is None:
            raise UnknownImageError(f"{what} names image id {a['image_id']}, absent from the ground truth's images")
        if a["category_id"] not in seen:
            raise UnknownCategoryError(f"{what} (image id {a['image_id']}) has category id {a['category_id']}, "
                                       f"absent from the ground truth's categories")
        seg = a.get("segmentation")
        if not segmentation_ok_fast(seg, im["height"], im["width"]):  # else the exact check, for its message
            from study.data.rle import RLEError, check_segmentation

            try:
                check_segmentation(seg, im["height"], im["width"], values=False)
            except RLEError as e:
                raise EvalInputError(f"{what} (image id {a['image_id']}) field 'segmentation': {e}") from None
        if "area" not in a:
            im = images[a["image_id"]]
            a["area"] = segmentation_area(a["segmentation"], im["height"], im["width"])
        a["area"] = float(a["area"])
        if "bbox" not in a:
            im = images[a["image_id"]]
            rle = _compressed(a["segmentation"], im["height"], im["width"])  # uncompressed RLE too (was a TypeError)
            a["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
    return gt


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer too large for a float (10**400)
        return False


def check_results(gt: dict, results: list[dict], where: str = "the results") -> None:
    """Each result must name a GT image and category (integers), carry a finite numeric score and a
    well-formed RLE mask of its image's size. ``where`` names the results (their file) in messages."""
    images = {im["id"]: im for im in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    if not isinstance(results, list):
        raise EvalInputError(f"{where} must be a list of COCO results, not a {type(results).__name__}")
    for k, r in enumerate(results):
        if not isinstance(r, dict):
            raise EvalInputError(f"{where}: result {k} is a {type(r).__name__}, not an object")
        for key in ("image_id", "category_id", "segmentation", "score"):
            if key not in r:
                raise EvalInputError(f"{where}: result {k} (image id {r.get('image_id', '?')}) lacks '{key}'")
        image_id = _to_int(r["image_id"], f"{where}: result {k} field 'image_id'")
        im = images.get(image_id)
        if im is None:
            raise UnknownImageError(f"{where}: result {k} names image id {image_id}, absent from the ground truth")
        name = f"{im.get('file_name', '?')} (id {im['id']})"
        cid = _to_int(r["category_id"], f"{where}: image {name}, result {k} field 'category_id'")
        if cid not in cats:
            raise UnknownCategoryError(f"{where}: image {name}: result {k} has category id {cid}, unknown to "
                                       f"the ground truth categories")
        score = r["score"]
        if not isinstance(score, Real) or isinstance(score, bool) or not _finite(score):
            raise EvalInputError(f"{where}: image {name}: result {k} field 'score' is {score!r:.40}; expected a "
                                 f"finite number")
        seg = r["segmentation"]
        if not isinstance(seg, dict):
            raise EvalInputError(f"{where}: image {name}: result {k} field 'segmentation' must be an RLE "
                                 f"object (size, counts), not a {type(seg).__name__}")
        size = seg.get("size")
        if isinstance(size, (list, tuple)) and len(size) == 2 and tuple(size) != (im["height"], im["width"]):
            raise SizeMismatchError(f"{where}: image {name}: result {k} mask is {size[1]}x{size[0]} (WxH), the "
                                    f"image is {im['width']}x{im['height']}")
        from study.data.rle import RLEError, check_segmentation

        try:
            check_segmentation(seg, im["height"], im["width"])
        except RLEError as e:
            raise EvalInputError(f"{where}: image {name}: result {k} field 'segmentation' is malformed: {e}") \
                from None


def quiet_coco(dataset: dict) -> COCO:
    """A pycocotools COCO object from a dict, without its prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# COCOeval's time limit: a fixed allowance plus a per-item one, far above what a sound input needs
# (COCO val2017, 5000 images x 100 results, takes about a minute per core). Our choice; the paper is silent.
TIMEOUT_BASE_S = 600.0
TIMEOUT_PER_ITEM_S = 0.005


def default_timeout(gt: dict, results: list) -> float:
    return TIMEOUT_BASE_S + TIMEOUT_PER_ITEM_S * (len(results) + len(gt.get("annotations", [])))


def cocoeval_pycocotools(gt: dict, results: list[dict], thresholds=None) -> dict:
    """pycocotools' COCOeval (segm) on a prepared GT and checked results."""
    coco_gt = quiet_coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        else:  # loadRes cannot take an empty list; an empty result set scores 0
            coco_dt = quiet_coco({"images": gt["images"], "categories": gt["categories"], "annotations": []})
    ev = COCOeval(coco_gt, coco_dt, iouType="segm")
    if thresholds is not None:
        ev.params.iouThrs, ev.params.recThrs = (np.array(t, np.float64) for t in thresholds)
    from study.eval.engines import run_cocoeval

    return run_cocoeval(ev, "catIds")


def _child(conn, fn, args) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # sent back and raised in the parent with its type and text
        import traceback

        conn.send(("error", (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        conn.close()


def run_with_time_limit(fn, args: tuple, timeout_s: Optional[float], what: str):
    """``fn(*args)`` in a forked child process, killed after ``timeout_s`` seconds (None: no limit, run here).

    The child shares the parent's memory copy-on-write, so nothing is pickled on the way in and only the
    small result on the way out. Without ``fork`` (not Linux / macOS), or in a daemonic process (which
    may not start children), it runs in this process, unlimited.
    """
    if (timeout_s is None or "fork" not in multiprocessing.get_all_start_methods()
            or multiprocessing.current_process().daemon):
        return fn(*args)
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args), daemon=True)
    sys.stdout.flush()
    sys.stderr.flush()
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            raise EvalTimeoutError(f"{what} ran past its time limit of {timeout_s:.0f} s and was stopped; the "
                                   f"input is inconsistent in a way the checks did not catch (raise the limit "
                                   f"with timeout_s if it is just very large)")
        try:
            status, value = recv.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"{what} died in its child process (exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        recv.close()
    if status == "error":
        name, text, tb = value
        raise RuntimeError(f"{what} failed in its child process: {name}: {text}\n{tb}")
    return value


def evaluate_masks(gt: dict, results: list[dict], prepared: bool = False, timeout_s: Optional[float] = -1.0,
                   where: str = "the results", engine: str = "hotcoco", thresholds=None) -> dict:
    """Mask AP of COCO results (RLE masks) against a COCO instance dict, with ``engine`` (engines.py).

    Returns ``stats`` (the 12 summary numbers), each under its name (``AP``, ``AP50``, ...), the summary
    text, and ``per_class`` AP (IoU 0.50:0.95, all areas, 100 detections; NaN for a class without GT).
    With ``engine="pycocotools"`` COCOeval runs in a child process stopped after ``timeout_s`` seconds (-1:
    :func:`default_timeout`; None: in this process, no limit); the other engines run here. ``where`` names the
    results (e.g. their file) in error messages.
    """
    from study.eval.engines import ap_engine
    from study.eval.strict import results_ok_fast

    score = ap_engine(engine) or cocoeval_pycocotools
    gt = gt if prepared else prepare_ground_truth(gt)
    if not isinstance(results, list) or not results_ok_fast(gt, results):
        check_results(gt, results, where)  # the exact check: it names what is wrong (or accepts after all)
    if engine == "pycocotools":  # the one engine that can hang: in a child process with a time limit
        limit = default_timeout(gt, results) if timeout_s is not None and timeout_s < 0 else timeout_s
        out = run_with_time_limit(score, (gt, results, thresholds), limit, "COCOeval")
    else:
        out = score(gt, results, thresholds)
    stats = out["stats"]
    return {"stats": stats, **dict(zip(STAT_NAMES, stats)), "per_class": out["per_class"],
            "summary": out["summary"], "engine": engine}


def score_instance_files(gt_json, pred_json, timeout_s: Optional[float] = -1.0, engine: str = "hotcoco") -> dict:
    """:func:`evaluate_masks` of a COCO results file (a list; a dict's ``annotations`` is taken) against a
    COCO instance ground-truth file; errors name the files. Adds ``categories`` (the GT's)."""
    from study.eval.pq_files import read_json

    gt = read_json(gt_json, "ground-truth JSON", dict)
    pred = read_json(pred_json, "prediction JSON", (dict, list))
    if isinstance(pred, dict):
        if not isinstance(pred.get("annotations"), list):
            raise EvalInputError(f"prediction JSON {pred_json} must hold a list of COCO results")
        pred = pred["annotations"]
    try:
        gt_ready = prepare_ground_truth(gt)
    except EvalInputError as e:
        raise type(e)(f"ground-truth JSON {gt_json}: {e}") from None
    result = evaluate_masks(gt_ready, pred, prepared=True, timeout_s=timeout_s, where=f"prediction JSON {pred_json}",
                            engine=engine)
    result["categories"] = gt_ready["categories"]
    return result


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
