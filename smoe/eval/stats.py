"""The statistics of a head-to-head: Student-t intervals over seeds, paired differences between architectures,
and the Holm correction over a report's comparisons. Pure numpy + math (scipy is not a dependency), so the
t distribution is computed here from the regularized incomplete beta function.

Seeds are paired: seed s gives every architecture the same data order and validation split, so a comparison of
two architectures is a one-sample t-test on the per-seed differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05  # family-wise error rate of a report's comparisons
POWER = 0.8  # for the minimum detectable difference


# --- the t distribution --------------------------------------------------------------------------------------------


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by the continued fraction of Numerical Recipes §6.4 (modified Lentz),
    evaluated on the side of x where it converges fast."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x: must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    # converges in O(sqrt(max(a, b))) terms; 2 df = a of 10^6 needs a few thousand
    for m in range(1, 100_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t, by bisection on t_cdf (monotone, so bisection cannot fail)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p: must lie in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df: must be positive, got {df}")
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


# --- intervals over seeds ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Mean of n per-seed values, their sample sd, and the t interval of the mean at ``level`` (NaN bounds and sd
    for n = 1: one seed measures no spread)."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    level: float

    @property
    def half(self) -> float:
        return self.high - self.mean


def interval(values, level: float = 1 - ALPHA) -> Interval:
    """mean ± t_{(1+level)/2, n-1} * sd / sqrt(n)."""
    arr = np.asarray(values, dtype=np.float64)
    n, mean = len(arr), float(arr.mean())
    if n < 2:
        return Interval(n, mean, math.nan, math.nan, math.nan, level)
    sd = float(arr.std(ddof=1))
    half = t_ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half, level)


def ci_text(values, digits: int = 4, sign: str = "") -> str:
    """``mean ± half-width of the 95% t-interval`` over seeds; the mean alone for one seed."""
    iv = interval(values)
    mean = f"{iv.mean:{sign}.{digits}f}"
    return mean if iv.n < 2 else f"{mean} ± {iv.half:.{digits}f}"


def spread_note(n: int) -> str:
    if n < 2:
        return "One seed: each number is that run's, with no interval."
    return f"± is the half-width of the 95% t-interval of the mean over {n} seeds."


def band(values_SN, level: float = 1 - ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Per column of an (S seeds, N points) array: the lower and upper t interval of the mean over seeds."""
    arr = np.asarray(values_SN, dtype=np.float64)
    n = arr.shape[0]
    half = t_ppf((1 + level) / 2, n - 1) * arr.std(0, ddof=1) / math.sqrt(n)
    mean = arr.mean(0)
    return mean - half, mean + half


# --- paired comparisons with the Holm correction -------------------------------------------------------------------


@dataclass(frozen=True)
class Paired:
    """One comparison ``a - b`` over n paired seeds. ``ci`` is at the level Holm assigns it (see ``holm``), ``mdd``
    the minimum detectable difference at that level and power ``POWER``; ``resolved`` is True when Holm rejects
    "no difference", which is exactly when ``ci`` excludes 0. With n = 1 the p-value, CI and mdd are NaN and
    nothing is resolved."""

    a: str
    b: str
    diffs: tuple[float, ...]
    mean: float
    sd: float
    p: float
    ci: tuple[float, float]
    level: float
    mdd: float
    resolved: bool

    @property
    def n(self) -> int:
        return len(self.diffs)


