"""Tests of distortion.experiments.measure: paired statistics and measurement."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from distortion.experiments.measure import (
    binomial_interval,
    measure_last_layer,
    measurement_from_dict,
    measurement_to_dict,
    paired_accuracy_loss,
)
from distortion.quantize import UniformQuantizer
from distortion.results import ConfidenceInterval


def test_binomial_interval_matches_statsmodels_clopper_pearson():
    for k, n in [(0, 10), (3, 10), (10, 10), (17, 2000), (1000, 2000)]:
        lo, hi = binomial_interval(k, n)
        elo, ehi = proportion_confint(k, n, alpha=0.05, method="beta")
        assert lo == pytest.approx(elo, abs=1e-12) and hi == pytest.approx(ehi, abs=1e-12)
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)


# Reference values: the roots in p of the regularized incomplete beta function,
# I_p(k, n-k+1) = a/2 and I_p(k+1, n-k) = 1 - a/2 (a = 1 - level), with mpmath at 40 digits:
#   mp.findroot(lambda p: mp.betainc(k, n-k+1, 0, p, regularized=True) - a/2, (1e-12, 1 - 1e-12),
#               solver="bisect")   (and likewise for the upper end)
CLOPPER_PEARSON = [
    (0, 50, 0.95, 0.0, 0.071121736464197645),
    (3, 10, 0.95, 0.06673951117773449, 0.65245285005999724),
    (17, 2000, 0.95, 0.0049591350217812563, 0.013574546199731806),
    (50, 50, 0.95, 0.92887826353580235, 1.0),
    (7, 40, 0.90, 0.085132504585981664, 0.30370566700341459),
]


@pytest.mark.parametrize(("k", "n", "level", "low", "high"), CLOPPER_PEARSON)
def test_binomial_interval_reference_values(k, n, level, low, high):
    ci = binomial_interval(k, n, confidence_level=level)
    assert isinstance(ci, ConfidenceInterval)
    assert (ci.low, ci.high) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))
    assert ci.confidence_level == level and ci.method == "clopper-pearson"
    lo, hi = ci  # still unpacks like the tuple it replaces
    assert (lo, hi) == (ci.low, ci.high)


def test_binomial_interval_exact_coverage_is_at_least_nominal():
    # exact coverage P_p(p in CI(K)), K ~ Bin(n, p), summed over k: Clopper-Pearson never
    # undercovers, and is not trivially wide (coverage below 0.995 somewhere on the grid);
    # a Wald interval (p_hat +- 1.96 sd) fails the first check near p = 0.02.
    n = 40
    ks = np.arange(n + 1)
    ends = np.array([tuple(binomial_interval(int(k), n)) for k in ks])
    worst, best = 1.0, 0.0
    for p in np.linspace(0.005, 0.995, 199):
        inside = (ends[:, 0] <= p) & (p <= ends[:, 1])
        cover = float(stats.binom.pmf(ks, n, p)[inside].sum())
        worst, best = min(worst, cover), max(best, cover)
    assert worst >= 0.95 - 1e-12
    assert worst < 0.96  # tight somewhere: not a [0, 1] interval
    wald = np.clip(
        np.c_[ks / n - 1.96 * np.sqrt(ks / n * (1 - ks / n) / n),
              ks / n + 1.96 * np.sqrt(ks / n * (1 - ks / n) / n)], 0, 1,
    )  # fmt: skip
    p = 0.02
    inside = (wald[:, 0] <= p) & (p <= wald[:, 1])
    assert stats.binom.pmf(ks, n, p)[inside].sum() < 0.95  # the check can fail


def test_binomial_interval_deprecated_confidence_keyword():
    with pytest.warns(DeprecationWarning, match="confidence_level"):
        ci = binomial_interval(7, 40, confidence=0.9)
    assert ci.low == pytest.approx(0.085132504585981664, rel=1e-10)
    with pytest.raises(ValueError, match="confidence_level must be in"):
        binomial_interval(3, 10, confidence_level=1.5)


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
    assert res.accuracy_loss == pytest.approx(1 / 6)
    # the Clopper-Pearson interval of theta for n10 = 2 of m = 3 (mpmath, as above):
    # [0.09429932405024612, 0.99159624134038736], mapped by (m/n)(2 theta - 1)
    assert res.interval.low == pytest.approx(0.5 * (2 * 0.09429932405024612 - 1), rel=1e-10)
    assert res.interval.high == pytest.approx(0.5 * (2 * 0.99159624134038736 - 1), rel=1e-10)
    # paired standard error sqrt(((n10 + n01)/n - loss^2)/n)
    assert res.accuracy_loss_stderr == pytest.approx(np.sqrt((3 / 6 - 1 / 36) / 6))
    assert res.pvalue == pytest.approx(stats.binomtest(2, 3, 0.5).pvalue)
    assert paired_accuracy_loss(before, before).pvalue == 1.0
    assert tuple(res.confidence_interval(confidence_level=0.95)) == tuple(res.interval)
    assert res.confidence_interval(confidence_level=0.5).width < res.interval.width
    with pytest.warns(DeprecationWarning, match="accuracy_loss"):
        assert res.loss == res.accuracy_loss
    with pytest.warns(DeprecationWarning, match="interval"):
        assert tuple(res.ci) == tuple(res.interval)
    assert list(res.to_frame().columns[:7]) == [
        "n", "n10", "n01", "accuracy_loss", "accuracy_loss_stderr", "accuracy_loss_low",
        "accuracy_loss_high",
    ]  # fmt: skip


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
        (lambda r: r.interval.contains(p10 - p01))(
            paired_accuracy_loss(*_paired_sample(rng, 2000, p10, p01))
        )
        for _ in range(400)
    ]
    cover = np.mean(hits)
    # nominal 95 %: allow 3 binomial sd below (conditional exact interval is conservative)
    assert cover >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / 400)


@pytest.mark.parametrize("bad", [dict(confidence_level=1.0), dict(confidence_level=0)])
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
    n = len(fs.labels)
    k = int(np.sum(pred0 != pred1))
    assert m.flip_rate == pytest.approx(k / n)
    assert m.accuracy == pytest.approx(np.mean(pred1 == fs.labels))
    c0, c1 = pred0 == fs.labels, pred1 == fs.labels
    n10, n01 = int(np.sum(c0 & ~c1)), int(np.sum(~c0 & c1))
    assert m.accuracy_loss == pytest.approx((n10 - n01) / n)
    # one realization: the exact intervals of the counts, and the binomial / paired stderr
    assert tuple(m.flip_rate_interval) == tuple(binomial_interval(k, n))
    assert m.flip_rate_interval.method == "clopper-pearson"
    ref = paired_accuracy_loss(c0, c1)
    assert tuple(m.accuracy_loss_interval) == tuple(ref.interval)
    assert m.flip_rate_stderr == pytest.approx(np.sqrt(k / n * (1 - k / n) / n))
    assert m.accuracy_loss_stderr == pytest.approx(
        np.sqrt(((n10 + n01) / n - ((n10 - n01) / n) ** 2) / n)
    )
    assert m.accuracy_loss_pvalue == pytest.approx(ref.pvalue)
    assert m.repeats == 1 and m.level == "4"
    df = m.to_frame()
    assert df.loc[0, "bits"] == 2 and df.loc[0, "granularity"] == "channel"
    assert not df.loc[0, "mixed"]
    for col in (
        "flip_rate", "flip_rate_stderr", "flip_rate_low", "flip_rate_high", "accuracy_loss",
        "accuracy_loss_stderr", "accuracy_loss_low", "accuracy_loss_high",
    ):  # fmt: skip
        assert col in df.columns
    assert df.loc[0, "flip_rate_low"] == m.flip_rate_interval.low


def test_measure_last_layer_16_bits_changes_nothing_and_dither_repeats():
    fs = _fake_features(1)
    assert measure_last_layer(fs, UniformQuantizer(16)).flip_rate == 0.0
    m = measure_last_layer(fs, UniformQuantizer(2, rounding="dither"), repeats=5, seed=3)
    assert m.repeats == 5 and m.flip_rates.shape == (5,)
    assert m.flip_rate_stderr > 0
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
    assert m16.flip_rate == 0.0 and m16.accuracy_loss == 0.0
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
    assert a.flip_rate == pytest.approx(b.flip_rate)
    assert a.accuracy_loss == pytest.approx(b.accuracy_loss)


def test_unknown_layer_is_a_clear_error():
    from distortion.experiments.measure import quantize_model

    model, _ = _tiny_model_and_data()
    with pytest.raises(ValueError, match="unknown layer.*quantizable layers are: 0, 4"):
        quantize_model(model, UniformQuantizer(4), ["conv9"])


# ------------------------------------------------------------------ several realizations
def _offset_last_layer(seed=0, n=1000, d=64, K=10):
    """Nonnegative features with a large common part (like ReLU features): one dither
    realization of W shifts the logits of every image alike, so flips within a realization
    are strongly dependent (per-realization sd of the flip rate ~3.5x the binomial one)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=0.3, size=(K, d))
    labels = rng.integers(0, K, n)
    x = np.abs(1.0 + means[labels] + rng.normal(size=(n, d)))
    return SimpleNamespace(features=x, labels=labels, W=means, b=-(means @ np.ones(d)))


