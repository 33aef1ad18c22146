"""The speed protocol's statistics (docs/speed.md): per-row summary from the median, FPS ratios to a
reference row with a bootstrap interval over whole rounds, the pairs of rows that cannot be ranked, and the
mean per-component breakdown."""
from __future__ import annotations

from typing import Optional

import numpy as np

CI_LEVEL = 0.95  # the ratios' bootstrap interval (our choice; the paper reports no interval)
BOOTSTRAP_RESAMPLES = 2000


def summarize(times: list[float], batch: int) -> dict:
    """Per-iteration seconds -> the row's statistics (ms) and FPS from the median."""
    ms = 1000 * np.asarray(times, dtype=np.float64)
    median = float(np.median(ms))
    return {"fps": 1000 * batch / median, "ms_median": median, "ms_mean": float(ms.mean()),
            "ms_p5": float(np.percentile(ms, 5)), "ms_p95": float(np.percentile(ms, 95)),
            "ms_std": float(ms.std()), "n_iters": len(ms), "seconds_timed": float(ms.sum() / 1000)}


def bootstrap_medians(times: list[list[float]], resamples: int, seed: int) -> np.ndarray:
    """(resamples, rows) medians of rounds drawn with replacement (the same rounds for every row)."""
    t = np.asarray(times, dtype=np.float64)  # (rows, rounds)
    idx = np.random.default_rng(seed).integers(0, t.shape[1], size=(resamples, t.shape[1]))
    return np.median(t[:, idx], axis=2).T


def speed_ratios(times: list[list[float]], reference: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> list[dict]:
    """Per row: FPS relative to row ``reference`` (= its median time over the row's) and a bootstrap
    interval (:data:`CI_LEVEL`) from resampled rounds."""
    med = np.median(np.asarray(times, dtype=np.float64), axis=1)
    boot = bootstrap_medians(times, resamples, seed)
    out = []
    for i in range(len(times)):
        lo, hi = _ratio_interval(boot, i, reference)
        out.append({"ratio": float(med[reference] / med[i]), "ci_low": lo, "ci_high": hi})
    return out


def _ratio_interval(boot: np.ndarray, row: int, over: int) -> tuple[float, float]:
    """The :data:`CI_LEVEL` interval of row ``over``'s median time over row ``row``'s (the speed of ``row``
    relative to ``over``) across the bootstrap resamples."""
    r = boot[:, over] / boot[:, row]
    return (float(np.percentile(r, 100 * (1 - CI_LEVEL) / 2)), float(np.percentile(r, 100 * (1 + CI_LEVEL) / 2)))


def unrankable(times: list[list[float]], labels: list[str], resamples: int = BOOTSTRAP_RESAMPLES,
               seed: int = 0) -> list[tuple[str, str, float, float]]:
    """Pairs of rows whose speed-ratio interval contains 1: (faster-looking, slower-looking, low, high)."""
    boot = bootstrap_medians(times, resamples, seed)
    med = np.median(np.asarray(times, dtype=np.float64), axis=1)
    pairs = []
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            a, b = (i, j) if med[i] <= med[j] else (j, i)
            lo, hi = _ratio_interval(boot, a, b)  # > 1 where a is faster
            if lo <= 1.0 <= hi:
                pairs.append((labels[a], labels[b], lo, hi))
    return pairs


def rank_warning(pairs: list[tuple[str, str, float, float]]) -> Optional[str]:
    if not pairs:
        return None
    names = "; ".join(f"{a} vs {b} (ratio interval {lo:.2f}-{hi:.2f})" for a, b, lo, hi in pairs)
    return (f"warning: spread too wide to rank these rows, their {CI_LEVEL:.0%} speed-ratio interval contains "
            f"1: {names}. Time longer (bench.min_time / --min-time) or on a quieter machine.")


def mean_breakdown(parts: list[dict[str, float]], times: list[float], names: list[str]) -> dict[str, float]:
    """Mean ms per forward of each component over the timed iterations, "total" (the mean measured forward)
    and "other" (the total minus the parts), so that the parts add up to the measured forward."""
    n = len(times)
    out = {name: 1000 * sum(p.get(name, 0.0) for p in parts) / n for name in names}
    total = 1000 * sum(times) / n
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out
