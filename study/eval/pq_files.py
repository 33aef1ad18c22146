"""PQ from files in the official COCO panoptic format (JSON + id-encoded PNGs), as ``study score panoptic``.

Same inputs as panopticapi's ``pq_compute(gt_json, pred_json, gt_folder, pred_folder)`` and the same
numbers (see :mod:`study.eval.pq`), with readable errors instead of panopticapi's bare ``KeyError`` /
``Exception`` and optional threads instead of a process pool (PNG decoding and numpy release the GIL).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from study.eval.errors import EvalInputError, MissingPredictionError, UnknownImageError
from study.eval.pq import PQAccumulator, check_categories, rgb_to_id


def read_json(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{what} {path} is not valid JSON: {e}") from None


def read_id_png(path: Path, image: str, what: str) -> np.ndarray:
    """An id-encoded panoptic PNG -> (H, W) int64 ids; a missing or corrupt file names the image."""
    if not path.is_file():
        raise EvalInputError(f"image {image}: {what} PNG {path} does not exist")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # (H, W, 3) uint8
    except OSError as e:
        raise EvalInputError(f"image {image}: cannot read {what} PNG {path}: {e}") from None
    return rgb_to_id(rgb)


def _image_name(ann: dict) -> str:
    return f"{ann.get('file_name', '?')} (id {ann['image_id']})"


def pair_annotations(gt_json: dict, pred_json: dict, gt_where: str, pred_where: str) -> list[tuple[dict, dict]]:
    """Pair every GT annotation with its prediction by ``image_id``; a GT image without prediction, or a
    prediction for an image the GT does not have, is an error naming the image."""
    if "annotations" not in pred_json:
        raise EvalInputError(f"prediction JSON {pred_where} has no 'annotations' list")
    preds = {}
    for a in pred_json["annotations"]:
        if "image_id" not in a or "segments_info" not in a or "file_name" not in a:
            raise EvalInputError(f"prediction JSON {pred_where}: an annotation lacks image_id, file_name or "
                                 f"segments_info: {str(a)[:120]}")
        preds[a["image_id"]] = a
    gt_ids = {a["image_id"] for a in gt_json.get("annotations", [])}
    extra = [i for i in preds if i not in gt_ids]
    if extra:
        raise UnknownImageError(f"prediction JSON {pred_where} has image id(s) {extra[:5]} that the ground "
                                f"truth {gt_where} does not have")
    pairs = []
    for g in gt_json.get("annotations", []):
        p = preds.get(g["image_id"])
        if p is None:
            raise MissingPredictionError(f"image {_image_name(g)} of the ground truth {gt_where} has no "
                                         f"prediction in {pred_where}")
        pairs.append((g, p))
    return pairs


def score_pairs(pairs: list[tuple[dict, dict]], categories: list[dict], gt_dir: Path, pred_dir: Path,
                workers: int = 1) -> PQAccumulator:
    """Accumulate PQ statistics over (GT annotation, prediction annotation) pairs read from the folders."""

    def one(pair_list) -> PQAccumulator:
        acc = PQAccumulator(categories)
        for g, p in pair_list:
            name = _image_name(g)
            gt = read_id_png(gt_dir / g["file_name"], name, "ground-truth")
            pred = read_id_png(pred_dir / p["file_name"], name, "prediction")
            acc.add(gt, g["segments_info"], pred, p["segments_info"], image=name)
        return acc

    if workers <= 1 or len(pairs) < 2:
        return one(pairs)
    chunks = [pairs[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(one, chunks))
    total = PQAccumulator(categories)
    for part in parts:
        total.merge(part)
    return total


def score_panoptic_files(gt_json: str | os.PathLike, pred_json: str | os.PathLike,
                         gt_dir: Optional[str | os.PathLike] = None, pred_dir: Optional[str | os.PathLike] = None,
                         workers: int = 1, categories_json: Optional[str | os.PathLike] = None) -> dict:
    """PQ of a COCO panoptic prediction (JSON + PNG folder) against the GT; folders default to the JSON
    path without ``.json`` (panopticapi's default). The categories come from the GT JSON, or from
    ``categories_json`` (a list, or a dict with ``categories``) when the GT keeps them in a separate file
    (panopticapi's sample does). Returns :meth:`PQAccumulator.summary`."""
    gt = read_json(gt_json, "ground-truth JSON")
    pred = read_json(pred_json, "prediction JSON")
    gt_dir = Path(gt_dir) if gt_dir is not None else Path(str(gt_json)[:-len(".json")])
    pred_dir = Path(pred_dir) if pred_dir is not None else Path(str(pred_json)[:-len(".json")])
    for d, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not d.is_dir():
            raise EvalInputError(f"{what} PNG folder {d} does not exist")
    if categories_json is not None:
        cats = read_json(categories_json, "categories JSON")
        categories = check_categories(cats.get("categories") if isinstance(cats, dict) else cats,
                                      str(categories_json))
    else:
        categories = check_categories(gt.get("categories"), str(gt_json))
    pairs = pair_annotations(gt, pred, str(gt_json), str(pred_json))
    result = score_pairs(pairs, categories, gt_dir, pred_dir, workers).summary()
    result["categories"] = categories
    return result