def test_repeats_use_the_t_interval_of_the_realizations():
    fs = _offset_last_layer()
    m = measure_last_layer(fs, UniformQuantizer(3, rounding="dither"), repeats=6, seed=1)
    r = m.repeats
    assert r == 6 and m.flip_counts.shape == (6,)
    for quantity, values in (("flip_rate", m.flip_rates), ("accuracy_loss", m.accuracy_losses)):
        se = values.std(ddof=1) / np.sqrt(r)
        assert getattr(m, f"{quantity}_stderr") == pytest.approx(se)
        for level in (0.95, 0.8):
            h = stats.t.ppf(0.5 + level / 2, r - 1) * se
            ci = m.confidence_interval(quantity, confidence_level=level)
            assert (ci.low, ci.high) == (
                pytest.approx(values.mean() - h),
                pytest.approx(values.mean() + h),
            )
            assert ci.method == "t" and ci.confidence_level == level
        assert tuple(getattr(m, f"{quantity}_interval")) == tuple(m.confidence_interval(quantity))
    assert m.accuracy_loss == pytest.approx(m.accuracy_float - m.accuracies.mean())
    t = m.accuracy_losses.mean() / (m.accuracy_losses.std(ddof=1) / np.sqrt(r))
    assert m.accuracy_loss_pvalue == pytest.approx(2 * stats.t.sf(abs(t), r - 1))
    with pytest.raises(ValueError, match="quantity must be"):
        m.confidence_interval("loss")


