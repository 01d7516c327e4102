"""Tests of distortion.experiments.measure: paired statistics and measurement."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from distortion.experiments.measure import (
    binomial_interval,
    measure_last_layer,
    paired_accuracy_loss,
)
from distortion.quantize import UniformQuantizer


def test_binomial_interval_matches_statsmodels_clopper_pearson():
    for k, n in [(0, 10), (3, 10), (10, 10), (17, 2000), (1000, 2000)]:
        lo, hi = binomial_interval(k, n)
        elo, ehi = proportion_confint(k, n, alpha=0.05, method="beta")
        assert lo == pytest.approx(elo, abs=1e-12) and hi == pytest.approx(ehi, abs=1e-12)


def _paired_sample(rng, n, p10, p01, acc=0.9):
    """Correct-before/after with P(10)=p10, P(01)=p01 (loss = p10 - p01)."""
    u = rng.random(n)
    before = rng.random(n) < acc
    after = before.copy()
    after[before & (u < p10 / acc)] = False
    after[~before & (u < p01 / (1 - acc))] = True
    return before, after


def test_paired_loss_counts_and_value():
    before = np.array([1, 1, 1, 0, 0, 1], bool)
    after = np.array([1, 0, 0, 1, 0, 1], bool)
    res = paired_accuracy_loss(before, after)
    assert (res.n10, res.n01, res.n) == (2, 1, 6)
    assert res.loss == pytest.approx(1 / 6)
    assert res.ci[0] <= res.loss <= res.ci[1]
    assert res.pvalue == pytest.approx(stats.binomtest(2, 3, 0.5).pvalue)
    assert paired_accuracy_loss(before, before).pvalue == 1.0


def test_paired_pvalues_valid_under_null():
    # Exact McNemar under H0 (p10 = p01): P(p <= a) <= a (conservative, discrete test).
    rng = np.random.default_rng(11)
    p = np.array(
        [paired_accuracy_loss(*_paired_sample(rng, 1000, 0.02, 0.02)).pvalue for _ in range(400)]
    )
    for a in (0.01, 0.05, 0.1):
        # binomial upper bound of P(p <= a) with 400 draws: a + 3 sd
        assert np.mean(p <= a) <= a + 3 * np.sqrt(a * (1 - a) / 400)


def test_paired_interval_covers():
    rng = np.random.default_rng(12)
    p10, p01 = 0.03, 0.01
    hits = [
        (lambda r: r.ci[0] <= p10 - p01 <= r.ci[1])(
            paired_accuracy_loss(*_paired_sample(rng, 2000, p10, p01))
        )
        for _ in range(400)
    ]
    cover = np.mean(hits)
    # nominal 95 %: allow 3 binomial sd below (conditional exact interval is conservative)
    assert cover >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / 400)


@pytest.mark.parametrize("bad", [dict(confidence=1.0), dict(confidence=0)])
def test_paired_bad_confidence(bad):
    with pytest.raises(ValueError, match="confidence"):
        paired_accuracy_loss([True], [False], **bad)


def test_paired_bad_shapes():
    with pytest.raises(ValueError, match="same length"):
        paired_accuracy_loss([True, False], [True])
    with pytest.raises(ValueError, match="k <= n"):
        binomial_interval(5, 3)


def _fake_features(seed=0, n=600, d=16, K=4):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=2.0, size=(K, d))
    labels = rng.integers(0, K, n)
    x = (means[labels] + rng.normal(size=(n, d))).astype(np.float32)
    W = means.astype(np.float32)
    b = np.zeros(K, np.float32)
    return SimpleNamespace(features=x, labels=labels, W=W, b=b, logits=x @ W.T + b)


def test_measure_last_layer_matches_direct_computation():
    fs = _fake_features()
    q = UniformQuantizer(2, granularity="channel")
    m = measure_last_layer(fs, q)
    Wq = q.quantize(fs.W).values
    pred0 = np.argmax(fs.features @ fs.W.T, 1)
    pred1 = np.argmax(fs.features.astype(np.float64) @ Wq.astype(np.float64).T, 1)
    assert m.flip_rate == pytest.approx(np.mean(pred0 != pred1))
    assert m.accuracy == pytest.approx(np.mean(pred1 == fs.labels))
    assert m.loss == pytest.approx(np.mean(pred0 == fs.labels) - np.mean(pred1 == fs.labels))
    assert m.flip_ci[0] <= m.flip_rate <= m.flip_ci[1]
    assert m.loss_ci[0] <= m.loss <= m.loss_ci[1]
    assert m.repeats == 1 and m.flip_sd == 0
    df = m.to_frame()
    assert df.loc[0, "bits"] == 2 and df.loc[0, "granularity"] == "channel"


def test_measure_last_layer_16_bits_changes_nothing_and_dither_repeats():
    fs = _fake_features(1)
    assert measure_last_layer(fs, UniformQuantizer(16)).flip_rate == 0.0
    m = measure_last_layer(fs, UniformQuantizer(2, rounding="dither"), repeats=5, seed=3)
    assert m.repeats == 5 and m.flip_rates.shape == (5,)
    assert m.flip_sd > 0
    assert m.flip_rate == pytest.approx(m.flip_rates.mean())
    again = measure_last_layer(fs, UniformQuantizer(2, rounding="dither"), repeats=5, seed=3)
    np.testing.assert_array_equal(again.flip_rates, m.flip_rates)


def test_measure_last_layer_bad_repeats():
    with pytest.raises(ValueError, match="repeats"):
        measure_last_layer(_fake_features(), UniformQuantizer(3, rounding="dither"), repeats=0)
    with pytest.raises(ValueError, match="UniformQuantizer"):
        measure_last_layer(_fake_features(), 4)
