"""PQ from files in the official COCO panoptic format (JSON + id-encoded PNGs), as ``study score panoptic``.

Same inputs as panopticapi's ``pq_compute(gt_json, pred_json, gt_folder, pred_folder)`` and the same
numbers (see :mod:`study.eval.pq`), with readable errors instead of panopticapi's bare ``KeyError`` /
``Exception`` and threads instead of a process pool (PNG decoding and numpy release the GIL).
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from study.coco_format import crowd_flag
from study.eval.errors import EvalInputError, MissingPredictionError, UnknownCategoryError, UnknownImageError
from study.eval.image_pool import accumulate, check_workers
from study.eval.pq import PQAccumulator, check_categories, is_int


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
                if type(s.get(key)) is not int and not is_int(s.get(key)):  # the ABC check only off the fast path
                    raise EvalInputError(f"{what} {where}: image id {image}: segments_info[{j}] field '{key}' must "
                                         f"be an integer, got {s.get(key)!r:.40}")
            if s["id"] in ids:
                raise EvalInputError(f"{what} {where}: image id {image}: segment id {s['id']} is listed twice "
                                     f"(field 'id')")
            ids.add(s["id"])
            if what.startswith("ground"):  # panopticapi ignores a prediction's crowd flags
                check_crowd_flag(s, f"{what} {where}: image id {image} segment {s['id']}")
    return anns


def check_crowd_flag(segment: dict, where: str) -> None:
    """``iscrowd`` absent, 0 or 1: the rule every reader shares (study/coco_format.py ``crowd_flag``)."""
    crowd_flag(segment, where, EvalInputError)


def annotations_by_image(json_path: str | os.PathLike) -> dict:
    """The one reader of a ground-truth panoptic JSON for scoring, shared by ``study score`` and ``study eval``:
    :func:`check_annotations` (crowd flags 0 / 1 only, ids once), then ``{image_id: annotation}``."""
    js = read_json(json_path, "ground-truth JSON", dict)
    return {a["image_id"]: a for a in check_annotations(js, str(json_path), "ground-truth JSON")}


def listed_but_not_drawn(ann: dict, drawn_ids) -> list[dict]:
    """The segments an annotation lists whose ids are not in ``drawn_ids``, as panopticapi scores them: with
    the JSON's area (0 when absent), so an uncrowded one is a false negative in eval as in score."""
    drawn = set(drawn_ids)
    return [{"id": s["id"], "category_id": s["category_id"], "iscrowd": int(s.get("iscrowd", 0)),
             "area": s.get("area", 0)} for s in ann["segments_info"] if s["id"] not in drawn]


ID_MASK = 0xFFFFFF  # the id bits of a word of read_id_words: R + 256 G + 256^2 B


class _ArrowSchema(ctypes.Structure):
    pass


class _ArrowArray(ctypes.Structure):
    pass


