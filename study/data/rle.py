"""Checks of COCO segmentations before they reach pycocotools' C code.

pycocotools trusts its input: a compressed RLE whose run lengths do not add up to height x width makes
``rleIou`` loop forever (COCOeval then hangs at 100% CPU) and ``rleDecode`` write past its buffer. So every
RLE is decoded here first, in Python, and refused with a message naming the culprit unless it is exactly
what pycocotools' own encoder could have written.

The compressed form (pycocotools ``maskApi.c``, ``rleToString`` / ``rleFrString``): run lengths
alternate background / foreground, starting with background. Each run from the third on is stored as the
difference from the run two before it. A value is written in groups of 5 bits, least significant first, one
character per group: ``chr(48 + group)``, with bit 0x20 set when more groups follow; the last group's bit
0x10 is the sign (two's complement). Valid characters are therefore ``'0'`` (48) to ``'o'`` (111).
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import Optional

_FIRST, _LAST = 48, 48 + 63


class RLEError(ValueError):
    """A segmentation that pycocotools cannot be trusted with; the message says what is wrong."""


def decode_counts(counts: str | bytes) -> list[int]:
    """A compressed RLE ``counts`` string -> the run lengths, exactly as pycocotools' ``rleFrString`` reads
    them (sign-extended, deltas resolved). Raises :class:`RLEError` on a character outside '0'..'o' or a
    value cut off at the end of the string."""
    data = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    p, n = 0, len(data)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise RLEError(f"counts ends in the middle of run {len(runs) + 1} (a continued character at "
                               f"the end)")
            ch = data[p]
            if not _FIRST <= ch <= _LAST:
                raise RLEError(f"counts holds {chr(ch)!r} at position {p}, outside the RLE alphabet '0'..'o'")
            c = ch - _FIRST
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
            if k > 13:  # 64 bits: no real run length is that long
                raise RLEError(f"counts run {len(runs) + 1} is longer than 64 bits")
        if len(runs) > 2:  # rleFrString: m > 2 (the index of this run), so from the 4th run on
            x += runs[-2]
        runs.append(x)
    return runs


def check_runs(runs: list[int], h: int, w: int) -> None:
    """Run lengths must be non-negative and add up to ``h * w``."""
    neg = next((i for i, r in enumerate(runs) if r < 0), None)
    if neg is not None:
        raise RLEError(f"run {neg + 1} of the RLE has negative length {runs[neg]}")
    total = sum(runs)
    if total != h * w:
        raise RLEError(f"the RLE runs cover {total} pixels, its size {h}x{w} (HxW) has {h * w}")


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def check_size(size, h: Optional[int] = None, w: Optional[int] = None) -> tuple[int, int]:
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
        raise RLEError(f"'size' must be [height, width] (two non-negative integers), got {size!r}")
    if h is not None and (int(size[0]), int(size[1])) != (h, w):
        raise RLEError(f"the mask is {size[1]}x{size[0]} (WxH), the image is {w}x{h}")
    return int(size[0]), int(size[1])


def check_segmentation(seg, h: Optional[int] = None, w: Optional[int] = None, values: bool = True) -> None:
    """A COCO segmentation: polygons (lists of >= 3 x, y pairs), an uncompressed RLE (counts a list of
    integers) or a compressed one (counts a string). With ``h``, ``w``, its size must be the image's.
    ``values=False`` skips the per-coordinate check of polygons (millions of them in COCO train)."""
    if isinstance(seg, list):
        if not seg:
            raise RLEError("the polygon list is empty")
        for i, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                raise RLEError(f"polygon {i} must be a flat list of at least 3 x, y pairs")
            if values and not all(isinstance(v, Real) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
                       for v in poly):
                raise RLEError(f"polygon {i} holds a value that is not a finite number")
        return
    if not isinstance(seg, dict):
        raise RLEError(f"a segmentation must be polygons or an RLE dict, not a {type(seg).__name__}")
    if "size" not in seg or "counts" not in seg:
        raise RLEError(f"an RLE needs 'size' and 'counts'; it has {sorted(seg)}")
    hh, ww = check_size(seg["size"], h, w)
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(_is_int(v) for v in counts):
            raise RLEError("an uncompressed RLE's counts must all be integers")
        check_runs([int(v) for v in counts], hh, ww)
    elif isinstance(counts, (str, bytes)):
        check_runs(decode_counts(counts), hh, ww)
    else:
        raise RLEError(f"'counts' must be a string (compressed RLE) or a list of integers, not "
                       f"{type(counts).__name__}")
