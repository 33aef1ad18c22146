"""PQ from files in the official COCO panoptic format (JSON + id-encoded PNGs), as ``study score panoptic``.

Same inputs as panopticapi's ``pq_compute(gt_json, pred_json, gt_folder, pred_folder)`` and the same
numbers (see :mod:`study.eval.pq`), with readable errors instead of panopticapi's bare ``KeyError`` /
``Exception`` and threads instead of a process pool (PNG decoding and numpy release the GIL).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from study.eval.errors import EvalInputError, MissingPredictionError, UnknownImageError
from study.eval.image_pool import accumulate
from study.eval.pq import PQAccumulator, check_categories


def read_json(path: str | os.PathLike, what: str, top: Optional[type | tuple] = None):
    """A JSON file's content; ``top`` (dict, list or both) is the type its top level must have."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{what} {path} does not exist")
    try:
        js = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{what} {path} is not valid JSON: {e}") from None
    if top is not None and not isinstance(js, top):
        kinds = top if isinstance(top, tuple) else (top,)
        want = " or ".join({dict: "an object", list: "a list"}[k] for k in kinds)
        raise EvalInputError(f"{what} {path} holds a JSON {type(js).__name__}; expected {want}")
    return js


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_annotations(js: dict, where: str, what: str) -> list[dict]:
    """The ``annotations`` of a panoptic JSON, each with an integer ``image_id``, a ``file_name`` and a
    ``segments_info`` list of segments with integer ``id`` and ``category_id``; every image id once, every
    segment id once per image. A repeat is an error: panopticapi would keep the last entry (or score the
    image twice), which gives a wrong PQ that looks right."""
    anns = js.get("annotations")
    if not isinstance(anns, list):
        raise EvalInputError(f"{what} {where} has no 'annotations' list")
    seen: dict = {}
    for k, a in enumerate(anns):
        if not isinstance(a, dict):
            raise EvalInputError(f"{what} {where}: annotation {k} is a JSON {type(a).__name__}, not an object")
        for key in ("image_id", "file_name", "segments_info"):
            if key not in a:
                raise EvalInputError(f"{what} {where}: annotation {k} (image id {a.get('image_id', '?')}) lacks "
                                     f"'{key}'")
        image = a["image_id"]
        if not isinstance(image, (int, str)) or isinstance(image, bool):
            raise EvalInputError(f"{what} {where}: annotation {k} has image_id {image!r}; expected an integer "
                                 f"(or a string)")
        if image in seen:
            raise EvalInputError(f"{what} {where}: image id {image} has two annotations (entries {seen[image]} "
                                 f"and {k}, field 'image_id'); each image needs exactly one")
        seen[image] = k
        if not isinstance(a["segments_info"], list):
            raise EvalInputError(f"{what} {where}: image id {image}: 'segments_info' must be a list")
        ids = set()
        for j, s in enumerate(a["segments_info"]):
            if not isinstance(s, dict):
                raise EvalInputError(f"{what} {where}: image id {image}: segments_info[{j}] is not an object")
            for key in ("id", "category_id"):
                if not _is_int(s.get(key)):
                    raise EvalInputError(f"{what} {where}: image id {image}: segments_info[{j}] field '{key}' must "
                                         f"be an integer, got {s.get(key)!r:.40}")
            if s["id"] in ids:
                raise EvalInputError(f"{what} {where}: image id {image}: segment id {s['id']} is listed twice "
                                     f"(field 'id')")
            ids.add(s["id"])
    return anns


def read_id_png(path: Path, image: str, what: str) -> np.ndarray:
    """An id-encoded panoptic PNG -> (H, W) uint32 ids R + 256 G + 256^2 B; a missing or corrupt file names
    the image. Pillow keeps RGB pixels as 4 bytes (RGBX), so the ids are that buffer read as little-endian
    32-bit words with the fourth byte masked off: no (H, W, 3) array and no arithmetic per channel."""
    if not path.is_file():
        raise EvalInputError(f"image {image}: {what} PNG {path} does not exist")
    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                im = im.convert("RGB")
            words = np.frombuffer(im.tobytes("raw", "RGBX"), "<u4").reshape(im.height, im.width)
    except OSError as e:
        raise EvalInputError(f"image {image}: cannot read {what} PNG {path}: {e}") from None
    return words & np.uint32(0xFFFFFF)


