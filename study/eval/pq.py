"""Panoptic quality (PQ, SQ, RQ) with the exact rules of COCO's panopticapi, vectorised with numpy.

The rules (panopticapi ``pq_compute_single_core``), reproduced one for one:
- a ground-truth (GT) and a predicted segment of the same category match when IoU > 0.5, where the union
  leaves out the predicted pixels that fall on void (id 0); crowd GT segments never match;
- GT areas come from the JSON ``area`` field (pixel counts when absent), predicted areas from the PNG;
- an unmatched GT segment that is not crowd is a false negative;
- an unmatched prediction is a false positive unless more than half of it lies on void plus the crowd
  region of its own category (the last crowd segment of that category listed in the GT JSON);
- the mean over categories leaves out those with no TP, FP or FN (absent from both GT and predictions).

Instead of panopticapi's sort (``np.unique`` of combined 64-bit ids) and Python loop over the pairs, the
image is cut into runs of equal (GT id, predicted id) pixels (three comparisons per pixel), each run's ids
are mapped to small row / column numbers through a look-up table, the image is reduced to one (GT segment
x predicted segment) intersection matrix by a single ``np.bincount`` over the combined row / column codes
weighted by run length, and matching and FP/FN are array operations on that matrix.
"""
from __future__ import annotations

import threading
from numbers import Real
from typing import Iterable, Optional

import numpy as np

from study.eval.pixel_runs import runs, weighted_counts
from study.eval.errors import EvalInputError, UnknownCategoryError, UnknownSegmentError, SizeMismatchError

MATCH_IOU = 0.5  # panopticapi: a match needs IoU > 0.5 (unique by construction)
VOID_FRACTION = 0.5  # panopticapi: an unmatched prediction mostly on void + crowd is not a false positive


def is_int(v) -> bool:
    """:func:`study.data.rle.is_int`, imported when first needed: importing the study.data package loads torch
    (it exports the dataset builders), which `study score` does not need. Callers test ``type(v) is int``
    first."""
    from study.data.rle import is_int as exact

    return exact(v)


_LUT_IDS = 1 << 24  # COCO panoptic ids are R + 256 G + 256^2 B < 2^24
_UNLISTED_ROW, _VOID_ROW = 0, 1  # rows/columns of the intersection matrix; segments start at 2
_LUT_MAX_KEYS = np.iinfo(np.uint16).max - 2  # segments per image the uint16 look-up table can number


_tables = threading.local()  # one look-up table per thread, reused across images and scorer calls


def _lookup_table() -> np.ndarray:
    """(2^24,) uint16, every entry _UNLISTED_ROW (0) except id 0 (void) -> _VOID_ROW; callers restore what
    they change. 32 MB of address space per thread, zero pages until touched (so a new thread's table costs
    next to nothing), allocated once."""
    lut = getattr(_tables, "lut", None)
    if lut is None:
        lut = _tables.lut = np.zeros(_LUT_IDS, np.uint16)
        lut[0] = _VOID_ROW
    return lut


