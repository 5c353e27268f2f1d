"""OpenAI's fix for filter-induced bias: importance weights from a deliberately weak probe.

A filter removes images unevenly (in DALL·E 2's data, more images of women than of men). Train a linear
probe on the unfiltered set (label 1) and the filtered set (label 0) with equal class weights; with balanced
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

How weak: the L2 penalty is chosen per run without demographics or ground truth, by the balance the
weights achieve: the weighted filtered set should restore the unfiltered set's shares of coarse regions of
embedding space (k-means on the kept images, removed images assigned to their nearest kept region). This is
the purpose of the weights, and the propensity-score literature selects models the same way. The held-out
log-loss, the usual criterion for a classifier, is the wrong one here: it keeps improving as the probe
grows strong enough to recognise the filter's own concept, which is exactly what the weights must not do
(on the demo corpus it picks the smallest penalty of the grid and restores only ~40% of the shift).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from curation_assets.core.stats import kish_effective_n, uniform_keys


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


DEFAULT_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


@dataclass
class ProbeResult:
    weights: np.ndarray  # one per kept sample, mean 1
    probabilities: np.ndarray  # P(unfiltered | x) for each kept sample (balanced classes, held-out)
    n_unfiltered: int  # training rows of the unfiltered class
    n_kept: int  # training rows of the filtered (kept) class
    train_accuracy: float  # held-out (balanced) accuracy when calibrated
    clipped_fraction: float
    effective_sample_size: float
    coef_norm: float
    regularization: float  # the L2 penalty used (selected by cross-validated log-loss when not given)
    cv_log_loss: dict[float, float] = field(default_factory=dict)  # balanced held-out log-loss per candidate
    balance: dict[float, float] = field(default_factory=dict)  # coarse-region imbalance per candidate (selection)
    calibration: tuple[float, float] = (float("nan"), float("nan"))  # Platt slope, intercept


def _balanced(y: np.ndarray) -> np.ndarray:
    """Sample weights that give both classes the same total weight (mean 1 overall)."""
    n1, n0 = y.sum(), len(y) - y.sum()
    return np.where(y == 1, len(y) / (2 * n1), len(y) / (2 * n0))


SELECTIONS = ("balance", "log_loss")


def coarse_regions(x: np.ndarray, kept: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Coarse regions of embedding space for the balance criterion: k-means (``k`` clusters) fitted on the
    *kept* embeddings, every image (removed ones included) assigned to its nearest kept centroid. A removed
    image thus counts for the region of kept images it most resembles (its family), the only regions a
    reweighting of the kept set can restore."""
    from sklearn.cluster import KMeans

    kept = np.asarray(kept, dtype=bool)
    k = max(1, min(int(k), int(kept.sum())))
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x[kept])
    return km.predict(x)


def region_imbalance(regions: np.ndarray, kept: np.ndarray, weights: np.ndarray) -> float:
    """Total-variation distance between the region shares of the unfiltered set and the weighted region
    shares of the kept set (0: the weights restore every coarse region's share)."""
    k = int(regions.max()) + 1
    unfiltered = np.bincount(regions, minlength=k) / len(regions)
    weighted = np.bincount(regions[np.asarray(kept, bool)], weights=weights, minlength=k) / weights.sum()
    return float(0.5 * np.abs(unfiltered - weighted).sum())


def _row_log_loss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def _cross_fit(xt: np.ndarray, y: np.ndarray, sw: np.ndarray, folds: np.ndarray, n_folds: int,
               regularization: float, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, list]:
    """Out-of-fold probe scores of every training row, the scores of ``xq`` averaged over the fold
    probes, the mean coefficient norm and the fold probes."""
    from sklearn.linear_model import LogisticRegression

    held_out = np.empty(len(y))
    query = np.zeros(len(xq))
    norms, probes = [], []
    for k in range(n_folds):
        train = folds != k
        probe = LogisticRegression(C=_inverse_strength(regularization, int(train.sum())), max_iter=1000)
        probe.fit(xt[train], y[train], sample_weight=sw[train])
        held_out[~train] = probe.decision_function(xt[~train])
        if len(xq):
            query += probe.decision_function(xq) / n_folds
        norms.append(float(np.linalg.norm(probe.coef_)))
        probes.append(probe)
    return held_out, query, float(np.mean(norms)), probes