def _image_name(ann: dict) -> str:
    return f"{ann.get('file_name', '?')} (id {ann['image_id']})"


def pair_annotations(gt_json: dict, pred_json: dict, gt_where: str, pred_where: str) -> list[tuple[dict, dict]]:
    """Pair every GT annotation with its prediction by ``image_id``; a GT image without prediction, or a
    prediction for an image the GT does not have, is an error naming the image."""
    preds = {a["image_id"]: a for a in check_annotations(pred_json, pred_where, "prediction JSON")}
    gt_anns = check_annotations(gt_json, gt_where, "ground-truth JSON")
    gt_ids = {a["image_id"] for a in gt_anns}
    extra = [i for i in preds if i not in gt_ids]
    if extra:
        raise UnknownImageError(f"prediction JSON {pred_where} has image id(s) {extra[:5]} that the ground "
                                f"truth {gt_where} does not have")
    pairs = []
    for g in gt_anns:
        p = preds.get(g["image_id"])
        if p is None:
            raise MissingPredictionError(f"image {_image_name(g)} of the ground truth {gt_where} has no "
                                         f"prediction in {pred_where}")
        pairs.append((g, p))
    return pairs


def score_pairs(pairs: list[tuple[dict, dict]], categories: list[dict], gt_dir: Path, pred_dir: Path,
                workers: int = 1) -> PQAccumulator:
    """Accumulate PQ statistics over (GT annotation, prediction annotation) pairs read from the folders, in
    ``workers`` threads (0: all cores; :func:`study.eval.image_pool.accumulate`)."""

    def one(pair: tuple[dict, dict], acc: PQAccumulator) -> None:
        g, p = pair
        name = _image_name(g)
        gt = read_id_png(gt_dir / g["file_name"], name, "ground-truth")
        pred = read_id_png(pred_dir / p["file_name"], name, "prediction")
        acc.add(gt, g["segments_info"], pred, p["segments_info"], image=name)

    return accumulate(pairs, one, lambda: PQAccumulator(categories), PQAccumulator.merge, workers)


def score_panoptic_files(gt_json: str | os.PathLike, pred_json: str | os.PathLike,
                         gt_dir: Optional[str | os.PathLike] = None, pred_dir: Optional[str | os.PathLike] = None,
                         workers: int = 0, categories_json: Optional[str | os.PathLike] = None) -> dict:
    """PQ of a COCO panoptic prediction (JSON + PNG folder) against the GT; folders default to the JSON
    path without ``.json`` (panopticapi's default). The categories come from the GT JSON, or from
    ``categories_json`` (a list, or a dict with ``categories``) when the GT keeps them in a separate file
    (panopticapi's sample does). ``workers``: threads, 0 = all cores. Returns :meth:`PQAccumulator.summary`."""
    gt = read_json(gt_json, "ground-truth JSON", dict)
    pred = read_json(pred_json, "prediction JSON", dict)
    gt_dir = Path(gt_dir) if gt_dir is not None else Path(str(gt_json)[:-len(".json")])
    pred_dir = Path(pred_dir) if pred_dir is not None else Path(str(pred_json)[:-len(".json")])
    for d, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not d.is_dir():
            raise EvalInputError(f"{what} PNG folder {d} does not exist")
    if categories_json is not None:
        cats = read_json(categories_json, "categories JSON", (dict, list))
        categories = check_categories(cats.get("categories") if isinstance(cats, dict) else cats,
                                      str(categories_json))
    else:
        categories = check_categories(gt.get("categories"), str(gt_json))
    pairs = pair_annotations(gt, pred, str(gt_json), str(pred_json))
    result = score_pairs(pairs, categories, gt_dir, pred_dir, workers).summary()
    result["categories"] = categories
    return result
