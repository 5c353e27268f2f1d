"""OpenAI's reweighting: the weight formula, clipping, normalisation, and the probe on constructed data."""

import numpy as np
import pytest

from curation_assets.core import demographics as demo
from curation_assets.core.reweighting import fit_weights, weights_from_probabilities


def test_weight_formula_clip_then_normalise():
    p = np.array([0.5, 0.75, 0.8, 0.95])            # odds 1, 3, 4, 19
    w = weights_from_probabilities(p)
    assert w == pytest.approx(np.array([1, 3, 4, 19]) / 6.75)
    clipped = weights_from_probabilities(p, max_weight=4.0)   # odds 1, 3, 4, 4
    assert clipped == pytest.approx(np.array([1, 3, 4, 4]) / 3.0)
    assert clipped.mean() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        weights_from_probabilities(p, max_weight=0)


def _clusters(rng, n, centre, d=16, noise=0.05):
    c = np.zeros(d)
    c[centre] = 1.0
    return c + noise * rng.standard_normal((n, d))


def test_probe_recovers_known_density_ratio():
    """Two separated clusters of 1000; the filter keeps half of A and all of B. The density ratio
    P(x|unfiltered)/P(x|kept) is 0.5/(1/3) = 1.5 on A and 0.5/(2/3) = 0.75 on B (mean 1 already), and
    the weighted kept set has A and B in the unfiltered 50:50 proportion again."""
    rng = np.random.default_rng(0)
    a, b = _clusters(rng, 1000, 0), _clusters(rng, 1000, 1)
    kept = np.r_[np.ones(500, bool), np.zeros(500, bool), np.ones(1000, bool)]
    result = fit_weights(np.vstack([a, b]), kept, max_weight=10)   # penalty selected by region balance
    assert result.regularization in result.balance and len(result.balance) > 1
    wa, wb = result.weights[:500], result.weights[500:]
    assert wa.mean() == pytest.approx(1.5, rel=0.03)
    assert wb.mean() == pytest.approx(0.75, rel=0.03)
    assert wa.sum() / (wa.sum() + wb.sum()) == pytest.approx(0.5, abs=0.01)
    assert result.weights.mean() == pytest.approx(1.0)
    assert (result.n_unfiltered, result.n_kept) == (2000, 1500)
    # Kish ESS of 500 x 1.5 and 1000 x 0.75: 1500^2 / (500 * 2.25 + 1000 * 0.5625) = 1333.3
    assert result.effective_sample_size == pytest.approx(1333.3, rel=0.02)


def test_weak_probe_does_not_memorise_removed_points():
    """Removing a random half of one cluster (no visual signal) must give near-uniform weights: the probe
    is weak on purpose and sees no direction separating kept from removed points."""
    rng = np.random.default_rng(1)
    a = _clusters(rng, 2000, 0, d=64, noise=0.2)
    kept = np.zeros(2000, bool)
    kept[rng.permutation(2000)[:1000]] = True
    result = fit_weights(a, kept)
    assert result.weights.std() < 0.05


def test_reweighting_restores_group_ratio():
    """End to end on constructed data: a 'women-heavy' cluster loses 30% to the filter; the women/men
    ratio measured with group_stats drops and comes back after reweighting."""
    import polars as pl

    rng = np.random.default_rng(2)
    fam_a, fam_b = _clusters(rng, 1000, 0), _clusters(rng, 1000, 1)
    women = np.r_[rng.random(1000) < 0.75, rng.random(1000) < 0.33]
    men = np.r_[~women[:1000], rng.random(1000) < 0.33]
    x = np.vstack([fam_a, fam_b])
    keep = np.r_[rng.random(1000) >= 0.3, np.ones(1000, bool)]
    flags = pl.DataFrame({"women": women, "men": men})
    raw = demo.group_stats(flags, ["women", "men"])[1][0]["ratio"]
    filt = demo.group_stats(flags.filter(pl.Series(keep)), ["women", "men"])[1][0]["ratio"]
    w = fit_weights(x, keep).weights
    rew = demo.group_stats(flags.filter(pl.Series(keep)), ["women", "men"], weights=w)[1][0]
    assert filt < raw * 0.95
    assert rew["ratio"] == pytest.approx(raw, rel=0.03)
    assert rew["ratio_low"] < rew["ratio"] < rew["ratio_high"]
