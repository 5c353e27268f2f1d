"""OpenAI's fix for filter-induced bias: importance weights from a deliberately weak probe.

A filter removes images unevenly (in DALL·E 2's data, more images of women than of men). Train a linear
probe on equal-sized samples of the unfiltered set (label 1) and the filtered set (label 0); with balanced
classes its odds ``p / (1 - p)`` estimate the density ratio ``P(x | unfiltered) / P(x | filtered)``, i.e.
how much the filter depleted the region of embedding space around ``x``. Each kept sample gets that ratio
as its training weight, clipped at ``max_weight`` and normalised to mean 1 over the kept set, so weighted
statistics of the filtered set look like those of the unfiltered set. The probe is weak on purpose (strong
L2 regularisation): it should learn broad directions (a whole family of images that lost members), not
memorise the individual images the filter removed.

Why calibration: a probe that separated kept from removed images perfectly would learn the filter itself
and give the surviving members of a thinned-out family weight 1 (the removed images sit elsewhere in
embedding space). Strong L2 regularisation keeps only a coarse direction (close to the difference of the
class means: "this family lost members"), but it also shrinks every probability towards 0.5, i.e. every
weight towards 1. So the probe's direction comes from the strongly regularised fit and its scale from a
one-dimensional logistic fit of the labels on the probe's scores (Platt scaling, two parameters): weak in
what it can see, calibrated in how much it says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curation_assets.core.stats import kish_effective_n


def _inverse_strength(regularization: float, n_train: int) -> float:
    if regularization <= 0:
        raise ValueError(f"regularization must be positive, got {regularization}")
    return 1.0 / (regularization * max(1, n_train))


def weights_from_probabilities(p: np.ndarray, max_weight: float | None = None, eps: float = 1e-6) -> np.ndarray:
    """``w = p / (1 - p)``, clipped at ``max_weight`` (when given), then normalised to mean 1.

    Clipping happens before normalisation: ``max_weight`` bounds the raw odds, so it is in the units of
    the density ratio ("an image may stand in for at most this many images").
    """
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    w = p / (1.0 - p)
    if max_weight is not None:
        if max_weight <= 0:
            raise ValueError(f"max_weight must be positive, got {max_weight}")
        w = np.minimum(w, max_weight)
    if len(w) == 0:
        return w
    return w / w.mean()


@dataclass
class ProbeResult:
    weights: np.ndarray  # one per kept sample, mean 1
    probabilities: np.ndarray  # P(unfiltered | x) for each kept sample
    n_train_per_class: int
    train_accuracy: float  # held-out when calibrated
    clipped_fraction: float
    effective_sample_size: float
    coef_norm: float


def fit_weights(x: np.ndarray, kept: np.ndarray, regularization: float = 0.0015, max_weight: float = 10.0,
                max_train_per_class: int = 50_000, seed: int = 0, calibrate: bool = True,
                n_folds: int = 5) -> ProbeResult:
    """Fit the weak probe and weight every kept sample.

    ``x``: embeddings of the whole set before filtering (n x d); ``kept``: boolean mask of the samples
    the filter kept. Weights come back for ``x[kept]`` in that order. ``regularization`` is the L2 penalty
    per training sample, lambda in ``mean log-loss + lambda / 2 * |w|^2`` (larger is weaker), i.e.
    scikit-learn's ``C = 1 / (lambda * n_train)``: the probe stays equally weak whatever the corpus size,
    where a fixed ``C`` would let it grow strong enough on a large corpus to learn the filter itself. Both classes are
    subsampled to the same size ``min(n, n_kept, max_train_per_class)`` with ``seed``; since the kept set
    is part of the unfiltered set, the same image can be drawn into both classes.

    ``calibrate`` rescales the probe's scores with Platt scaling (see the module docstring), cross-fitted
    over ``n_folds`` folds that split by image, so a held-out image's twin in the other class is never in
    the training folds; ``train_accuracy`` is then the held-out accuracy. Without it the raw probabilities
    of the regularised fit are used.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float32)
    kept = np.asarray(kept, dtype=bool)
    if kept.shape != (len(x),):
        raise ValueError(f"kept mask has shape {kept.shape}, expected ({len(x)},)")
    x_kept = x[kept]
    if len(x_kept) == 0:
        return ProbeResult(np.zeros(0), np.zeros(0), 0, float("nan"), 0.0, 0.0, 0.0)
    m = min(len(x), len(x_kept), int(max_train_per_class))
    if m < 2:
        raise ValueError(f"need at least 2 samples per class to fit the probe, got {m}")
    rng = np.random.default_rng(seed)
    pos = rng.choice(len(x), m, replace=False)
    neg = np.flatnonzero(kept)[rng.choice(len(x_kept), m, replace=False)]
    rows = np.concatenate([pos, neg])
    xt = x[rows]
    y = np.concatenate([np.ones(m), np.zeros(m)])
    if calibrate:
        # cross-fitted by image: each fold's probe scores held-out images, so the calibration sees honest
        # scores and a direction that only fits sampling noise gets a slope near 0 (weights near 1)
        image_fold = rng.permutation(len(x)) % n_folds
        folds = image_fold[rows]
        held_out = np.empty(len(y))
        scores_kept = np.zeros(len(x_kept))
        norms = []
        for k in range(n_folds):
            train = folds != k
            probe = LogisticRegression(C=_inverse_strength(regularization, int(train.sum())), max_iter=1000)
            probe.fit(xt[train], y[train])
            held_out[folds == k] = probe.decision_function(xt[folds == k])
            scores_kept += probe.decision_function(x_kept) / n_folds
            norms.append(float(np.linalg.norm(probe.coef_)))
        scale = LogisticRegression(C=1e6, max_iter=1000).fit(held_out[:, None], y)
        p = scale.predict_proba(scores_kept[:, None])[:, 1]
        accuracy = float(scale.score(held_out[:, None], y))
        coef_norm = float(np.mean(norms))
    else:
        probe = LogisticRegression(C=_inverse_strength(regularization, len(y)), max_iter=1000).fit(xt, y)
        p = probe.predict_proba(x_kept)[:, 1]
        accuracy = float(probe.score(xt, y))
        coef_norm = float(np.linalg.norm(probe.coef_))
    raw = np.clip(p, 1e-6, 1 - 1e-6)
    raw = raw / (1 - raw)
    w = weights_from_probabilities(p, max_weight)
    return ProbeResult(
        weights=w, probabilities=p, n_train_per_class=m,
        train_accuracy=accuracy,
        clipped_fraction=float(np.mean(raw > max_weight)) if max_weight else 0.0,
        effective_sample_size=kish_effective_n(w),
        coef_norm=coef_norm,
    )
