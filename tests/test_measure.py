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


def _tiny_model_and_data(seed=0, n=64):
    torch = pytest.importorskip("torch")
    from torch import nn

    from distortion.experiments.data import ImageDataset

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, n)
    ds = ImageDataset.from_arrays(images, labels, class_names=["a", "b", "c"])
    return model, ds


def test_measure_full_model_on_tiny_network():
    from distortion.experiments.measure import measure, predict_logits, quantize_model

    model, ds = _tiny_model_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = predict_logits(model, ds, batch_size=16, progress=False)
    assert logits.shape == (len(ds), 3)
    m16 = measure(model, ds, UniformQuantizer(16), reference_logits=logits, progress=False)
    assert m16.flip_rate == 0.0 and m16.loss == 0.0
    assert set(m16.layers) == {"0", "4"}
    m2 = measure(model, ds, UniformQuantizer(1), layers=["0"], progress=False)
    assert m2.layers == ("0",) and 0 <= m2.flip_rate <= 1
    for k, v in model.state_dict().items():  # the float model is untouched
        assert np.array_equal(v.numpy(), before[k].numpy())
    # the quantized copy holds exactly the quantizer's values
    qmodel, qt = quantize_model(model, {"4": UniformQuantizer(3, granularity="channel")})
    np.testing.assert_array_equal(qmodel[4].weight.detach().numpy(), qt["4"].values.numpy())
    np.testing.assert_array_equal(
        qmodel[0].weight.detach().numpy(), model[0].weight.detach().numpy()
    )


def test_measure_last_layer_equals_full_model_with_last_layer():
    from distortion.experiments.measure import measure

    torch = pytest.importorskip("torch")
    model, ds = _tiny_model_and_data(1, n=80)
    x = torch.cat([xb for xb, _ in ds.batches(40)])
    with torch.no_grad():
        feats = model[:4](x).numpy()
    fs = SimpleNamespace(
        features=feats,
        labels=ds.labels,
        W=model[4].weight.detach().numpy(),
        b=model[4].bias.detach().numpy(),
    )
    q = UniformQuantizer(2)
    a = measure(model, ds, q, layers="last", progress=False)
    b = measure_last_layer(fs, q)
    assert a.flip_rate == pytest.approx(b.flip_rate) and a.loss == pytest.approx(b.loss)


def test_unknown_layer_is_a_clear_error():
    from distortion.experiments.measure import quantize_model

    model, _ = _tiny_model_and_data()
    with pytest.raises(ValueError, match="unknown layer.*quantizable layers are: 0, 4"):
        quantize_model(model, UniformQuantizer(4), ["conv9"])
