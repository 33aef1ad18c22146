"""Seed statistics of every report: mean, sample standard deviation, n and a 95% interval of the mean
(Student's t), and the difference of two means with Welch's interval ("within noise" when it includes zero).

The level (95%) is our choice (the paper reports single runs, no interval); :data:`LEVEL` changes it. With
n = 1 no standard deviation and no interval exist: the fields are NaN and the writers say so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LEVEL = 0.95  # two-sided confidence level of every interval (our choice; the paper gives none)
NAN = float("nan")


def _t(df: float, level: float = LEVEL) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Stat:
    """Mean of ``n`` values with their sample std (ddof 1) and the ``LEVEL`` interval of the mean (NaN for
    n < 2)."""
    mean: float
    std: float
    n: int
    lo: float
    hi: float

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and not math.isnan(self.lo)


def describe(values) -> Stat:
    """The :class:`Stat` of ``values`` (NaN values are left out; none left: n = 0, mean NaN)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Stat(NAN, NAN, 0, NAN, NAN)
    mean = math.fsum(xs) / n
    if n == 1:
        return Stat(mean, NAN, 1, NAN, NAN)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = _t(n - 1) * std / math.sqrt(n)
    return Stat(mean, std, n, mean - half, mean + half)


@dataclass(frozen=True)
class Diff:
    """``a`` minus ``b`` with its ``LEVEL`` interval (NaN when a side has n < 2); ``within_noise``: the
    interval includes zero (None: no interval)."""
    value: float
    lo: float
    hi: float
    df: float

    @property
    def has_interval(self) -> bool:
        return not math.isnan(self.lo)

    @property
    def within_noise(self) -> bool | None:
        if not self.has_interval:
            return None
        return self.lo <= 0.0 <= self.hi


def welch(a: Stat, b: Stat) -> Diff:
    """Welch's interval of ``a.mean - b.mean`` (unequal variances, Welch-Satterthwaite degrees of freedom).
    Both sides exact (std 0, e.g. a parameter count): a zero-width interval at the difference."""
    d = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return Diff(d, NAN, NAN, NAN)
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se2 = va + vb
    if se2 == 0.0:
        return Diff(d, d, d, math.inf)
    df = se2 ** 2 / ((va ** 2 / (a.n - 1) if va else 0.0) + (vb ** 2 / (b.n - 1) if vb else 0.0))
    half = _t(df) * math.sqrt(se2)
    return Diff(d, d - half, d + half, df)


def against_value(a: Stat, value: float) -> Diff:
    """``a.mean - value`` for a published number without a spread: the interval is ``a``'s own (one-sample
    t), NaN for n < 2."""
    d = a.mean - value
    if not a.has_interval:
        return Diff(d, NAN, NAN, NAN)
    return Diff(d, a.lo - value, a.hi - value, a.n - 1)


def noise_word(diff: Diff) -> str:
    """'within noise', 'beyond noise', or 'no interval (n = 1)'."""
    if not diff.has_interval:
        return "no interval (n = 1)"
    return "within noise" if diff.within_noise else "beyond noise"
