"""The strict checks of COCO results, vectorised: one pass over the list, then numpy over all results at once.

:func:`results_ok_fast` accepts exactly what :func:`study.eval.coco_ap.check_results` accepts. It pulls
the fields of every result into arrays (ids, scores, sizes, the RLE strings joined into one buffer), checks
them with a few numpy passes (every RLE of the file decoded in one go, as pycocotools' ``rleFrString`` reads
it), and, as soon as anything is off or unusual (a field missing, a non-integer id, an odd type), answers
False: the caller (``coco_ap.evaluate_masks``) then runs the per-result ``check_results``, which raises the
same error naming the image and the result as before. So a sound file costs a few numpy passes and a faulty
one gets the same message as ever.
"""
from __future__ import annotations

import numpy as np

_FIRST, _LAST = 48, 48 + 63  # the compressed RLE alphabet '0'..'o' (study/data/rle.py)
_MAX_CHARS = 8  # 40 bits a run: longer values go to the exact per-result check (no int64 overflow here)


_CHUNK_CHARS = 1 << 20  # characters decoded at once: arrays that stay in cache, memory reused (our choice)


def rle_batch_ok(counts: list[str], hw: np.ndarray) -> bool:
    """Whether every compressed RLE string decodes, as pycocotools reads it, into non-negative runs adding
    up to its mask's pixel count ``hw`` (R,). False means: let the exact per-result check find out why.
    Decoded about ``_CHUNK_CHARS`` characters at a time."""
    lengths = np.fromiter((len(c) for c in counts), np.int64, len(counts))
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(_CHUNK_CHARS, int(lengths.sum()), _CHUNK_CHARS))
    edges = [0, *sorted(set((bounds + 1).tolist()) - {0, len(counts)}), len(counts)]
    return all(_chunk_ok(counts[a:b], lengths[a:b], hw[a:b]) for a, b in zip(edges[:-1], edges[1:]))


def _chunk_ok(counts: list[str], lengths: np.ndarray, hw: np.ndarray) -> bool:
    if not counts or lengths.min() == 0:
        return not counts
    try:
        b = np.frombuffer("".join(counts).encode("ascii"), np.uint8)
    except UnicodeEncodeError:
        return False
    if b.min() < _FIRST or b.max() > _LAST:
        return False
    b = b - np.uint8(_FIRST)
    more = (b & 0x20) != 0  # the value goes on in the next character
    string_end = np.cumsum(lengths) - 1
    if more[string_end].any():  # a value cut off at the end of its string
        return False
    ends = np.flatnonzero(~more)
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    nchar = ends - starts + 1
    longest = int(nchar.max())
    if longest > _MAX_CHARS:
        return False
    # 5 bits a character, least significant first; most values are one character, so each further
    # character position touches only the values that long.
    payload = b & np.uint8(0x1F)
    x = payload[starts].astype(np.int64)
    for p in range(1, longest):
        m = np.flatnonzero(nchar > p)
        x[m] |= payload[starts[m] + p].astype(np.int64) << (5 * p)
    neg = np.flatnonzero(b[ends] & 0x10)
    x[neg] -= np.int64(1) << (5 * nchar[neg])  # sign extension (rleFrString: x |= -1 << 5k)
    per_string = np.diff(np.searchsorted(ends, string_end, side="right"), prepend=0)
    first_value = np.cumsum(per_string) - per_string
    k = np.arange(x.size) - np.repeat(first_value, per_string)  # the value's place in its string
    # rleFrString: run k >= 2 adds run k - 2, so runs 1, 3, 5, ... and 2, 4, 6, ... are running sums within
    # the string (run 0 stands alone): one global running sum per parity, less its value at the string start.
    odd = (k & 1).astype(bool)
    even = ~odd
    even[first_value] = False
    base = np.repeat(first_value, per_string)
    for sel in (odd, even):
        cs = np.cumsum(np.where(sel, x, 0))
        if (cs - cs[base])[sel].min(initial=0) < 0:
            return False
    if x[first_value].min() < 0:
        return False
    # The runs' total: value j (k >= 1) is in every later run of its parity in its string.
    after = np.repeat(per_string, per_string) - k  # values from j to the string's end, j included
    weight = np.where(k == 0, 1, (after + 1) // 2)
    return bool(np.array_equal(np.add.reduceat(x * weight, first_value), hw))


def segmentation_ok_fast(seg, h: int, w: int) -> bool:
    """True when a ground-truth segmentation surely passes ``study.data.rle.check_segmentation(seg, h, w,
    values=False)``: polygons of the right shape, or an RLE of size [h, w] whose runs are sound. False means:
    run that check (it names the fault)."""
    if type(seg) is list:
        return bool(seg) and all(type(p) is list and len(p) >= 6 and not len(p) % 2 for p in seg)
    if type(seg) is not dict or type(seg.get("size")) is not list or seg["size"] != [h, w] \
            or type(seg["size"][0]) is not int or type(seg["size"][1]) is not int:
        return False
    counts = seg.get("counts")
    if type(counts) is list:
        return all(type(v) is int and v >= 0 for v in counts) and sum(counts) == h * w
    return type(counts) is str and rle_batch_ok([counts], np.array([h * w]))


def results_ok_fast(gt: dict, results: list) -> bool:
    """Whether :func:`study.eval.coco_ap.check_results` would accept ``results``, vectorised: True only when
    it surely would; on any doubt False, and the caller runs the exact check (which names the fault)."""
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
    try:  # an integer beyond int64 / float64 (1e400, 2**63): not surely fine, the exact check decides
        score = np.array(scores, np.float64)
        im_ids = np.array([im["id"] for im in gt["images"]], np.int64)
        img = np.array(image_ids, np.int64)
        cats = np.array(cat_ids, np.int64)
    except (OverflowError, TypeError, ValueError):
        return False
    if not np.isfinite(score).all():
        return False
    order = np.argsort(im_ids)
    im_sorted = im_ids[order]
    pos = np.minimum(np.searchsorted(im_sorted, img), im_sorted.size - 1)
    if not (im_sorted[pos] == img).all():
        return False
    if not np.isin(cats, [c["id"] for c in gt["categories"]]).all():
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
