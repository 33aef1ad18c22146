"""Counting pixels a run at a time: the shared core of the panoptic and semantic scorers.

Label and segment maps are piecewise constant, so two maps scored together (ground truth and prediction)
split, in raster order, into runs of pixels whose pair of values does not change. Finding the runs takes
three comparisons per pixel; everything else (look-ups, validity checks, the bincount) then works on one
value pair per run, weighted by its length, and gives exactly the per-pixel counts.
"""
from __future__ import annotations

import numpy as np


def runs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat maps a, b (N,) -> (starts (R,), lengths (R,) int64) of the runs of equal (a, b) pixel pairs in
    raster order. Segment maps are piecewise constant (a 640x427 COCO pair has about 11k runs for 273k
    pixels), so counting runs weighted by their lengths gives the per-pixel counts exactly while everything
    per pixel is three comparisons; a map of pixel noise degrades to one run per pixel, still exact."""
    n = a.size
    if n == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.int64)
    change = np.not_equal(a[1:], a[:-1])
    change |= np.not_equal(b[1:], b[:-1])
    starts = np.concatenate((np.zeros(1, np.intp), np.nonzero(change)[0] + 1))
    return starts, np.diff(starts, append=n)


def weighted_counts(codes: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """``np.bincount(codes, weights, minlength=size)`` as exact int64 (float64 sums of integers < 2^53)."""
    return np.rint(np.bincount(codes, weights=weights, minlength=size)).astype(np.int64)