def _rows(flat: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Flat ids (N,) -> rows (N,): 0 = not in ``keys``, 1 = void (id 0), 2..K+1 = ``keys`` (sorted, unique).

    COCO ids fit a 2^24-entry look-up table, filled with this image's keys and cleared again, which replaces
    a sort or binary search per pixel; other ids (negative, >= 2^24, a listed id 0, more than 65533 segments)
    take a binary search.
    """
    k = keys.size
    in_range = flat.size == 0 or ((flat.dtype.kind == "u" or flat.min() >= 0) and flat.max() < _LUT_IDS)
    if k <= _LUT_MAX_KEYS and in_range and (k == 0 or (keys[0] > 0 and keys[-1] < _LUT_IDS)):
        lut = _lookup_table()
        lut[keys] = np.arange(2, k + 2, dtype=np.uint16)
        try:
            return np.take(lut, flat)
        finally:
            lut[keys] = _UNLISTED_ROW
    if k == 0:
        return np.where(flat == 0, _VOID_ROW, _UNLISTED_ROW)
    pos = np.minimum(np.searchsorted(keys, flat), k - 1)
    return np.where(keys[pos] == flat, pos + 2, np.where(flat == 0, _VOID_ROW, _UNLISTED_ROW))


class PQAccumulator:
    """Per-category sums of IoU, TP, FP, FN over images; :meth:`summary` gives panopticapi's numbers.

    Args:
        categories: the GT categories (dicts with ``id``, ``isthing``, optionally ``name``), which define
            the classes averaged over and the things/stuff split.
    """

    def __init__(self, categories: Iterable[dict]):
        self.categories = list(categories)
        self.cat_ids = np.array([c["id"] for c in self.categories], dtype=np.int64)
        self.index = {int(c): i for i, c in enumerate(self.cat_ids)}
        k = len(self.categories)
        self.iou = np.zeros(k, np.float64)
        self.tp = np.zeros(k, np.int64)
        self.fp = np.zeros(k, np.int64)
        self.fn = np.zeros(k, np.int64)
        self.num_images = 0

    def _segments(self, segs: list[dict], image: str, what: str, gt: bool = True):
        """One pass over a JSON ``segments_info``: ids (S,) int64, category indices (S,) int64, and for the
        ground truth (``gt``) crowd flags and areas (NaN where absent; None for a prediction, whose crowd
        flags and areas panopticapi ignores), each in JSON order; a non-integer id or category, an unknown
        category or a non-numeric GT area raises naming the image and the segment."""
        ids = [s.get("id") for s in segs]
        cids = [s.get("category_id") for s in segs]
        for key, values in (("id", ids), ("category_id", cids)):
            if not all(type(v) is int for v in values):  # the common case, checked fast; then exactly
                for v in values:
                    if not is_int(v):
                        raise EvalInputError(f"image {image}: a {what} segment has {key} {v!r:.40}; expected "
                                             f"an integer")
        cats = [self.index.get(int(c)) for c in cids]
        if None in cats:
            k = cats.index(None)
            raise UnknownCategoryError(f"image {image}: {what} segment {ids[k]} has category id {cids[k]}, "
                                       f"unknown to the ground truth categories")
        if not gt:
            return np.array(ids, np.int64).reshape(-1), np.array(cats, np.int64).reshape(-1), None, None
        crowd = np.array([s.get("iscrowd", 0) == 1 for s in segs], bool)  # panopticapi: iscrowd == 1
        areas = [s.get("area") for s in segs]
        for k, v in enumerate(areas):
            if v is not None and (not isinstance(v, Real) or isinstance(v, bool)):
                raise EvalInputError(f"image {image}: {what} segment {ids[k]} has area {v!r:.40}; expected a "
                                     f"number (or no 'area': its pixel count)")
        area = np.array([np.nan if v is None else v for v in areas], np.float64)
        return (np.array(ids, np.int64).reshape(-1), np.array(cats, np.int64).reshape(-1), crowd.reshape(-1),
                area.reshape(-1))

    def add(self, gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray,
            pred_segments: list[dict], image: str = "?", id_mask: Optional[int] = None) -> None:
        """Score one image.

        gt_ids, pred_ids: (H, W) integer segment-id maps (0 = void). gt_segments: dicts with ``id``,
        ``category_id``, ``iscrowd`` and optionally ``area``; pred_segments: dicts with ``id`` and
        ``category_id``. ``image`` names the image in error messages. ``id_mask``: the maps hold words whose
        id is ``word & id_mask`` (:func:`study.eval.pq_files.read_id_words`: Pillow's RGBX pixels, the
        fourth byte padding), so that no pass over the pixels is spent on masking.
        """
        if gt_ids.shape != pred_ids.shape:
            raise SizeMismatchError(f"image {image}: prediction is {pred_ids.shape[1]}x{pred_ids.shape[0]} "
                                    f"(WxH), ground truth is {gt_ids.shape[1]}x{gt_ids.shape[0]}")
        p_raw, pred_cat, _, _ = self._segments(pred_segments, image, "predicted", gt=False)
        g_raw, g_cat_json, g_crowd_json, gt_json_area = self._segments(gt_segments, image, "ground-truth")
        # A repeated id is an error (panopticapi's dicts keyed by id would silently keep the last entry).
        for ids, what in ((p_raw, "prediction"), (g_raw, "ground-truth")):
            if np.unique(ids).size != ids.size:
                raise UnknownSegmentError(f"image {image}: the {what} JSON lists a segment id twice")

        # Everything below is in sorted-id order, the order of the matrix rows / columns.
        g_order, p_order = np.argsort(g_raw, kind="stable"), np.argsort(p_raw, kind="stable")
        g_keys, p_keys = g_raw[g_order], p_raw[p_order]
        gt_cat, gt_crowd, gt_json_area = g_cat_json[g_order], g_crowd_json[g_order], gt_json_area[g_order]
        pred_cat = pred_cat[p_order]
        ng, npr = g_keys.size, p_keys.size

        # One bincount over combined ids gives the (GT x prediction) intersection matrix: rows 0 = ids the
        # GT JSON does not list (they match nothing and are not void; panopticapi), 1 = void, 2.. = GT
        # segments; columns likewise for the prediction (column 0 must stay empty).
        # The pixels are taken a run of equal (GT, prediction) ids at a time (:func:`runs`).
        width = npr + 2
        # Runs of equal words are runs of equal ids, so the mask is applied to one word per run.
        starts, lengths = runs(gt_ids.reshape(-1), pred_ids.reshape(-1))
        g_run, p_run = gt_ids.reshape(-1)[starts], pred_ids.reshape(-1)[starts]
        if id_mask is not None:
            g_run, p_run = g_run & g_run.dtype.type(id_mask), p_run & p_run.dtype.type(id_mask)
        code = _rows(g_run, g_keys).astype(np.intp)
        code *= width
        code += _rows(p_run, p_keys)
        inter = weighted_counts(code, lengths, (ng + 2) * width).reshape(ng + 2, width)
        if inter[:, _UNLISTED_ROW].any():
            flat = p_run
            listed = np.isin(flat, p_keys) | (flat == 0)
            raise UnknownSegmentError(f"image {image}: the prediction PNG holds segment id(s) "
                                      f"{np.unique(flat[~listed])[:5].tolist()} that its JSON does not list")
        seg = inter[:, 2:]  # (G + 2, P)
        pred_area = seg.sum(0)  # (P,) from the PNG
        if (pred_area == 0).any():
            missing = p_keys[pred_area == 0]
            raise UnknownSegmentError(f"image {image}: the prediction JSON lists segment id(s) "
                                      f"{missing[:5].tolist()} that its PNG does not hold")
        cross = seg[2:]  # (G, P) intersections
        void = seg[_VOID_ROW]  # (P,) predicted pixels on void
        gt_area = np.where(np.isnan(gt_json_area), inter[2:].sum(1), gt_json_area)  # JSON area, else pixels

        # Matching: (G, P) IoU of same-category pairs, crowd GT excluded.
        union = pred_area[None, :] + gt_area[:, None] - cross - void[None, :]
        ok = (gt_cat[:, None] == pred_cat[None, :]) & ~gt_crowd[:, None] & (cross > 0)
        iou = np.divide(cross, union, out=np.zeros(cross.shape, np.float64), where=ok)
        match = ok & (iou > MATCH_IOU)
        rows, cols = np.nonzero(match)
        np.add.at(self.tp, gt_cat[rows], 1)
        np.add.at(self.iou, gt_cat[rows], iou[rows, cols])

        gt_matched, pred_matched = match.any(1), match.any(0)
        miss = ~gt_matched & ~gt_crowd
        np.add.at(self.fn, gt_cat[miss], 1)

        # The crowd region of each category: the last crowd segment listed in the JSON (panopticapi's dict
        # overwrite). crowd_row: (K categories,) matrix row of that segment, -1 where none.
        crowd_row = np.full(len(self.categories), -1, np.int64)
        sorted_row = np.empty(ng, np.int64)
        sorted_row[g_order] = np.arange(ng)  # JSON index -> matrix row (less 2)
        for j in np.nonzero(g_crowd_json)[0]:  # JSON order, so that the last one listed wins
            crowd_row[g_cat_json[j]] = sorted_row[j]
        rows = crowd_row[pred_cat]  # (P,)
        on_crowd = np.where(rows >= 0, cross[np.maximum(rows, 0), np.arange(npr)] if ng else 0, 0)
        ignored = (void + on_crowd) / pred_area > VOID_FRACTION
        false_pos = ~pred_matched & ~ignored
        np.add.at(self.fp, pred_cat[false_pos], 1)
        self.num_images += 1

    def merge(self, other: "PQAccumulator") -> None:
        """Add the sums of another accumulator over the same categories (parallel scoring)."""
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.num_images += other.num_images

    def summary(self) -> dict:
        """``{'All'|'Things'|'Stuff': {pq, sq, rq, n}, 'per_class': {cat_id: {pq, sq, rq, tp, fp, fn}}}``.

        Numbers are fractions (panopticapi's convention); a group with no counted class has n = 0 and zeros
        (panopticapi divides by zero there).
        """
        tp, fp, fn, iou = self.tp, self.fp, self.fn, self.iou
        denom = tp + 0.5 * fp + 0.5 * fn
        counted = (tp + fp + fn) > 0
        pq = np.divide(iou, denom, out=np.zeros_like(iou), where=counted)
        sq = np.divide(iou, tp, out=np.zeros_like(iou), where=tp > 0)
        rq = np.divide(tp, denom, out=np.zeros_like(iou), where=counted)
        is_thing = np.array([c.get("isthing", 1) == 1 for c in self.categories], dtype=bool)
        out = {}
        for name, sel in (("All", np.ones_like(is_thing)), ("Things", is_thing), ("Stuff", ~is_thing)):
            m = sel & counted
            n = int(m.sum())
            out[name] = {k: (float(v[m].sum() / n) if n else 0.0) for k, v in (("pq", pq), ("sq", sq), ("rq", rq))}
            out[name]["n"] = n
        out["per_class"] = {
            int(c): {"pq": float(pq[i]), "sq": float(sq[i]), "rq": float(rq[i]), "tp": int(tp[i]),
                     "fp": int(fp[i]), "fn": int(fn[i]), "counted": bool(counted[i])}
            for i, c in enumerate(self.cat_ids)}
        out["num_images"] = self.num_images
        return out


def format_table(result: dict, categories: list[dict], per_class: bool = True) -> str:
    """The per-class table (classes counted in the mean) and the All / Things / Stuff rows, in percent."""
    names = {c["id"]: c.get("name", str(c["id"])) for c in categories}
    things = {c["id"]: c.get("isthing", 1) == 1 for c in categories}
    lines = []
    if per_class:
        lines.append(f"{'class':24s} {'kind':5s} {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'TP':>5s} {'FP':>5s} {'FN':>5s}")
        for cid, r in result["per_class"].items():
            if not r.get("counted", True):
                continue
            kind = "thing" if things.get(cid, True) else "stuff"
            lines.append(f"{names.get(cid, str(cid))[:24]:24s} {kind:5s} {100 * r['pq']:6.2f} "
                         f"{100 * r['sq']:6.2f} {100 * r['rq']:6.2f} {r['tp']:5d} {r['fp']:5d} {r['fn']:5d}")
        lines.append("")
    lines.append(f"{'':10s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}")
    lines.append("-" * 38)
    for name in ("All", "Things", "Stuff"):
        r = result[name]
        lines.append(f"{name:10s}| {100 * r['pq']:6.2f} {100 * r['sq']:6.2f} {100 * r['rq']:6.2f} {r['n']:5d}")
    return "\n".join(lines)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG (H, W, 3) uint8 -> (H, W) int32 ids, id = R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int32)  # ids < 2^24 fit; int32 halves the memory traffic of int64
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) ids < 256^3 -> (H, W, 3) uint8, the inverse of :func:`rgb_to_id`."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def check_categories(categories: Optional[list], where: str) -> list[dict]:
    """The GT categories: a non-empty list of objects with unique integer ``id`` (``isthing`` 0 or 1)."""
    if not categories:
        raise EvalInputError(f"{where} lists no 'categories'; PQ needs the ground-truth categories (give them "
                             f"with --categories FILE if they are kept in a separate file)")
    if not isinstance(categories, list):
        raise EvalInputError(f"{where}: 'categories' must be a list, not a {type(categories).__name__}")
    seen = set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict):
            raise EvalInputError(f"{where}: categories[{i}] is not an object")
        cid = c.get("id")
        if type(cid) is not int and not is_int(cid):
            raise EvalInputError(f"{where}: categories[{i}] field 'id' must be an integer, got {cid!r:.40}")
        if cid in seen:
            raise EvalInputError(f"{where}: category id {cid} is listed twice (field 'id')")
        seen.add(cid)
        if c.get("isthing", 1) not in (0, 1) or isinstance(c.get("isthing", 1), float):
            raise EvalInputError(f"{where}: category id {cid} has isthing {c.get('isthing')!r}; expected 0 or 1")
    return list(categories)
