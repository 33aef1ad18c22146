"""Panoptic quality (PQ, SQ, RQ) with the exact rules of COCO's panopticapi, vectorised with numpy.

The rules (panopticapi ``pq_compute_single_core``), reproduced one for one:
- a ground-truth (GT) and a predicted segment of the same category match when IoU > 0.5, where the union
  leaves out the predicted pixels that fall on void (id 0); crowd GT segments never match;
- GT areas come from the JSON ``area`` field (pixel counts when absent), predicted areas from the PNG;
- an unmatched GT segment that is not crowd is a false negative;
- an unmatched prediction is a false positive unless more than half of it lies on void plus the crowd
  region of its own category (the last crowd segment of that category listed in the GT JSON);
- the mean over categories leaves out those with no TP, FP or FN (absent from both GT and predictions).

Instead of panopticapi's sort (``np.unique`` of combined 64-bit ids) and Python loop over the pairs, each
pixel's GT and predicted ids are mapped to small row / column numbers through a look-up table, the image is
reduced to one (GT segment x predicted segment) intersection matrix by a single ``np.bincount``, and
matching and FP/FN are array operations on that matrix.
"""
from __future__ import annotations

import threading
from numbers import Integral
from typing import Iterable, Optional

import numpy as np

from study.eval.errors import EvalInputError, UnknownCategoryError, UnknownSegmentError, SizeMismatchError

MATCH_IOU = 0.5  # panopticapi: a match needs IoU > 0.5 (unique by construction)
VOID_FRACTION = 0.5  # panopticapi: an unmatched prediction mostly on void + crowd is not a false positive


_NO_ROW = np.iinfo(np.uint16).max  # look-up table entry of an id that is not listed
_LUT_IDS = 1 << 24  # COCO panoptic ids are R + 256 G + 256^2 B < 2^24


_tables = threading.local()  # one look-up table per thread, reused across images and scorer calls


def _lookup_table() -> np.ndarray:
    """(2^24,) uint16, every entry _NO_ROW except id 0 (void) -> row 0; callers restore what they change."""
    lut = getattr(_tables, "lut", None)
    if lut is None:
        lut = _tables.lut = np.full(_LUT_IDS, _NO_ROW, np.uint16)
        lut[0] = 0
    return lut