def test_repeats_interval_covers_the_expected_rate_over_realizations():
    # Target: the expected flip rate (accuracy loss) over realizations of the dither error, on
    # these images. Truth from 2000 realizations (its stderr, ~0.0012 for the flip rate, is 3 %
    # of the interval's half-width 0.037); 800 seeded replications of R = 10 realizations.
    # The nominal-95 % coverage must lie in [0.92, 0.98] (binomial sd of the estimate 0.008).
    # The pooled Clopper-Pearson interval over the n R flips it replaces covered 0.44 of
    # them (half-width 0.009), since the flips of one realization are dependent.
    fs = _offset_last_layer()
    q = UniformQuantizer(3, rounding="dither")
    truth = measure_last_layer(fs, q, repeats=2000, seed=10**6)
    half = stats.t.ppf(0.975, 9) * truth.flip_rates.std(ddof=1) / np.sqrt(10)
    assert truth.flip_rate_stderr < 0.05 * half
    reps = 800
    hits = np.zeros((reps, 2), bool)
    for j in range(reps):
        m = measure_last_layer(fs, q, repeats=10, seed=10 * j)
        hits[j] = (
            m.flip_rate_interval.contains(truth.flip_rate),
            m.accuracy_loss_interval.contains(truth.accuracy_loss),
        )
    cover = hits.mean(axis=0)
    assert 0.92 <= cover[0] <= 0.98, cover
    assert 0.92 <= cover[1] <= 0.98, cover