# The Arrow C data interface's structs (a stable ABI, arrow.apache.org/docs/format/CDataInterface.html).
_ArrowSchema._fields_ = [("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p),
                         ("flags", ctypes.c_int64), ("n_children", ctypes.c_int64),
                         ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
                         ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
                         ("private_data", ctypes.c_void_p)]
_ArrowArray._fields_ = [("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
                        ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64),
                        ("buffers", ctypes.POINTER(ctypes.c_void_p)),
                        ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
                        ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
                        ("private_data", ctypes.c_void_p)]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


class _PillowPixels:
    """Numpy's view of a loaded RGB image's pixel block (4 bytes a pixel), exported through Pillow's Arrow
    interface (Pillow >= 11.2) without a copy; it keeps the image and the export alive as the array's base."""

    def __init__(self, im: Image.Image):
        capsules = im.__arrow_c_array__()
        schema = _ArrowSchema.from_address(_capsule_pointer(capsules[0], b"arrow_schema"))
        array = _ArrowArray.from_address(_capsule_pointer(capsules[1], b"arrow_array"))
        n = im.width * im.height
        # One row of 4 uint8 per pixel ("+w:4" of "C"), one block, no offsets or nulls; else not used.
        if not (schema.format == b"+w:4" and schema.n_children == 1 and schema.children[0].contents.format == b"C"
                and array.length == n and array.offset == 0 and array.null_count == 0 and array.n_children == 1):
            raise ValueError("unexpected Arrow layout")
        child = array.children[0].contents
        if not (child.length == 4 * n and child.offset == 0 and child.n_buffers == 2 and child.buffers[1]):
            raise ValueError("unexpected Arrow layout")
        self._keep = (im.im, capsules)  # the core image that owns the block, alive after im.close()
        self.__array_interface__ = {"shape": (im.height, im.width), "typestr": "<u4",
                                    "data": (child.buffers[1], True), "version": 3}


def read_id_words(path: Path, image: str, what: str) -> np.ndarray:
    """An id-encoded panoptic PNG -> (H, W) uint32 words whose low 24 bits are the ids R + 256 G + 256^2 B
    (``& ID_MASK``; the high byte is padding). Pillow keeps RGB pixels as 4 bytes (RGBX), so this is that
    block read as little-endian words: no (H, W, 3) array, no arithmetic per pixel, and, where Pillow
    exports it through its Arrow interface, no copy (else one, ``tobytes``). A missing or corrupt file
    names the image."""
    if not path.is_file():
        raise EvalInputError(f"image {image}: {what} PNG {path} does not exist")
    try:
        with Image.open(path) as f:
            f.load()
            if f.mode not in ("RGB", "RGBA", "P"):  # 16-bit or grayscale: ids would be read wrong
                from study.eval.png_header import describe_png

                raise EvalInputError(f"image {image}: {what} PNG {path} is {describe_png(path)}; the COCO "
                                     f"panoptic format needs 8-bit RGB, the segment id = R + 256 G + 256^2 B")
            im = f if f.mode == "RGB" else f.convert("RGB")
            # A PNG's pixels are decoded into memory Pillow owns (never a map of the file).
            if f.format == "PNG" and hasattr(im, "__arrow_c_array__"):
                try:
                    return np.asarray(_PillowPixels(im))
                except ValueError:  # an image in several blocks, or another layout: the copy below
                    pass
            return np.frombuffer(im.tobytes("raw", "RGBX"), "<u4").reshape(im.height, im.width)
    except OSError as e:
        raise EvalInputError(f"image {image}: cannot read {what} PNG {path}: {e}") from None


def read_id_png(path: Path, image: str, what: str) -> np.ndarray:
    """An id-encoded panoptic PNG -> (H, W) uint32 ids (:func:`read_id_words` masked)."""
    return read_id_words(path, image, what) & np.uint32(ID_MASK)


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
        gt = read_id_words(gt_dir / g["file_name"], name, "ground-truth")
        pred = read_id_words(pred_dir / p["file_name"], name, "prediction")
        acc.add(gt, g["segments_info"], pred, p["segments_info"], image=name, id_mask=ID_MASK)

    return accumulate(pairs, one, lambda: PQAccumulator(categories), PQAccumulator.merge, workers)


def score_panoptic_files(gt_json: str | os.PathLike, pred_json: str | os.PathLike,
                         gt_dir: Optional[str | os.PathLike] = None, pred_dir: Optional[str | os.PathLike] = None,
                         workers: int = 0, categories_json: Optional[str | os.PathLike] = None,
                         engine: str = "hotcoco", gt: Optional[dict] = None) -> dict:
    """PQ of a COCO panoptic prediction (JSON + PNG folder) against the GT; folders default to the JSON
    path without ``.json`` (panopticapi's default). The categories come from the GT JSON, or from
    ``categories_json`` (a list, or a dict with ``categories``) when the GT keeps them in a separate file
    (panopticapi's sample does). ``engine``: :data:`study.eval.engines.PQ_ENGINES` (hotcoco by default);
    ``workers``: threads of the ``ours`` engine, 0 = all cores. ``gt``: the GT JSON's content when the
    caller has it already (``gt_json`` then only names it). Our JSON checks run first whatever the engine
    (:func:`check_annotations`, :func:`pair_annotations`, categories); the pixel checks are the engine's
    (:mod:`study.eval.engines`). Returns the summary of :meth:`PQAccumulator.summary`, with ``engine``."""
    from study.eval.engines import PQ_ENGINES, check_engine, pq_hotcoco, pq_panopticapi

    check_engine(engine, PQ_ENGINES)
    check_workers(workers)  # refused whatever the engine, as before engines
    gt = read_json(gt_json, "ground-truth JSON", dict) if gt is None else gt
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
    check_pair_categories(pairs, categories, str(gt_json), str(pred_json))
    if engine == "hotcoco":
        gt_sel = {**gt, "annotations": [g for g, _ in pairs], "categories": categories}
        pred_sel = {"annotations": [p for _, p in pairs]}
        result = pq_hotcoco(gt_sel, pred_sel, gt_dir, pred_dir, categories, str(gt_json), str(pred_json))
    elif engine == "panopticapi":
        result = pq_panopticapi(Path(gt_json), Path(pred_json), gt_dir, pred_dir, categories, pairs)
    else:
        result = score_pairs(pairs, categories, gt_dir, pred_dir, workers).summary()
    result["engine"] = engine
    result["categories"] = categories
    return result


def check_pair_categories(pairs: list[tuple[dict, dict]], categories: list[dict], gt_where: str,
                          pred_where: str) -> None:
    """Every segment's category is one of the GT categories (one set look-up per segment)."""
    known = {c["id"] for c in categories}
    for g, p in pairs:
        for ann, where in ((g, gt_where), (p, pred_where)):
            for s in ann["segments_info"]:
                if s["category_id"] not in known:
                    raise UnknownCategoryError(f"image {_image_name(g)}: segment {s['id']} in {where} has "
                                               f"category id {s['category_id']}, unknown to the ground truth "
                                               f"categories")
