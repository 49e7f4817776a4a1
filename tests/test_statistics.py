"""DeLong's paired AUC test (models/statistics.py) against its textbook definition and by simulation."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from models.metrics import auc
from models.statistics import decide, delong


def slow_delong(labels, a, b):
    """DeLong et al. (1988) as written: structural components from all m x n pairs; (aucs, var of a - b)."""
    labels = np.asarray(labels).astype(bool)
    components = []
    for scores in (np.asarray(a, float), np.asarray(b, float)):
        x, y = scores[labels], scores[~labels]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        components.append((psi.mean(axis=1), psi.mean(axis=0)))
    m, n = labels.sum(), (~labels).sum()
    s10 = np.cov(np.stack([components[0][0], components[1][0]]))
    s01 = np.cov(np.stack([components[0][1], components[1][1]]))
    contrast = np.array([1.0, -1.0])
    variance = contrast @ s10 @ contrast / m + contrast @ s01 @ contrast / n
    return components[0][0].mean(), components[1][0].mean(), variance


def noisy_pair(rng, rows, noise_a=1.0, noise_b=1.0, signal=1.0):
    """Labels and two models' scores: a shared signal plus each model's own noise."""
    labels = rng.random(rows) < 0.4
    truth = signal * labels + rng.normal(size=rows)
    return labels, truth + noise_a * rng.normal(size=rows), truth + noise_b * rng.normal(size=rows)


def test_aucs_equal_the_mann_whitney_auc_with_ties():
    rng = np.random.default_rng(1)
    for rows in (7, 50, 2000):
        labels = rng.random(rows) < 0.3
        labels[:2] = [True, False]
        a = np.round(rng.normal(size=rows) + labels, 1)  # many ties
        b = rng.integers(0, 3, rows).astype(float)  # almost only ties
        result = delong(labels, a, b)
        assert result.auc_a == pytest.approx(auc(labels, a), abs=1e-12)
        assert result.auc_b == pytest.approx(auc(labels, b), abs=1e-12)
        assert result.difference == pytest.approx(result.auc_a - result.auc_b, abs=1e-15)
        assert (result.positives, result.negatives) == (labels.sum(), (~labels).sum())


def test_variance_and_p_value_agree_with_the_quadratic_definition():
    rng = np.random.default_rng(2)
    for trial in range(30):
        rows = int(rng.integers(6, 120))
        labels = rng.random(rows) < rng.uniform(0.2, 0.8)
        labels[:2] = [True, False]
        a = rng.normal(size=rows) + rng.uniform(0, 2) * labels
        b = a + rng.normal(size=rows) * rng.uniform(0.1, 2)
        if trial % 3 == 0:
            a, b = np.round(a), np.round(b, 1)  # ties within and across classes
        auc_a, auc_b, variance = slow_delong(labels, a, b)
        result = delong(labels, a, b, level=0.9)
        assert result.auc_a == pytest.approx(auc_a, abs=1e-12)
        assert result.auc_b == pytest.approx(auc_b, abs=1e-12)
        assert result.se == pytest.approx(math.sqrt(variance), rel=1e-9, abs=1e-15)
        if variance > 0:
            z = (auc_a - auc_b) / math.sqrt(variance)
            assert result.p_value == pytest.approx(NormalDist().cdf(z), rel=1e-9, abs=1e-12)
            half = NormalDist().inv_cdf(0.95) * math.sqrt(variance)
            assert (result.lower, result.upper) == pytest.approx((auc_a - auc_b - half, auc_a - auc_b + half))
            assert result.upper_bound(0.95) == pytest.approx(result.upper), "one-sided 95% = two-sided 90%"


def test_a_a_comparisons_reject_at_the_nominal_rate():
    """Two noisy copies of the same scores are equally good: at level 0.95 one-sided, about 5% of the
    comparisons call a worse, and the two-sided 95% interval misses 0 about 5% of the time."""
    rng = np.random.default_rng(3)
    trials = 2000
    p_values, misses = [], 0
    for _ in range(trials):
        labels, a, b = noisy_pair(rng, 300)
        result = delong(labels, a, b)
        p_values.append(result.p_value)
        misses += not (result.lower <= 0 <= result.upper)
    p_values = np.array(p_values)
    rejected = (p_values < 0.05).mean()
    # 2000 trials: the binomial standard error at 5% is 0.5 points; the bounds are about 3 of them.
    assert 0.035 <= rejected <= 0.065, rejected
    assert 0.035 <= misses / trials <= 0.065, misses / trials
    assert 0.4 <= (p_values < 0.5).mean() <= 0.6, "p-values are about uniform under the null"
    rejected_by_decide = np.mean([not decide(delong(*noisy_pair(rng, 300)), level=0.95, margin=1.0).blessed
                                  for _ in range(500)])
    assert 0.02 <= rejected_by_decide <= 0.08


def test_a_clearly_worse_model_is_detected_and_a_better_one_blessed():
    rng = np.random.default_rng(4)
    labels, good, bad = noisy_pair(rng, 5000, noise_a=0.5, noise_b=2.0)
    worse = delong(labels, bad, good)
    assert worse.difference < -0.05
    assert worse.p_value < 1e-6 and worse.upper < 0
    decision = decide(worse, level=0.95, margin=0.5)
    assert not decision.blessed
    assert decision.reason.startswith("worse with confidence:")
    assert f"{worse.difference:+.4f}" in decision.reason and f"{worse.upper_bound(0.95):+.4f}" in decision.reason
    better = decide(delong(labels, good, bad), level=0.95, margin=0.01)
    assert better.blessed and better.reason.startswith("not shown worse")
    assert delong(labels, good, bad).p_value > 1 - 1e-6


def test_the_margin_rejects_a_large_drop_the_test_cannot_confirm():
    rng = np.random.default_rng(5)
    labels, a, b = noisy_pair(rng, 30, noise_a=2.0, noise_b=0.3)
    result = delong(labels, a, b)
    assert result.difference < -0.02 and result.upper_bound(0.95) > 0, "a small sample: not significant"
    assert decide(result, level=0.95, margin=0.5).blessed
    decision = decide(result, level=0.95, margin=0.02)
    assert not decision.blessed and decision.reason.startswith("worse by more than the margin 0.02")


def test_a_certain_but_small_drop_inside_the_indifference_zone_is_blessed():
    rng = np.random.default_rng(8)
    labels, _, b = noisy_pair(rng, 20000)
    result = delong(labels, b + 0.3 * rng.normal(size=20000), b)  # a slightly noisier copy: highly correlated
    assert -0.005 < result.difference < 0 and result.upper_bound(0.99) < 0, "significant, and small"
    assert not decide(result, level=0.99, margin=0.02).blessed
    within = decide(result, level=0.99, margin=0.02, indifference=0.005)
    assert within.blessed and within.reason.startswith("not shown worse")
    clearly = decide(delong(*noisy_pair(rng, 20000, noise_a=2.0, noise_b=1.0)), level=0.99, margin=0.5,
                     indifference=0.005)
    assert not clearly.blessed and clearly.reason.startswith("worse by more than 0.005 with confidence")
    with pytest.raises(ValueError, match="indifference"):
        decide(result, indifference=-0.1)


def test_identical_and_tied_scores():
    rng = np.random.default_rng(6)
    labels = rng.random(500) < 0.5
    scores = rng.normal(size=500) + labels
    same = delong(labels, scores, scores.copy())
    assert (same.difference, same.se, same.lower, same.upper, same.p_value) == (0.0, 0.0, 0.0, 0.0, 1.0)
    assert decide(same, margin=0.0).blessed
    # A monotone transform ranks the rows the same way: the same AUC, exactly.
    assert delong(labels, scores, np.exp(scores)).se == 0.0
    constant = delong(labels, np.zeros(500), scores)
    assert constant.auc_a == 0.5 and constant.p_value < 1e-6
    # A perfect model against a constant one: no variance at all, the difference is certain.
    perfect = delong(labels, labels.astype(float), np.ones(500))
    assert (perfect.auc_a, perfect.auc_b, perfect.se, perfect.p_value) == (1.0, 0.5, 0.0, 1.0)
    assert delong(labels, np.ones(500), labels.astype(float)).p_value == 0.0


def test_one_class_and_tiny_inputs():
    assert delong([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]) is None
    assert delong([0, 0], [0.1, 0.2], [0.3, 0.2]) is None
    assert delong(np.zeros(0), [], []) is None
    undefined = decide(None)
    assert undefined.blessed and undefined.comparison is None and "one class" in undefined.reason
    single = delong([1, 0, 0], [0.9, 0.1, 0.2], [0.1, 0.9, 0.2])
    assert (single.auc_a, single.auc_b) == (1.0, 0.0)
    assert single.se is None and single.p_value is None and single.upper_bound(0.95) is None
    assert decide(single, margin=0.1).blessed
    reversed_ = decide(delong([1, 0, 0], [0.1, 0.9, 0.2], [0.9, 0.1, 0.2]), margin=0.1)
    assert not reversed_.blessed and "variance undefined" in reversed_.reason, "only the margin applies"
    assert decide(delong([1, 0], [0.9, 0.1], [0.9, 0.1])).blessed


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        delong([1, 0, 1], [0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        delong([1, 0], [0.1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1"):
        delong([2, 0], [0.1, 0.2], [0.1, 0.2])
    with pytest.raises(ValueError, match="level"):
        delong([1, 0], [0.1, 0.2], [0.1, 0.2], level=95)