def test_measurement_deprecated_names_warn_and_agree():
    m = measure_last_layer(_fake_features(1), UniformQuantizer(2, rounding="dither"), repeats=4)
    for old, new in (
        ("loss", m.accuracy_loss),
        ("loss_ci", tuple(m.accuracy_loss_interval)),
        ("flip_ci", tuple(m.flip_rate_interval)),
        ("loss_pvalue", m.accuracy_loss_pvalue),
        ("loss_sd", m.accuracy_losses.std(ddof=1)),
        ("flip_sd", m.flip_rates.std(ddof=1)),
    ):
        with pytest.warns(DeprecationWarning, match=f"Measurement.{old} is deprecated"):
            value = getattr(m, old)
        assert (tuple(value) if isinstance(value, ConfidenceInterval) else value) == (
            pytest.approx(new)
        )
    with pytest.warns(DeprecationWarning, match="confidence_level"):
        m2 = measure_last_layer(_fake_features(1), UniformQuantizer(2), confidence=0.9)
    assert m2.confidence_level == 0.9 and m2.flip_rate_interval.confidence_level == 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new names do not warn
        m2.to_frame()
        m2.confidence_interval("accuracy_loss", confidence_level=0.5)


def test_measurement_dict_round_trip():
    import json

    import pandas as pd

    for q, repeats in ((UniformQuantizer(2), 1), (UniformQuantizer(3, rounding="dither"), 5)):
        m = measure_last_layer(_fake_features(2), q, repeats=repeats, seed=4)
        back = measurement_from_dict(json.loads(json.dumps(measurement_to_dict(m))))
        pd.testing.assert_frame_equal(back.to_frame(), m.to_frame())
        np.testing.assert_array_equal(back.flips, m.flips)
        assert back.quantizers == m.quantizers and back.quantizer == m.quantizer
    with pytest.raises(ValueError, match="recompute"):
        measurement_from_dict({"format": "distortion.Measurement", "version": 1})


# ------------------------------------------------------------------ mixed allocations
def test_mixed_allocation_records_every_layers_quantizer():
    from distortion.experiments.measure import measure

    model, ds = _tiny_model_and_data()
    alloc = {"0": UniformQuantizer(2), "4": UniformQuantizer(6, granularity="channel")}
    m = measure(model, ds, alloc, progress=False)
    assert m.quantizers == alloc
    assert m.layers == ("0", "4") and m.quantizer == alloc["0"]
    assert m.mixed
    n0, n4 = model[0].weight.numel(), model[4].weight.numel()  # 216 and 24
    df = m.to_frame()
    assert df.loc[0, "bits"] == pytest.approx((2 * n0 + 6 * n4) / (n0 + n4))
    assert df.loc[0, "mixed"] and df.loc[0, "granularity"] == "mixed"
    assert df.loc[0, "rounding"] == "nearest"
    # one quantizer for every layer: the integer bit-width, not mixed
    u = measure(model, ds, UniformQuantizer(4), progress=False)
    assert u.quantizers == {"0": UniformQuantizer(4), "4": UniformQuantizer(4)}
    assert not u.mixed and u.to_frame().loc[0, "bits"] == 4
    # a stochastic layer anywhere in the allocation gives several realizations
    sto = {"0": UniformQuantizer(8), "4": UniformQuantizer(3, rounding="dither")}
    assert measure(model, ds, sto, repeats=3, progress=False).repeats == 3