def _positions(ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For flat ``ids`` (N,) and sorted unique ``keys`` (K,): index into keys (N,) and whether it hit."""
    if keys.size == 0:
        return np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
    pos = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
    return pos, keys[pos] == ids


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

    def _rows(self, flat: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Flat ids (N,) -> rows (N,) int64: 0 = void (id 0), 1..K = ``keys`` (sorted), K + 1 = not listed.

        COCO ids fit a 2^24-entry look-up table, which replaces a sort or binary search per pixel (the
        table is filled with this image's keys and cleared again); other ids take a binary search.
        """
        k = keys.size
        if k < _NO_ROW - 1 and flat.size and 0 <= flat.min() and flat.max() < _LUT_IDS and (k == 0 or keys[0] > 0):
            lut = _lookup_table()
            lut[keys] = np.arange(1, k + 1, dtype=np.uint16)
            rows = lut[flat]
            lut[keys] = _NO_ROW
            return np.minimum(rows, k + 1).astype(np.int64)
        pos, hit = _positions(flat, keys)
        return np.where(hit, pos + 1, np.where(flat == 0, 0, k + 1))

    def _cat_index(self, segs: list[dict], image: str, what: str) -> np.ndarray:
        out = np.empty(len(segs), np.int64)
        for i, s in enumerate(segs):
            for key in ("id", "category_id"):
                v = s.get(key)
                if not isinstance(v, Integral) or isinstance(v, bool):
                    raise EvalInputError(f"image {image}: a {what} segment has {key} {v!r:.40}; expected an "
                                         f"integer")
            j = self.index.get(int(s["category_id"]))
            if j is None:
                raise UnknownCategoryError(f"image {image}: {what} segment {s['id']} has category id "
                                           f"{s['category_id']}, unknown to the ground truth categories")
            out[i] = j
        return out

    def add(self, gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray,
            pred_segments: list[dict], image: str = "?") -> None:
        """Score one image.

        gt_ids, pred_ids: (H, W) integer segment-id maps (0 = void). gt_segments: dicts with ``id``,
        ``category_id``, ``iscrowd`` and optionally ``area``; pred_segments: dicts with ``id`` and
        ``category_id``. ``image`` names the image in error messages.
        """
        if gt_ids.shape != pred_ids.shape:
            raise SizeMismatchError(f"image {image}: prediction is {pred_ids.shape[1]}x{pred_ids.shape[0]} "
                                    f"(WxH), ground truth is {gt_ids.shape[1]}x{gt_ids.shape[0]}")
        # Dicts keyed by id as in panopticapi (a repeated id keeps its last entry, in first-seen order).
        gt_segs = list({int(s["id"]): s for s in gt_segments}.values())
        pred_segs = list({int(s["id"]): s for s in pred_segments}.values())
        if len(pred_segs) != len(pred_segments):
            raise UnknownSegmentError(f"image {image}: the prediction JSON lists a segment id twice")
        if len(gt_segs) != len(gt_segments):
            raise UnknownSegmentError(f"image {image}: the ground-truth JSON lists a segment id twice")
        pred_cat = self._cat_index(pred_segs, image, "predicted")
        gt_cat = self._cat_index(gt_segs, image, "ground-truth")

        # Map raw ids to matrix rows/columns: GT rows 0 = void, 1..G = segments (sorted by id), G + 1 =
        # ids the GT JSON does not list (they match nothing and are not void); prediction columns 0 = void,
        # 1..P = segments. g_idx, p_idx: (H * W,).
        gt_flat, pred_flat = gt_ids.reshape(-1), pred_ids.reshape(-1)
        g_keys = np.array(sorted(int(s["id"]) for s in gt_segs), dtype=np.int64)
        p_keys = np.array(sorted(int(s["id"]) for s in pred_segs), dtype=np.int64)
        ng, npr = g_keys.size, p_keys.size
        g_idx = self._rows(gt_flat, g_keys)
        p_idx = self._rows(pred_flat, p_keys)
        bad = p_idx == npr + 1
        if bad.any():
            ids = np.unique(pred_flat[bad])
            raise UnknownSegmentError(f"image {image}: the prediction PNG holds segment id(s) "
                                      f"{ids[:5].tolist()} that its JSON does not list")
        inter = np.bincount(g_idx * (npr + 1) + p_idx, minlength=(ng + 2) * (npr + 1)).reshape(ng + 2, npr + 1)

        # Reorder the JSON-order attributes to the sorted-id order of the matrix.
        g_order = np.argsort([int(s["id"]) for s in gt_segs], kind="stable")
        p_order = np.argsort([int(s["id"]) for s in pred_segs], kind="stable")
        gt_cat, pred_cat = gt_cat[g_order], pred_cat[p_order]
        gt_crowd = np.array([bool(gt_segs[i].get("iscrowd", 0)) for i in g_order], dtype=bool)
        pixel_area = inter[1:ng + 1].sum(1)
        gt_area = np.array([gt_segs[i].get("area", pixel_area[r]) for r, i in enumerate(g_order)],
                           dtype=np.float64).reshape(ng)
        pred_area = inter[:, 1:].sum(0)  # (P,) from the PNG
        if (pred_area == 0).any():
            missing = p_keys[pred_area == 0]
            raise UnknownSegmentError(f"image {image}: the prediction JSON lists segment id(s) "
                                      f"{missing[:5].tolist()} that its PNG does not hold")

        # Matching: (G, P) IoU of same-category pairs, crowd GT excluded.
        cross = inter[1:ng + 1, 1:]  # (G, P) intersections
        void = inter[0, 1:]  # (P,) predicted pixels on void
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

        # The crowd region of each category: the last crowd segment listed (panopticapi's dict overwrite).
        crowd_row = {}
        row_of = {int(g_keys[r]): r for r in range(ng)}
        for s in gt_segs:
            if s.get("iscrowd", 0) == 1:
                crowd_row[int(self.index[int(s["category_id"])])] = row_of[int(s["id"])]
        rows = np.array([crowd_row.get(int(c), -1) for c in pred_cat], dtype=np.int64)  # (P,)
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
        if not isinstance(cid, Integral) or isinstance(cid, bool):
            raise EvalInputError(f"{where}: categories[{i}] field 'id' must be an integer, got {cid!r:.40}")
        if cid in seen:
            raise EvalInputError(f"{where}: category id {cid} is listed twice (field 'id')")
        seen.add(cid)
        if c.get("isthing", 1) not in (0, 1) or isinstance(c.get("isthing", 1), float):
            raise EvalInputError(f"{where}: category id {cid} has isthing {c.get('isthing')!r}; expected 0 or 1")
    return list(categories)
