"""Interval estimates and tests for proportions and ratios, shared by every stage that reports rates.

- :func:`wilson_interval`: score interval for one binomial proportion (Wilson 1927), also for weighted
  data through the Kish effective sample size.
- :func:`newcombe_interval`: hybrid score interval for a difference of two independent proportions
  (Newcombe 1998, method 10).
- :func:`risk_ratio_interval`: log-method (Katz 1978) interval for a ratio of two independent proportions.
- :func:`count_ratio_interval`: log-method interval for the ratio of two (possibly weighted) counts, e.g.
  captions mentioning women vs captions mentioning men in one set; var(log S) ~ sum(w^2) / (sum w)^2.
- :func:`two_proportion_ztest`: pooled two-sided z-test of p1 == p2.

All functions take plain numbers and return plain floats; ``nan`` marks an undefined estimate (a zero
denominator) rather than raising, so a table of many groups never fails on one empty cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np


def z_value(confidence: float = 0.95) -> float:
    """Two-sided standard normal quantile for a confidence level (1.959964 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.estimate, self.low, self.high)


def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a proportion ``successes / n`` (no continuity correction).

    Non-integer inputs are allowed (weighted data: pass the weighted share times the effective sample size).
    """
    if n <= 0:
        return Interval(math.nan, math.nan, math.nan)
    if successes < 0 or successes > n:
        raise ValueError(f"successes must lie in [0, n]; got {successes} of {n}")
    z = z_value(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def kish_effective_n(weights: np.ndarray) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` (equals n for unit weights)."""
    w = np.asarray(weights, dtype=np.float64)
    s2 = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / s2 if s2 > 0 else 0.0


def weighted_wilson_interval(weight_in: float, weight_total: float, weight_sq_total: float,
                             confidence: float = 0.95) -> Interval:
    """Wilson interval for a weighted share ``weight_in / weight_total``, using the Kish effective sample
    size ``weight_total^2 / weight_sq_total`` of the whole set as n. Reduces to :func:`wilson_interval`
    for unit weights."""
    if weight_total <= 0 or weight_sq_total <= 0:
        return Interval(math.nan, math.nan, math.nan)
    share = weight_in / weight_total
    n_eff = weight_total**2 / weight_sq_total
    return wilson_interval(min(max(share, 0.0), 1.0) * n_eff, n_eff, confidence)


def newcombe_interval(x1: float, n1: float, x2: float, n2: float, confidence: float = 0.95) -> Interval:
    """Newcombe's hybrid score interval for ``x1/n1 - x2/n2`` (independent samples), built from the two
    Wilson intervals (Newcombe 1998, Statistics in Medicine 17:873-890, method 10)."""
    if n1 <= 0 or n2 <= 0:
        return Interval(math.nan, math.nan, math.nan)
    a = wilson_interval(x1, n1, confidence)
    b = wilson_interval(x2, n2, confidence)
    p1, p2 = a.estimate, b.estimate
    d = p1 - p2
    low = d - math.sqrt((p1 - a.low) ** 2 + (b.high - p2) ** 2)
    high = d + math.sqrt((a.high - p1) ** 2 + (p2 - b.low) ** 2)
    return Interval(d, low, high)


def risk_ratio_interval(x1: float, n1: float, x2: float, n2: float, confidence: float = 0.95) -> Interval:
    """Log-method (Katz) interval for the ratio of independent proportions ``(x1/n1) / (x2/n2)``:
    ``exp(log RR +- z * sqrt(1/x1 - 1/n1 + 1/x2 - 1/n2))``. Undefined (nan) when either count is 0."""
    if n1 <= 0 or n2 <= 0 or x1 <= 0 or x2 <= 0:
        rr = (x1 / n1) / (x2 / n2) if n1 > 0 and n2 > 0 and x2 > 0 else math.nan
        return Interval(rr, math.nan, math.nan)
    rr = (x1 / n1) / (x2 / n2)
    se = math.sqrt(max(1 / x1 - 1 / n1 + 1 / x2 - 1 / n2, 0.0))
    z = z_value(confidence)
    return Interval(rr, rr * math.exp(-z * se), rr * math.exp(z * se))


def count_ratio_interval(a: float, b: float, a_sq: float | None = None, b_sq: float | None = None,
                         confidence: float = 0.95) -> Interval:
    """Log-method interval for the ratio ``a / b`` of two counts (Poisson approximation).

    ``a`` and ``b`` may be sums of weights; ``a_sq`` / ``b_sq`` are then the sums of squared weights
    (default: equal to the counts, i.e. unit weights), and ``var(log a) ~ a_sq / a^2``.
    """
    a_sq = a if a_sq is None else a_sq
    b_sq = b if b_sq is None else b_sq
    if a <= 0 or b <= 0:
        return Interval(a / b if b > 0 else math.nan, math.nan, math.nan)
    ratio = a / b
    se = math.sqrt(a_sq / a**2 + b_sq / b**2)
    z = z_value(confidence)
    return Interval(ratio, ratio * math.exp(-z * se), ratio * math.exp(z * se))


@dataclass(frozen=True)
class TestResult:
    statistic: float
    p_value: float


def two_proportion_ztest(x1: float, n1: float, x2: float, n2: float) -> TestResult:
    """Pooled two-sided z-test of ``x1/n1 == x2/n2`` (equivalent to the 2x2 chi-square test without
    continuity correction: ``z^2 == chi2``). Returns z (positive when the first share is larger) and p."""
    if n1 <= 0 or n2 <= 0:
        return TestResult(math.nan, math.nan)
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if var <= 0:
        return TestResult(0.0, 1.0)
    z = (p1 - p2) / math.sqrt(var)
    return TestResult(z, 2.0 * NormalDist().cdf(-abs(z)))


def bonferroni_level(alpha: float, n_tests: int) -> float:
    """Per-test significance level that keeps the family-wise error rate at ``alpha``."""
    return alpha / max(1, int(n_tests))


def uniform_keys(uids: Sequence[str], seed: int, salt: str) -> np.ndarray:
    """A deterministic pseudo-random number in [0, 1) per uid (a hash of seed, salt and uid): the same row
    gets the same number in every pass and every process, so shards can be sampled one at a time."""
    import hashlib

    out = np.empty(len(uids), np.float64)
    prefix = f"{seed}:{salt}:".encode()
    for i, uid in enumerate(uids):
        out[i] = int.from_bytes(hashlib.blake2b(prefix + uid.encode(), digest_size=8).digest(), "little") / 2.0 ** 64
    return out