# ------------------------------------------------------------------ the caller's model
def _recording_model(seed=0):
    """A model whose ``.to`` records where it is sent; only the CPU exists here, so it stays
    on the CPU (and the functions must put the inputs where the model's tensors are)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Recording(nn.Sequential):
        def to(self, *args, **kwargs):
            dev = kwargs.get("device", args[0] if args else None)
            self.moves.append(torch.device(dev))
            return super().to("cpu")

    torch.manual_seed(seed)
    model = Recording(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    model.moves = []
    return model


def _calls(ds):
    from distortion.experiments.measure import measure, predict_logits
    from distortion.experiments.sensitivity import gradient_grams, hessian_trace

    x = np.stack([xb.numpy() for xb, _ in ds.batches(len(ds))])[0]
    xy = (x, np.asarray(ds.labels))
    kw = dict(device="cuda", progress=False)
    return {
        "predict_logits": lambda m: predict_logits(m, ds, **kw),
        "measure": lambda m: measure(m, ds, UniformQuantizer(3), **kw),
        "gradient_grams": lambda m: gradient_grams(m, xy, n_realizations=0, cache=False, **kw),
        "hessian_trace": lambda m: hessian_trace(m, xy, n_draws=2, cache=False, **kw),
    }


@pytest.mark.parametrize("name", ["predict_logits", "measure", "gradient_grams", "hessian_trace"])
def test_model_is_left_on_its_device_and_in_its_mode(name):
    torch = pytest.importorskip("torch")
    _, ds = _tiny_model_and_data(n=24)
    model = _recording_model().train()
    model[1].eval()  # a mixed state: batch norm frozen, the rest training
    call = _calls(ds)[name]
    call(model)
    # sent to the requested device, then back to where it was
    assert model.moves == [torch.device("cuda"), torch.device("cpu")], model.moves
    assert model.training and not model[1].training
    assert all(m.training for i, m in enumerate(model) if i != 1)


@pytest.mark.parametrize("name", ["predict_logits", "gradient_grams", "hessian_trace"])
def test_model_is_given_back_after_an_error(name):
    torch = pytest.importorskip("torch")
    from distortion.experiments.measure import predict_logits
    from distortion.experiments.sensitivity import gradient_grams, hessian_trace

    model = _recording_model().train()
    x = np.zeros((4, 2, 8, 8), np.float32)  # 2 channels: the first convolution raises
    bad = SimpleNamespace(batches=lambda b: iter([(torch.as_tensor(x), None)]), labels=[0] * 4)
    calls = {
        "predict_logits": lambda: predict_logits(model, _Sized(bad), device="cuda", progress=False),
        "gradient_grams": lambda: gradient_grams(
            model, (x, np.zeros(4, int)), cache=False, device="cuda", progress=False
        ),
        "hessian_trace": lambda: hessian_trace(
            model, (x, np.zeros(4, int)), cache=False, device="cuda", progress=False
        ),
    }
    with pytest.raises(RuntimeError):
        calls[name]()
    assert model.moves == [torch.device("cuda"), torch.device("cpu")], model.moves
    assert model.training and all(m.training for m in model.modules())


class _Sized:
    def __init__(self, ds):
        self._ds = ds
        self.labels = ds.labels

    def __len__(self):
        return len(self.labels)

    def batches(self, batch_size):
        return self._ds.batches(batch_size)


def test_model_is_left_in_train_mode_on_cpu():
    # the plain case, without any device: a model in train mode stays in train mode
    from distortion.experiments.measure import measure, predict_logits
    from distortion.experiments.sensitivity import gradient_grams, hessian_trace

    model, ds = _tiny_model_and_data(n=24)
    model.train()
    x = np.stack([xb.numpy() for xb, _ in ds.batches(len(ds))])[0]
    xy = (x, np.asarray(ds.labels))
    predict_logits(model, ds, progress=False)
    assert model.training and all(m.training for m in model.modules())
    measure(model, ds, UniformQuantizer(4), progress=False)
    assert model.training and all(m.training for m in model.modules())
    gradient_grams(model, xy, n_realizations=0, cache=False, progress=False)
    assert model.training and all(m.training for m in model.modules())
    hessian_trace(model, xy, n_draws=2, cache=False, progress=False)
    assert model.training and all(m.training for m in model.modules())


def test_model_is_left_on_the_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from distortion.experiments.measure import measure

    model, ds = _tiny_model_and_data(n=24)
    model.cuda().train()
    m = measure(model, ds, UniformQuantizer(4), device="cpu", progress=False)
    assert 0 <= m.flip_rate <= 1
    assert all(p.is_cuda for p in model.parameters()) and model.training
