"""Small-sample statistics for runs over a few seeds: Student's t quantile, the 95% interval
of a mean, and Welch's interval for the difference of two means.

scipy is not a dependency and torch.distributions.StudentT has no icdf (it raises
NotImplementedError), so the t quantile is computed here: the CDF by integrating the
density from 0 (Simpson's rule; the density is smooth and bounded there), inverted by
Newton's method. Welch's degrees of freedom are fractional, so a table of integer
degrees would not do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Any

CONFIDENCE = 0.95


def _density(x: float, df: float, log_scale: float) -> float:
    """Student's t density at x (log_scale: the log of its normalizing constant)."""
    return math.exp(log_scale - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (> 0, may be fractional) degrees of freedom."""
    if t < 0:
        return 1.0 - t_cdf(-t, df)
    log_scale = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    steps = 2 * max(100, math.ceil(t * 100))  # even; h <= 0.005: error far below 1e-9
    h = t / steps
    total = _density(0.0, df, log_scale) + _density(t, df, log_scale)
    for i in range(1, steps):
        total += (4 if i % 2 else 2) * _density(i * h, df, log_scale)
    return min(1.0, 0.5 + total * h / 3)


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, for p in (0.5, 1) and df >= 0.5 degrees of freedom."""
    if not 0.5 < p < 1 or not df >= 0.5:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 0.5, got p={p}, df={df}")
    log_scale = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    # The normal quantile lies below the t quantile, and the CDF is concave for t > 0, so
    # Newton's steps from there approach the root from below without overshooting it.
    t = NormalDist().inv_cdf(p)
    for _ in range(200):
        step = (p - t_cdf(t, df)) / _density(t, df, log_scale)
        t += step
        if abs(step) < 1e-10 * max(1.0, t):
            break
    return t


def mean_interval(mean: float, std: float | None, n: int) -> tuple[float, float] | None:
    """The 95% confidence interval of a mean of n values with sample std `std` (None: n < 2)."""
    if std is None or n < 2:
        return None
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    return (mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with Welch's 95% interval (None when either side has n < 2)."""

    estimate: float
    interval: tuple[float, float] | None
    n_a: int
    n_b: int
    df: float | None  # Welch-Satterthwaite degrees of freedom

    @property
    def spans_zero(self) -> bool:
        return self.interval is None or self.interval[0] <= 0 <= self.interval[1]


def welch_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> Difference | None:
    """The difference of two groups' means from their aggregate stats (n, mean, std), with
    Welch's interval (unequal variances); None when either group has no value."""
    if not a.get("n") or not b.get("n"):
        return None
    estimate = a["mean"] - b["mean"]
    if a["n"] < 2 or b["n"] < 2:
        return Difference(estimate, None, a["n"], b["n"], None)
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    if va + vb == 0:  # every run of both groups ended on the same number: no spread to test
        return Difference(estimate, (estimate, estimate), a["n"], b["n"], None)
    df = (va + vb) ** 2 / (va**2 / (a["n"] - 1) + vb**2 / (b["n"] - 1))
    half = t_quantile(0.5 + CONFIDENCE / 2, df) * math.sqrt(va + vb)
    return Difference(estimate, (estimate - half, estimate + half), a["n"], b["n"], df)
