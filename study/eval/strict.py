"""The strict checks of COCO results, vectorised: one pass over the list, then numpy over all results at once.

:func:`check_results_fast` accepts exactly what :func:`study.eval.coco_ap.check_results` accepts. It pulls
the fields of every result into arrays (ids, scores, sizes, the RLE strings joined into one buffer), checks
them with a few numpy passes (every RLE of the file decoded in one go, as pycocotools' ``rleFrString`` reads
it), and, as soon as anything is off or unusual (a field missing, a non-integer id, an odd type), hands the
list to the per-result ``check_results``, which raises the same error naming the image and the result as
before. So a sound file costs a few numpy passes and a faulty one gets the same message as ever.
"""
from __future__ import annotations

import numpy as np

_FIRST, _LAST = 48, 48 + 63  # the compressed RLE alphabet '0'..'o' (study/data/rle.py)
_MAX_CHARS = 8  # 40 bits a run: longer values go to the exact per-result check (no int64 overflow here)


def _segmented_cumsum(x: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Cumulative sums of ``x`` restarting at every new value of ``group`` (equal groups contiguous once
    stably sorted), returned in the original order."""
    order = np.argsort(group, kind="stable")
    xs, gs = x[order], group[order]
    cs = np.cumsum(xs)
    first = np.ones(gs.size, bool)
    first[1:] = gs[1:] != gs[:-1]
    start_idx = np.flatnonzero(first)
    base = np.repeat(cs[start_idx] - xs[start_idx], np.diff(np.append(start_idx, gs.size)))
    out = np.empty_like(x)
    out[order] = cs - base
    return out


def rle_batch_ok(counts: list[str], hw: np.ndarray) -> bool:
    """Whether every compressed RLE string decodes, as pycocotools reads it, into non-negative runs adding
    up to its mask's pixel count ``hw`` (R,). False means: let the exact per-result check find out why."""
    lengths = np.fromiter((len(c) for c in counts), np.int64, len(counts))
    if not counts or lengths.min() == 0:
        return not counts
    try:
        data = "".join(counts).encode("ascii")
    except UnicodeEncodeError:
        return False
    c = np.frombuffer(data, np.uint8).astype(np.int64)
    if c.min() < _FIRST or c.max() > _LAST:
        return False
    c -= _FIRST
    last = (c & 0x20) == 0  # the last character of each value
    string_end = np.cumsum(lengths) - 1
    if not last[string_end].all():  # a value cut off at the end of its string
        return False
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    nchar = ends - starts + 1
    if nchar.max() > _MAX_CHARS:
        return False
    pos = np.arange(c.size) - np.repeat(starts, nchar)
    x = np.add.reduceat((c & 0x1F) << (5 * pos), starts)
    x = np.where((c[ends] & 0x10) != 0, x - (np.int64(1) << (5 * nchar)), x)  # sign extension
    sid = np.searchsorted(string_end, ends)  # the string of each value
    first_value = np.searchsorted(sid, np.arange(len(counts)))
    k = np.arange(x.size) - first_value[sid]  # the value's place in its string
    # rleFrString: run k (k > 2 ... counting from 0: k >= 2) adds run k - 2, so runs 1, 3, 5, ... and
    # 2, 4, 6, ... are running sums within the string; run 0 stands alone.
    group = sid * 3 + np.where(k == 0, 0, np.where(k % 2 == 1, 1, 2))
    runs = _segmented_cumsum(x, group)
    if runs.min() < 0:
        return False
    totals = np.add.reduceat(runs, first_value)
    return bool(np.array_equal(totals, hw))


def check_results_fast(gt: dict, results, where: str = "the results") -> None:
    """:func:`study.eval.coco_ap.check_results`, vectorised; falls back to it (which raises) on any doubt."""
    from study.eval.coco_ap import check_results

    if not isinstance(results, list) or not _fast_ok(gt, results):
        check_results(gt, results, where)


def _fast_ok(gt: dict, results: list) -> bool:
    if not results:
        return True
    try:
        image_ids = [r["image_id"] for r in results]
        cat_ids = [r["category_id"] for r in results]
        scores = [r["score"] for r in results]
        segs = [r["segmentation"] for r in results]
        sizes = [s["size"] for s in segs]
        counts = [s["counts"] for s in segs]
    except (KeyError, TypeError, IndexError):  # a non-dict result or segmentation, or a field missing
        return False
    if not (all(type(v) is int for v in image_ids) and all(type(v) is int for v in cat_ids)
            and all(type(v) in (float, int) for v in scores) and all(type(c) is str for c in counts)
            and all(type(s) is list and len(s) == 2 and type(s[0]) is int and type(s[1]) is int for s in sizes)):
        return False
    score = np.array(scores, np.float64)
    if not np.isfinite(score).all():
        return False
    im_ids = np.array([im["id"] for im in gt["images"]], np.int64)
    order = np.argsort(im_ids)
    im_sorted = im_ids[order]
    img = np.array(image_ids, np.int64)
    pos = np.minimum(np.searchsorted(im_sorted, img), im_sorted.size - 1)
    if not (im_sorted[pos] == img).all():
        return False
    if not np.isin(np.array(cat_ids, np.int64), [c["id"] for c in gt["categories"]]).all():
        return False
    h = np.array([im["height"] for im in gt["images"]], np.int64)[order][pos]
    w = np.array([im["width"] for im in gt["images"]], np.int64)[order][pos]
    try:
        size = np.array(sizes, np.int64)
    except (TypeError, ValueError, OverflowError):
        return False
    if not (np.array_equal(size[:, 0], h) and np.array_equal(size[:, 1], w)):
        return False
    return rle_batch_ok(counts, h * w)