def _platt(scores: np.ndarray, y: np.ndarray, sw: np.ndarray, alpha: float):
    """Platt scaling of held-out scores, used only where they carry information: unless the slope is
    positive and the likelihood-ratio test against the constant model (P = 0.5 with balanced classes)
    rejects at level ``alpha``, the probe found no direction that generalises to held-out images and
    the slope and intercept are set to 0 (uniform weights)."""
    from scipy.stats import chi2
    from sklearn.linear_model import LogisticRegression

    scale = LogisticRegression(C=1e6, max_iter=1000).fit(scores[:, None], y, sample_weight=sw)
    fitted = np.sum(sw * _row_log_loss(y, scale.predict_proba(scores[:, None])[:, 1]))
    statistic = 2.0 * (np.log(2.0) * sw.sum() - fitted)
    if scale.coef_[0, 0] <= 0 or chi2.sf(statistic, df=1) >= alpha:
        scale.coef_[:] = 0.0
        scale.intercept_[:] = 0.0
    return scale


def fit_weights(x: np.ndarray, kept: np.ndarray, regularization: float | None = None, max_weight: float = 10.0,
                max_train_per_class: int = 50_000, seed: int = 0, calibrate: bool = True,
                n_folds: int = 5, regularization_grid: Sequence[float] = DEFAULT_GRID,
                selection: str = "balance", balance_clusters: int = 16, significance: float = 0.01) -> ProbeResult:
    """Fit the weak probe and weight every kept sample.

    ``x``: embeddings of the whole set before filtering (n x d); ``kept``: boolean mask of the samples
    the filter kept. Weights come back for ``x[kept]`` in that order.

    Training set: every unfiltered image (label 1) and every kept image (label 0), each class subsampled
    only beyond ``max_train_per_class`` (with ``seed``); the classes get equal total weight, so the odds
    estimate ``P(x | unfiltered) / P(x | filtered)`` without drawing a random "equal-sized" subsample of
    the unfiltered set (which would drop a random tenth of the unfiltered images, removed ones included,
    and make the weights depend on the draw). Since the kept set is part of the unfiltered set, every kept
    image is in both classes.

    ``regularization`` is the L2 penalty per training sample, lambda in ``mean log-loss + lambda / 2 *
    |w|^2`` (larger is weaker), i.e. scikit-learn's ``C = 1 / (lambda * n_train)``, so the probe stays
    equally weak whatever the corpus size. ``None`` selects it from ``regularization_grid`` with a
    criterion that needs no demographic labels and no ground truth, computed on the cross-fitted weights:

    - ``selection="balance"`` (default): the candidate whose weights best restore the unfiltered set's
      shares of ``balance_clusters`` coarse regions of embedding space (:func:`coarse_regions`,
      :func:`region_imbalance`), i.e. choose the propensity model by the balance it achieves, the
      purpose of the weights, not by how well it predicts.
    - ``selection="log_loss"``: the candidate with the lowest held-out (balanced, Platt-calibrated)
      log-loss. Kept for diagnosis: the best *predictor* of unfiltered vs filtered is a strong probe that
      learns the filter's own concept and then leaves the survivors of a thinned-out family at weight 1
      (on the demo it picks the grid's smallest penalty, 1e-5, and leaves -5.3% of a -8.9% shift).

    Ties within 1e-4 go to the stronger penalty (the weaker probe). ``cv_log_loss`` and ``balance``
    report every candidate's score.

    ``calibrate`` rescales the probe's scores with Platt scaling (see the module docstring), cross-fitted
    over ``n_folds`` folds that split by image, so a held-out image's twin in the other class is never in
    the training folds; kept images are scored by the average of the fold probes (an image sits in both
    classes, so training on it does not push its own score), and ``train_accuracy`` is the held-out
    balanced accuracy. Held-out scores that do not predict unfiltered vs filtered significantly (likelihood-
    ratio test at level ``significance``) give uniform weights: a filter that removed images at random
    leaves nothing to correct. Without ``calibrate`` a single probe on all rows gives the raw probabilities of the regularised fit (``regularization``
    defaults to 0.0015 then).
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float32)
    kept = np.asarray(kept, dtype=bool)
    if kept.shape != (len(x),):
        raise ValueError(f"kept mask has shape {kept.shape}, expected ({len(x)},)")
    n_kept_all = int(kept.sum())
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if n_kept_all == 0:
        return ProbeResult(np.zeros(0), np.zeros(0), 0, 0, float("nan"), 0.0, 0.0, 0.0,
                           float("nan") if regularization is None else regularization)
    if n_kept_all < 2:
        raise ValueError(f"need at least 2 kept samples to fit the probe, got {n_kept_all}")
    rng = np.random.default_rng(seed)
    cap = int(max_train_per_class)
    pos = np.arange(len(x)) if len(x) <= cap else np.sort(rng.choice(len(x), cap, replace=False))
    kept_idx = np.flatnonzero(kept)
    neg = kept_idx if len(kept_idx) <= cap else np.sort(rng.choice(kept_idx, cap, replace=False))
    rows = np.concatenate([pos, neg])
    xt = x[rows]
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    sw = _balanced(y)
    balance: dict[float, float] = {}
    cv: dict[float, float] = {}
    calibration = (float("nan"), float("nan"))
    if not calibrate:
        lam = 0.0015 if regularization is None else float(regularization)
        probe = LogisticRegression(C=_inverse_strength(lam, len(y)), max_iter=1000).fit(xt, y, sample_weight=sw)
        p = probe.predict_proba(x[kept])[:, 1]
        accuracy = float(probe.score(xt, y, sample_weight=sw))
        coef_norm = float(np.linalg.norm(probe.coef_))
        regularization = lam
    else:
        # folds split by image: an image and its twin in the other class are always held out together
        image_fold = rng.permutation(len(x)) % n_folds
        folds = image_fold[rows]
        candidates = [float(regularization)] if regularization is not None else sorted(map(float, regularization_grid))
        if not candidates:
            raise ValueError("regularization_grid is empty")
        regions = coarse_regions(x, kept, balance_clusters, seed) if len(candidates) > 1 and selection == "balance" else None
        fits = {}
        for lam in candidates:
            held_out, scores_kept, norm, _ = _cross_fit(xt, y, sw, folds, n_folds, lam, x[kept_idx])
            scale = _platt(held_out, y, sw, significance)
            cv[lam] = float(np.sum(sw * _row_log_loss(y, scale.predict_proba(held_out[:, None])[:, 1])) / sw.sum())
            p_lam = scale.predict_proba(scores_kept[:, None])[:, 1]
            if regions is not None:
                balance[lam] = region_imbalance(regions, kept, weights_from_probabilities(p_lam, max_weight))
            fits[lam] = (held_out, norm, scale, p_lam)
        score = balance if regions is not None else cv
        best = min(score[c] for c in candidates)
        lam = max(c for c in candidates if score[c] <= best + 1e-4)  # ties go to the weaker probe
        regularization = lam
        held_out, coef_norm, scale, p = fits[lam]
        accuracy = float(scale.score(held_out[:, None], y, sample_weight=sw))
        calibration = (float(scale.coef_[0, 0]), float(scale.intercept_[0]))
    raw = np.clip(p, 1e-6, 1 - 1e-6)
    raw = raw / (1 - raw)
    w = weights_from_probabilities(p, max_weight)
    return ProbeResult(
        weights=w, probabilities=p, n_unfiltered=len(pos), n_kept=len(neg),
        train_accuracy=accuracy,
        clipped_fraction=float(np.mean(raw > max_weight)) if max_weight else 0.0,
        effective_sample_size=kish_effective_n(w),
        coef_norm=coef_norm, regularization=float(regularization), cv_log_loss=cv, balance=balance,
        calibration=calibration,
    )


# --------------------------------------------------------------------------- bounded memory (streamed)


@dataclass
class StreamedProbe:
    """The probe of :func:`fit_weights` fitted on a bounded sample, applied block by block: the fold probes
    and Platt scaling of every candidate penalty, and the coarse regions."""

    candidates: dict  # lam -> (fold probes, platt scaler, held-out log-loss, held-out accuracy, coef norm)
    regions: object | None  # a fitted KMeans (balance selection), or None
    n_unfiltered: int
    n_kept: int

    def probabilities(self, lam: float, x: np.ndarray) -> np.ndarray:
        probes, scale = self.candidates[lam][0], self.candidates[lam][1]
        scores = np.zeros(len(x))
        for probe in probes:
            scores += probe.decision_function(x) / len(probes)
        return scale.predict_proba(scores[:, None])[:, 1]


def fit_streamed_probe(xt: np.ndarray, y: np.ndarray, uids: Sequence[str], region_x: np.ndarray,
                       regularization: float | None, regularization_grid: Sequence[float], selection: str,
                       balance_clusters: int, seed: int, n_folds: int = 5, significance: float = 0.01
                       ) -> StreamedProbe:
    """Fit every candidate on the training sample ``xt`` / ``y`` (folds by uid hash, so an image and its twin
    in the other class are held out together), and the coarse regions on ``region_x`` (kept images)."""
    from sklearn.cluster import KMeans

    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    sw = _balanced(y)
    folds = (uniform_keys(uids, seed, "fold") * n_folds).astype(int)
    candidates = [float(regularization)] if regularization is not None else sorted(map(float, regularization_grid))
    if not candidates:
        raise ValueError("regularization_grid is empty")
    fitted = {}
    for lam in candidates:
        held_out, _, norm, probes = _cross_fit(xt, y, sw, folds, n_folds, lam, xt[:0])
        scale = _platt(held_out, y, sw, significance)
        loss = float(np.sum(sw * _row_log_loss(y, scale.predict_proba(held_out[:, None])[:, 1])) / sw.sum())
        accuracy = float(scale.score(held_out[:, None], y, sample_weight=sw))
        fitted[lam] = (probes, scale, loss, accuracy, norm)
    regions = None
    if len(candidates) > 1 and selection == "balance":
        k = max(1, min(int(balance_clusters), len(region_x)))
        regions = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(region_x)
    return StreamedProbe(fitted, regions, int(y.sum()), int(len(y) - y.sum()))


def streamed_weights(blocks, probe: StreamedProbe, max_weight: float, selection: str):
    """Pass over ``blocks`` (a callable returning an iterator of ``(x, kept mask)``) to choose the penalty:
    the weighted kept set's shares of the coarse regions against the unfiltered set's (``balance``), or the
    held-out log-loss. Returns ``(lam, mean clipped odds of lam, balance per candidate, cv per candidate)``;
    the weights of a block are then ``min(odds, max_weight) / mean``."""
    lams = sorted(probe.candidates)
    cv = {lam: probe.candidates[lam][2] for lam in lams}
    k = probe.regions.n_clusters if probe.regions is not None else 1
    unfiltered = np.zeros(k)
    weighted = {lam: np.zeros(k) for lam in lams}
    sums = {lam: 0.0 for lam in lams}
    kept_total = 0
    for x, kept in blocks():
        region = probe.regions.predict(x) if probe.regions is not None else np.zeros(len(x), int)
        unfiltered += np.bincount(region, minlength=k)
        kept_total += int(kept.sum())
        for lam in lams:
            w = clipped_odds(probe.probabilities(lam, x[kept]), max_weight)
            weighted[lam] += np.bincount(region[kept], weights=w, minlength=k)
            sums[lam] += float(w.sum())
    balance = {}
    if probe.regions is not None:
        for lam in lams:
            shares = weighted[lam] / max(sums[lam], 1e-12)
            balance[lam] = float(0.5 * np.abs(unfiltered / max(unfiltered.sum(), 1) - shares).sum())
    score = balance if balance else cv
    best = min(score[c] for c in lams)
    lam = max(c for c in lams if score[c] <= best + 1e-4)  # ties go to the weaker probe
    return lam, sums[lam] / max(kept_total, 1), balance, cv


def clipped_odds(p: np.ndarray, max_weight: float | None, eps: float = 1e-6) -> np.ndarray:
    """``p / (1 - p)`` clipped at ``max_weight``: :func:`weights_from_probabilities` before its normalisation."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    w = p / (1.0 - p)
    return np.minimum(w, max_weight) if max_weight is not None else w
