"""Recall-first thresholds: filter out all the bad data rather than keep all the good.

The rule, per category: on held-out (cross-validated) scores of the labelled data, take the *highest*
threshold whose recall on the labelled positives is at least the target. That is the k-th highest positive
score with k = ceil(target * n_positives). What it costs is reported as the precision at that threshold, and
how sure we are of the recall as the Wilson interval of caught / n_positives.

The target counts as reachable only when there are at least ``required_positives`` labelled positives
(default ceil(1 / (1 - target)): with fewer, one missed positive already drops recall below the target, so
the labels cannot tell a 99% filter from a 95% one). When it is not reachable the result says how many more
positives are needed; separately it says how many more positives (all caught) would lift the Wilson lower
bound to the target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from curation_assets.core.stats import wilson_interval


@dataclass(frozen=True)
class ThresholdResult:
    target_recall: float
    threshold: float
    n_positive: int
    n_negative: int
    caught: int
    recall: float
    recall_low: float
    recall_high: float
    false_positives: int
    precision: float
    flag_rate_negatives: float
    reachable: bool
    required_positives: int
    positives_needed: int
    positives_needed_for_bound: int | None
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


def recall_threshold(pos_scores: np.ndarray, neg_scores: np.ndarray, target: float,
                     required_positives: int | None = None, confidence: float = 0.95) -> ThresholdResult:
    """The highest threshold whose recall on ``pos_scores`` is >= ``target`` (a sample is flagged when its
    score is >= the threshold), with the precision it costs against ``neg_scores``."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target recall must lie in (0, 1), got {target}")
    pos = np.sort(np.asarray(pos_scores, dtype=np.float64))[::-1]
    neg = np.asarray(neg_scores, dtype=np.float64)
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("scores contain NaN")
    n_pos, n_neg = len(pos), len(neg)
    required = required_positives if required_positives is not None else int(math.ceil(1.0 / (1.0 - target) - 1e-9))
    if n_pos == 0:
        return ThresholdResult(target, 0.0, 0, n_neg, 0, math.nan, math.nan, math.nan, n_neg,
                               math.nan, 1.0 if n_neg else math.nan, False, required, required, None,
                               f"no labelled positives: label at least {required} positives")
    k = int(math.ceil(target * n_pos - 1e-9))
    threshold = float(pos[k - 1])
    caught = int(np.sum(pos >= threshold))
    fp = int(np.sum(neg >= threshold))
    interval = wilson_interval(caught, n_pos, confidence)
    misses = n_pos - caught
    reachable = n_pos >= required
    needed = max(0, required - n_pos)
    needed_bound = positives_needed_for_bound(misses, n_pos, target, confidence)
    if reachable:
        message = (f"recall {caught}/{n_pos} = {caught / n_pos:.4f} >= {target} at threshold {threshold:.4g}, "
                   f"precision {caught / (caught + fp):.4f}")
    else:
        message = (f"target recall {target} not reachable with {n_pos} labelled positives: the held-out recall "
                   f"needs at least {required}; label {needed} more positives")
    if interval.low < target:
        message += ("; Wilson lower bound of recall "
                    f"{interval.low:.4f} < {target}: "
                    + (f"{needed_bound} more positives, all caught, would lift it to the target"
                       if needed_bound is not None else "more positives alone cannot lift it"))
    return ThresholdResult(
        target_recall=target, threshold=threshold, n_positive=n_pos, n_negative=n_neg, caught=caught,
        recall=caught / n_pos, recall_low=interval.low, recall_high=interval.high, false_positives=fp,
        precision=caught / (caught + fp), flag_rate_negatives=fp / n_neg if n_neg else math.nan,
        reachable=reachable, required_positives=required, positives_needed=needed,
        positives_needed_for_bound=needed_bound, message=message,
    )


def positives_needed_for_bound(misses: int, n_positive: int, target: float, confidence: float = 0.95,
                               limit: int = 10_000_000) -> int | None:
    """How many more labelled positives, all of them caught, lift the Wilson lower bound of recall
    ``(n - misses) / n`` to ``target``; 0 if it is already there, None if it cannot within ``limit``."""

    def low(extra: int) -> float:
        n = n_positive + extra
        return wilson_interval(n - misses, n, confidence).low if n > 0 else 0.0

    if low(0) >= target:
        return 0
    if low(limit) < target:
        return None
    lo, hi = 0, 1
    while low(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if low(mid) >= target else (mid, hi)
    return hi


def precision_at_recall(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """Precision at the recall-first threshold for ``target`` (nan without positives)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return math.nan
    return recall_threshold(scores[labels], scores[~labels], target, required_positives=1).precision