def paired_p(diffs) -> float:
    """Two-sided p-value of the paired t-test of mean(diffs) = 0, with n - 1 degrees of freedom."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n < 2:
        return math.nan
    sd = float(d.std(ddof=1))
    if sd == 0.0:  # identical differences: certain if non-zero, and no evidence at all if zero
        return 1.0 if d.mean() == 0.0 else 0.0
    t = float(d.mean()) / (sd / math.sqrt(n))
    return betainc((n - 1) / 2, 0.5, (n - 1) / (n - 1 + t * t))  # P(|T| > |t|), without the cancellation of 1 - cdf


def holm_levels(pvalues: list[float], alpha: float = ALPHA) -> tuple[list[float], list[bool]]:
    """Holm–Bonferroni step-down over m p-values: sorted ascending, the one of rank i (1-based) is tested at
    alpha / (m - i + 1), and rejections stop at the first that fails. Returns each comparison's per-comparison
    significance level and whether it is rejected.

    The level is alpha / (m - i + 1) up to the first failing rank f, and alpha / (m - f + 1) from f on, so that a
    comparison's interval at 1 - level excludes 0 exactly when Holm rejects it (a later p-value can fall under its
    own step's level after an earlier one failed; Holm still keeps it). These are the per-step levels, not
    simultaneous-coverage intervals: every one is at least as wide as the uncorrected 1 - alpha interval, and no
    wider than Bonferroni's 1 - alpha / m."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    levels, rejected = [alpha] * m, [False] * m
    failed_at = None
    for rank, i in enumerate(order, 1):
        step = rank if failed_at is None else failed_at
        levels[i] = alpha / (m - step + 1)
        if failed_at is None and pvalues[i] <= levels[i]:
            rejected[i] = True
        elif failed_at is None:
            failed_at = rank
    return levels, rejected


def compare_pairs(pairs: list[tuple[str, str]], values: dict[str, list[float]], alpha: float = ALPHA,
                  power: float = POWER) -> list[Paired]:
    """Every ``(a, b)`` as the paired difference values[a][s] - values[b][s] over seeds s, Holm-corrected over
    this whole list of comparisons (m = len(pairs))."""
    diffs = [np.asarray(values[a], dtype=np.float64) - np.asarray(values[b], dtype=np.float64) for a, b in pairs]
    pvalues = [paired_p(d) for d in diffs]
    if any(math.isnan(p) for p in pvalues):
        levels, rejected = [alpha] * len(pairs), [False] * len(pairs)
    else:
        levels, rejected = holm_levels(pvalues, alpha)
    out = []
    for (a, b), d, p, level, rej in zip(pairs, diffs, pvalues, levels, rejected, strict=True):
        n, mean = len(d), float(d.mean())
        if n < 2:
            out.append(Paired(a, b, tuple(d.tolist()), mean, math.nan, math.nan, (math.nan, math.nan), level,
                              math.nan, False))
            continue
        sd = float(d.std(ddof=1))
        half = t_ppf(1 - level / 2, n - 1) * sd / math.sqrt(n)
        out.append(Paired(a, b, tuple(d.tolist()), mean, sd, p, (mean - half, mean + half), level,
                          detectable(sd, n, level, power), rej))
    return out


# --- design --------------------------------------------------------------------------------------------------------


def detectable(sd: float, n: int, level: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference a paired t-test on n seeds resolves with probability ``power`` at the
    two-sided ``level``, for differences of standard deviation ``sd``: (t_{1-level/2, n-1} + t_{power, n-1}) sd/√n
    (the usual approximation; NaN below 2 seeds)."""
    if n < 2:
        return math.nan
    return (t_ppf(1 - level / 2, n - 1) + t_ppf(power, n - 1)) * sd / math.sqrt(n)


def seeds_needed(sd: float, gap: float, level: float = ALPHA, power: float = POWER, most: int = 10_000) -> int | None:
    """The fewest seeds whose detectable difference (``detectable``) is at most ``gap``; None beyond ``most``."""
    if not (sd >= 0 and gap > 0):
        raise ValueError(f"seeds_needed: needs sd >= 0 and gap > 0, got {sd} and {gap}")
    low, high = 2, 2
    while detectable(sd, high, level, power) > gap:
        if high >= most:
            return None
        low, high = high, min(2 * high, most)
    while low < high:  # the detectable difference falls with n: bisect for the first n at or under the gap
        mid = (low + high) // 2
        low, high = (mid + 1, high) if detectable(sd, mid, level, power) > gap else (low, mid)
    return high
