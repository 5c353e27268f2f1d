"""Interval and test functions against published values and an independent implementation (scipy)."""

import math

import numpy as np
import pytest

from curation_assets.core import stats


@pytest.mark.parametrize("x, n, low, high", [
    # Newcombe RG (1998a), "Two-sided confidence intervals for the single proportion: comparison of seven
    # methods", Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score without correction).
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe_1998(x, n, low, high):
    ci = stats.wilson_interval(x, n)
    assert ci.estimate == pytest.approx(x / n)
    assert ci.low == pytest.approx(low, abs=5e-5)
    assert ci.high == pytest.approx(high, abs=5e-5)


def test_wilson_matches_scipy_and_level():
    from scipy.stats import binomtest

    for x, n in [(3, 10), (50, 100), (999, 1000), (7, 7)]:
        ref = binomtest(x, n).proportion_ci(0.9, method="wilson")
        ci = stats.wilson_interval(x, n, confidence=0.9)
        assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert math.isnan(stats.wilson_interval(0, 0).estimate)
    with pytest.raises(ValueError):
        stats.wilson_interval(5, 4)


@pytest.mark.parametrize("x1, n1, x2, n2, low, high", [
    # Newcombe RG (1998b), "Interval estimation for the difference between independent proportions:
    # comparison of eleven methods", Statistics in Medicine 17:873-890, Table II, method 10 (hybrid score).
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
    (5, 56, 0, 29, -0.0381, 0.1926),
])
def test_newcombe_difference_matches_published(x1, n1, x2, n2, low, high):
    ci = stats.newcombe_interval(x1, n1, x2, n2)
    assert ci.low == pytest.approx(low, abs=5e-5)
    assert ci.high == pytest.approx(high, abs=5e-5)


def test_risk_ratio_log_method_matches_scipy():
    # scipy.stats.contingency.relative_risk implements the same Katz log method independently
    from scipy.stats.contingency import relative_risk

    for a, n1, b, n2 in [(27, 122, 44, 487), (5, 50, 10, 40), (300, 1000, 150, 900)]:
        ref = relative_risk(a, n1, b, n2)
        ci = stats.risk_ratio_interval(a, n1, b, n2)
        assert ci.estimate == pytest.approx(ref.relative_risk)
        ref_ci = ref.confidence_interval(0.95)
        assert (ci.low, ci.high) == pytest.approx((ref_ci.low, ref_ci.high), rel=1e-9)


def test_count_ratio_interval_unit_and_weighted():
    # unit weights: se(log a/b) = sqrt(1/a + 1/b)
    ci = stats.count_ratio_interval(100, 50)
    se = math.sqrt(1 / 100 + 1 / 50)
    z = stats.z_value(0.95)
    assert ci.estimate == 2.0
    assert ci.low == pytest.approx(2 * math.exp(-z * se))
    assert ci.high == pytest.approx(2 * math.exp(z * se))
    # 50 samples of weight 2 give the same ratio as 100 unit samples but a wider interval
    weighted = stats.count_ratio_interval(100, 50, a_sq=50 * 4, b_sq=50)
    assert weighted.estimate == 2.0 and weighted.low < ci.low and weighted.high > ci.high
    assert math.isnan(stats.count_ratio_interval(0, 5).low)


def test_two_proportion_ztest_equals_chi_square():
    from scipy.stats import chi2_contingency

    for x1, n1, x2, n2 in [(30, 100, 45, 100), (5, 200, 20, 210), (500, 1000, 520, 1000)]:
        chi = chi2_contingency(np.array([[x1, n1 - x1], [x2, n2 - x2]]), correction=False)
        t = stats.two_proportion_ztest(x1, n1, x2, n2)
        assert t.statistic**2 == pytest.approx(chi.statistic)
        assert t.p_value == pytest.approx(chi.pvalue)
    assert stats.two_proportion_ztest(30, 100, 45, 100).statistic < 0
    assert stats.bonferroni_level(0.01, 4) == 0.0025


def test_weighted_wilson_reduces_to_wilson_and_kish():
    w = np.ones(40)
    assert stats.kish_effective_n(w) == pytest.approx(40)
    assert stats.kish_effective_n(np.array([1.0, 1.0, 4.0])) == pytest.approx(36 / 18)
    a = stats.weighted_wilson_interval(12, 40, 40)
    b = stats.wilson_interval(12, 40)
    assert a.as_tuple() == pytest.approx(b.as_tuple())
    # unequal weights shrink the effective sample size and widen the interval
    c = stats.weighted_wilson_interval(12, 40, 80)
    assert c.estimate == pytest.approx(0.3) and c.high - c.low > b.high - b.low
