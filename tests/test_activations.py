"""Tests of activation quantization: grids, bit-exactness with torch.ao, backend presets,
the error model (theory/activations.md, eq. A1-A8), hooks, calibration and real int8."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest

from distortion.activations import (
    PRESETS,
    ActivationQParams,
    ActivationQuantizer,
    ActivationStats,
    activation_stats,
    fake_quantize,
    preset,
)
from distortion.compression import Compressed, Compressor
from distortion.theory.error_models import uniform_error_variance

torch = pytest.importorskip("torch")
nn = torch.nn

from test_multilayer import LAYERS, TinyNet, tiny_data, tiny_net  # noqa: E402

from distortion.experiments.activations import (  # noqa: E402
    ActivationCalibration,
    calibrate_activations,
    convert_int8_fx,
    quantize_activations,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch's reduce_range notice


def _acts(rng, shape=(32, 5, 4, 4), relu=False):
    """Activations with per-channel scales and offsets, float32."""
    c = shape[1]
    x = rng.standard_normal(shape) * rng.uniform(0.05, 5.0, (1, c, 1, 1)) + rng.uniform(
        -1.0, 2.0, (1, c, 1, 1)
    )
    return (np.maximum(x, 0.0) if relu else x).astype(np.float32)


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("bits", [1, 17, 0, 8.0, True])
def test_bits_outside_2_to_16_are_rejected(bits):
    with pytest.raises(ValueError, match=r"2\.\.16"):
        ActivationQuantizer(bits)


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="needs signed=True"):
        ActivationQuantizer(8, symmetric=True)
    with pytest.raises(ValueError, match="needs signed=True"):
        ActivationQuantizer(8, narrow_range=True)
    with pytest.raises(ValueError, match="calibration"):
        ActivationQuantizer(8, calibration="histogram")
    with pytest.raises(ValueError, match="granularity"):
        ActivationQuantizer(8, granularity="group")
    with pytest.raises(ValueError, match="percentile"):
        ActivationQuantizer(8, calibration="percentile", percentile=40.0)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, (0, 255)),
        ({"signed": True}, (-128, 127)),
        ({"signed": True, "narrow_range": True}, (-127, 127)),
        ({"reduce_range": True}, (0, 127)),
        ({"signed": True, "reduce_range": True}, (-64, 63)),
    ],
)
def test_code_ranges_at_8_bits_match_torch_conventions(kw, expected):
    q = ActivationQuantizer(8, **kw)
    assert (q.qmin, q.qmax) == expected


def test_qparams_validation():
    with pytest.raises(ValueError, match="positive"):
        ActivationQParams(np.asarray(0.0), np.asarray(0), 0, 255)
    with pytest.raises(ValueError, match="zero_point must lie"):
        ActivationQParams(np.asarray(1.0), np.asarray(300), 0, 255)
    with pytest.raises(ValueError, match=r"shape \(C,\)"):
        ActivationQParams(np.asarray(1.0), np.asarray(0), 0, 255, granularity="channel")


# ----------------------------------------------------------------------------- bit-exactness
CONFIGS = [
    {"signed": False},
    {"signed": True},
    {"signed": True, "symmetric": True},
    {"signed": True, "symmetric": True, "narrow_range": True},
    {"signed": False, "reduce_range": True},
]


def _torch_fake_quantize(x, scale, zp, q: ActivationQuantizer):
    xt = torch.from_numpy(x)
    if q.granularity == "tensor":
        return torch.fake_quantize_per_tensor_affine(
            xt, float(scale), int(zp), q.qmin, q.qmax
        ).numpy()
    return torch.fake_quantize_per_channel_affine(
        xt, scale.float(), zp.int(), q.channel_axis, q.qmin, q.qmax
    ).numpy()


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(kw) or "unsigned")
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fake_quantize_and_minmax_calibration_are_bit_exact_with_torch(bits, kw, granularity):
    rng = np.random.default_rng(bits * 31 + len(kw))
    q = ActivationQuantizer(bits, granularity=granularity, **kw)
    for relu in (False, True):
        x = _acts(rng, relu=relu)
        obs = q.torch_observer()
        obs(torch.from_numpy(x))
        scale, zp = obs.calculate_qparams()
        # the toolkit's fake quantization with the observer's scale and zero point
        shape = () if granularity == "tensor" else (-1,)
        qp_torch = ActivationQParams(
            scale.double().numpy().reshape(shape), zp.numpy().reshape(shape), q.qmin, q.qmax,
            granularity, q.channel_axis,
        )  # fmt: skip
        ref = _torch_fake_quantize(x, scale, zp, q)
        out = fake_quantize(x, qp_torch)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(fake_quantize(torch.from_numpy(x), qp_torch).numpy(), ref)
        # the toolkit's own minmax calibration reproduces the observer (float32 rule)
        qp = q.calibrate(x)
        np.testing.assert_array_equal(np.atleast_1d(qp.scale), scale.double().numpy())
        np.testing.assert_array_equal(np.atleast_1d(qp.zero_point), zp.numpy())
        # a float64 input gets the same calibration (extremes taken in float32)
        qp64 = q.calibrate(x.astype(np.float64))
        np.testing.assert_array_equal(qp64.scale, qp.scale)


def test_ties_follow_the_float32_reciprocal_as_torch_does():
    # values next to (k + 1/2) * scale, where x * fl(1/scale) and x / scale round differently
    rng = np.random.default_rng(5)
    n_differ = 0
    for _ in range(20):
        scale = np.float32(rng.uniform(1e-3, 1.0))
        k = rng.integers(-100, 100, 5000) + 0.5
        x = (k * scale).astype(np.float32)
        qp = ActivationQParams(np.float64(scale), np.asarray(0), -128, 127)
        ref = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), float(scale), 0, -128, 127)
        np.testing.assert_array_equal(fake_quantize(x, qp), ref.numpy())
        naive = np.clip(np.rint(x / scale), -128, 127).astype(np.float32) * scale
        n_differ += int(np.sum(naive != ref.numpy()))
    assert n_differ > 0  # dividing by the scale would not be bit-exact


def test_fake_quantize_keeps_type_dtype_and_input_and_is_idempotent():
    rng = np.random.default_rng(0)
    x = _acts(rng)
    q = ActivationQuantizer(4, signed=True, granularity="channel")
    qp = q.calibrate(x)
    x0 = x.copy()
    y = fake_quantize(x, qp)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(fake_quantize(y, qp), y)
    x64 = torch.from_numpy(x.astype(np.float64))
    y64 = fake_quantize(x64, qp)
    assert isinstance(y64, torch.Tensor) and y64.dtype == torch.float64
    # float64 uses the same formula in float64: the same codes except at (near-)ties
    same = np.isclose(y64.numpy(), y, rtol=1e-6, atol=0)
    assert np.mean(same) > 0.999
    with pytest.raises(ValueError, match="do not fit"):
        fake_quantize(x[:, :3], qp)
    # a value of the grid is 0 exactly, on every grid
    for kw in CONFIGS:
        qz = ActivationQuantizer(3, **kw).calibrate(x)
        assert fake_quantize(np.zeros(3, np.float32), qz).tolist() == [0.0, 0.0, 0.0]


def test_unsigned_grid_after_relu_has_zero_point_zero():
    rng = np.random.default_rng(1)
    x = _acts(rng, relu=True)
    qp = ActivationQuantizer(8, granularity="channel").calibrate(x)
    assert np.all(qp.zero_point == 0)
    np.testing.assert_array_equal(qp.lo, 0.0)


# ----------------------------------------------------------------------------- presets
def test_pytorch_presets_reproduce_the_default_qconfig_observers():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    for name in ("pytorch-x86", "pytorch-fbgemm", "pytorch-qnnpack"):
        p = preset(name)
        qc = p.torch_qconfig()
        wobs = qc.weight()
        wobs(torch.from_numpy(w))
        scale, zp = wobs.calculate_qparams()
        qp = p.weight.calibrate(w)
        np.testing.assert_array_equal(np.atleast_1d(qp.scale), scale.double().numpy())
        np.testing.assert_array_equal(np.atleast_1d(qp.zero_point), zp.numpy())
        assert (p.weight.qmin, p.weight.qmax) == (wobs.quant_min, wobs.quant_max) == (-128, 127)
        # scale max|w| / 127.5 (PerChannelMinMaxObserver / MinMaxObserver, symmetric qint8)
        amax = np.abs(w).reshape(6, -1).max(axis=1) if qp.scale.ndim else np.abs(w).max()
        np.testing.assert_array_equal(qp.scale, (amax / np.float32(127.5)).astype(np.float32))
        aobs = qc.activation()
        assert type(aobs).__name__ == "HistogramObserver"
        assert (p.activation.qmin, p.activation.qmax) == (aobs.quant_min, aobs.quant_max)
        assert p.activation.granularity == "tensor" and not p.activation.signed
    assert preset("pytorch-x86").activation.qmax == 127  # reduce_range
    assert preset("pytorch-qnnpack").activation.qmax == 255
    assert preset("pytorch-qnnpack").weight.granularity == "tensor"


def test_tflite_preset_follows_the_int8_spec():
    p = preset("tflite-int8")
    assert p.torch_engine is None
    assert (p.activation.qmin, p.activation.qmax, p.activation.signed) == (-128, 127, True)
    assert not p.activation.symmetric
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 10)).astype(np.float32)
    qp = p.weight.calibrate(w)
    assert (qp.qmin, qp.qmax) == (-127, 127) and np.all(qp.zero_point == 0)
    amax = np.abs(w).max(axis=1)
    np.testing.assert_array_equal(qp.scale, (amax / np.float32(127)).astype(np.float32))
    # both ends of a symmetric narrow grid are exact: +-max|w| are levels
    wq = fake_quantize(w, replace(qp, channel_axis=0))
    np.testing.assert_allclose(np.abs(wq).max(axis=1), amax, rtol=1e-6)
    with pytest.raises(ValueError, match="not a PyTorch backend"):
        p.torch_qconfig()


def test_unknown_or_unavailable_preset_lists_the_available_ones(monkeypatch):
    with pytest.raises(ValueError, match="unknown preset 'tensorrt'.*tflite-int8"):
        preset("tensorrt")
    import distortion.activations as act

    monkeypatch.setattr(act, "_supported_engines", lambda: ["qnnpack"])
    with pytest.raises(ValueError, match=r"'pytorch-x86' needs .*'x86'.*pytorch-qnnpack"):
        preset("pytorch-x86")
    assert preset("pytorch-qnnpack").torch_engine == "qnnpack"
    assert set(PRESETS) == {"pytorch-x86", "pytorch-fbgemm", "pytorch-qnnpack", "tflite-int8"}


# ----------------------------------------------------------------------------- error model
def _naive_error_model(x, qp, axis=None):
    """Transcription of eq. A5-A6 entry by entry in float64 (theory/activations.md)."""
    x = np.asarray(x, np.float64)
    if axis is not None:
        x = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        lo, hi, d2 = qp.lo[:, None], qp.hi[:, None], (qp.scale**2)[:, None] / 12.0
    else:
        x = x.reshape(1, -1)
        lo, hi, d2 = qp.lo, qp.hi, qp.scale**2 / 12.0
    beyond = (x < lo) | (x > hi)
    per_entry = np.where(x == 0, 0.0, np.where(beyond, (x - np.clip(x, lo, hi)) ** 2, d2))
    m2, mu = per_entry.mean(axis=1), (np.clip(x, lo, hi) - x).mean(axis=1)
    return (m2[0], mu[0]) if axis is None else (m2, mu)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("calibration", ["minmax", "percentile", "mse"])
def test_error_model_matches_a_naive_transcription(granularity, calibration):
    rng = np.random.default_rng(4)
    x = _acts(rng, relu=True)
    q = ActivationQuantizer(5, granularity=granularity, calibration=calibration, percentile=99.0)
    qp = q.calibrate(x)
    em = q.error_model(x, qp)
    m2, mu = _naive_error_model(x, qp, None if granularity == "tensor" else 1)
    np.testing.assert_allclose(em.second_moment, m2, rtol=1e-12, atol=0)
    np.testing.assert_allclose(em.mean, mu, rtol=1e-12, atol=1e-300)
    assert em.random and em.rule == "activation" and em.granularity == granularity
    st = activation_stats(x, qp)
    assert isinstance(st, ActivationStats)
    np.testing.assert_array_equal(q.error_model(st, qp).second_moment, em.second_moment)
    if calibration == "minmax":
        # on its own calibration sample only the maximum can lie beyond the top level (by the
        # float32 rounding of the scale): the model is (1 - pi_0) Delta^2 / 12 (eq. A5)
        assert np.all(st.clipped_fraction <= 1.0 / st.n)
        np.testing.assert_array_less(st.clip_second_moment, 1e-9 * qp.scale**2)
        hu = (1 - st.zero_fraction) * uniform_error_variance(qp.scale)
        # the maximum entry, if beyond, trades its Delta^2/12 for a negligible clipping term
        assert np.all(np.abs(em.second_moment - hu) <= hu * 1.01 / (st.n * (1 - st.zero_fraction)))


def test_error_model_predicts_the_mean_square_error_of_fresh_inputs():
    # Calibrate on one sample of a rectified Laplace layer input, predict the error of a
    # fresh sample: |measured - predicted| < 4 combined standard errors (both are iid means).
    rng = np.random.default_rng(6)

    def draw(n):
        return np.maximum(rng.laplace(0.2, 1.0, n), 0.0).astype(np.float32)

    q = ActivationQuantizer(6, calibration="percentile", percentile=99.9)
    cal = draw(400_000)
    qp = q.calibrate(cal)
    em = q.error_model(cal, qp)
    st = activation_stats(cal, qp)
    assert 0.4 < float(st.zero_fraction) < 0.5 and float(st.clipped_fraction) > 0
    # per-entry terms of eq. A5 on the calibration sample (their mean is the model)
    c64 = cal.astype(np.float64)
    beyond = (c64 > qp.hi) | (c64 < qp.lo)
    clip_terms = np.where(beyond, (c64 - np.clip(c64, qp.lo, qp.hi)) ** 2, 0.0)
    terms = np.where((c64 == 0) | beyond, 0.0, qp.scale**2 / 12) + clip_terms
    fresh = draw(400_000)
    d = fake_quantize(fresh, qp).astype(np.float64) - fresh
    e2 = d**2
    se = np.sqrt(terms.var() / terms.size + e2.var() / e2.size)
    assert abs(e2.mean() - float(em.second_moment)) < 4 * se
    # each term matters: without the exact zeros (H_U on every entry) or without the
    # clipping term, the prediction is many standard errors off
    hu_only = float(uniform_error_variance(qp.scale))
    no_clip = float(em.second_moment) - float(st.clip_second_moment)
    assert abs(e2.mean() - hu_only) > 4 * se
    assert abs(e2.mean() - no_clip) > 4 * se
    # the clipping bias (eq. A6) is negative and matches the fresh sample's mean error
    se_mu = np.sqrt(d.var() / d.size + (np.clip(c64, qp.lo, qp.hi) - c64).var() / c64.size)
    assert float(em.mean) < 0 and abs(d.mean() - float(em.mean)) < 4 * se_mu


def test_percentile_and_mse_calibration():
    rng = np.random.default_rng(7)
    x = rng.laplace(0.0, 1.0, 100_000).astype(np.float32)
    qmm = ActivationQuantizer(4, signed=True)
    qpc = replace(qmm, calibration="percentile", percentile=99.0)
    qms = replace(qmm, calibration="mse")
    st = activation_stats(x, qpc.calibrate(x))
    assert 0.015 < float(st.clipped_fraction) < 0.025  # ~1% on each side

    def sse(a, qp):
        return float(np.sum((fake_quantize(a, qp).astype(np.float64) - a) ** 2))

    assert sse(x, qms.calibrate(x)) < 0.5 * sse(x, qmm.calibrate(x))
    # mse never does worse than minmax on its sample (ratio 1 is a candidate)
    u = rng.uniform(-1, 1, 10_000).astype(np.float32)
    assert sse(u, qms.calibrate(u)) <= sse(u, qmm.calibrate(u))


def test_compress_follows_the_compressor_protocol():
    rng = np.random.default_rng(8)
    x = _acts(rng, relu=True)
    q = ActivationQuantizer(8)
    assert isinstance(q, Compressor)
    c = q.compress(x)
    assert isinstance(c, Compressed) and isinstance(c.detail, ActivationQParams)
    np.testing.assert_array_equal(c.values, fake_quantize(x, c.detail))
    np.testing.assert_array_equal(c.error, c.values.astype(np.float64) - x)
    np.testing.assert_array_equal(
        c.error_model.second_moment, q.error_model(x, c.detail).second_moment
    )


# ----------------------------------------------------------------------------- hooks
def _manual_forward(net, x, qp):
    """TinyNet.forward with each layer's input fake-quantized by hand."""

    def fq(name, t):
        return fake_quantize(t, qp[name]) if name in qp else t

    out = torch.relu(net.bn1(net.conv1(fq("conv1", x))))
    out = torch.relu(net.conv2(fq("conv2", out)))
    out = torch.relu(net.conv3(fq("conv3", out)))
    out = torch.relu(net.fc1(fq("fc1", out.flatten(1))))
    return net.fc2(fq("fc2", out))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_hooked_model_equals_a_manual_forward_with_quantized_inputs(granularity):
    net = tiny_net()
    x, y = tiny_data(48)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    q = ActivationQuantizer(4, granularity=granularity)
    cal = calibrate_activations(net, (x, y), "all", q, n_images=32, seed=3)
    assert isinstance(cal, ActivationCalibration)
    assert cal.layers == tuple(LAYERS) and cal.n_images == 32
    # the input of conv1 (the image) is signed: an affine zero point; after a ReLU it is 0
    assert np.all(cal.qparams["conv1"].zero_point > 0)
    assert all(np.all(cal.qparams[n].zero_point == 0) for n in LAYERS[1:])
    with torch.no_grad():
        float_out = net(x)
        with quantize_activations(net, cal) as hooked:
            assert hooked is net
            out = net(x)
        ref = _manual_forward(net, x, cal.qparams)
        assert torch.equal(out, ref)
        assert not torch.equal(out, float_out)
        # hooks removed, model unchanged
        assert torch.equal(net(x), float_out)
        sub = {k: cal.qparams[k] for k in ("conv2", "fc1")}
        with quantize_activations(net, sub):
            assert torch.equal(net(x), _manual_forward(net, x, sub))
    assert all(not m._forward_pre_hooks for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])
    frame = cal.to_frame()
    assert list(frame["layer"]) == LAYERS
    assert set(cal.error_models()) == set(LAYERS)


def test_hooks_are_removed_when_the_block_raises():
    net = tiny_net()
    x, _ = tiny_data(8)
    cal = calibrate_activations(net, x, ["fc1"], ActivationQuantizer(8), n_images=8)
    with pytest.raises(RuntimeError, match="boom"), quantize_activations(net, cal.qparams):
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_calibration_uses_the_seeded_images_and_matches_calibrate():
    net = tiny_net()
    x, y = tiny_data(40)
    q = ActivationQuantizer(6, signed=True, granularity="channel")
    a = calibrate_activations(net, (x, y), ["conv2", "fc2"], q, n_images=10, seed=11)
    b = calibrate_activations(net, (x, y), ["conv2", "fc2"], q, n_images=10, seed=11)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.indices.size == 10 and np.all(np.diff(a.indices) > 0)
    seen = {}
    h = net.conv2.register_forward_pre_hook(lambda m, i: seen.setdefault("x", i[0].clone()))
    with torch.no_grad():
        net(x[torch.as_tensor(a.indices)])
    h.remove()
    ref = q.calibrate(seen["x"].numpy())
    np.testing.assert_array_equal(a.qparams["conv2"].scale, ref.scale)
    np.testing.assert_array_equal(a.qparams["conv2"].zero_point, ref.zero_point)
    c = calibrate_activations(net, (x, y), ["conv2"], q, n_images=10, seed=12)
    assert not np.array_equal(c.indices, a.indices)
    # an indexable dataset of (image, label) gives the same as the tensor
    ds = [(x[i], int(y[i])) for i in range(len(y))]
    d = calibrate_activations(net, ds, ["conv2", "fc2"], q, n_images=10, seed=11, batch_size=3)
    np.testing.assert_array_equal(d.qparams["fc2"].scale, a.qparams["fc2"].scale)
    assert net.training is False


class _WithUnused(TinyNet):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(3, 3)


def test_calibration_errors_name_the_layer():
    net = tiny_net()
    x, y = tiny_data(8)
    q = ActivationQuantizer(8)
    with pytest.raises(ValueError, match="calibration set is empty"):
        calibrate_activations(net, x[:0], "all", q, n_images=1)
    with pytest.raises(ValueError, match="exceeds"):
        calibrate_activations(net, x, "all", q, n_images=9)
    with pytest.raises(ValueError, match="'bn1'.*cannot be hooked"):
        calibrate_activations(net, x, ["conv1", "bn1"], q, n_images=4)
    with pytest.raises(ValueError, match="no layer 'conv9'"):
        calibrate_activations(net, x, ["conv9"], q, n_images=4)
    with pytest.raises(ValueError, match="'bn1'"):
        with quantize_activations(net, {"bn1": ActivationQuantizer(8).calibrate(x.numpy())}):
            pass
    odd = _WithUnused().double().eval()
    with pytest.raises(ValueError, match=r"\['unused'\] cannot be hooked.*never calls"):
        calibrate_activations(odd, x, ["fc1", "unused"], q, n_images=4)
    cal = calibrate_activations(odd, x, "all", q, n_images=4)  # "all" skips it
    assert cal.layers == tuple(LAYERS)


# ----------------------------------------------------------------------------- real int8
@pytest.fixture
def keep_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_convert_int8_fx_runs_and_is_close_to_the_float_model(backend, keep_engine):
    if backend not in torch.backends.quantized.supported_engines:
        pytest.skip(f"no {backend} engine")
    net = tiny_net(dtype=torch.float32)
    x, _ = tiny_data(256, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qnet = convert_int8_fx(net, x[:128], backend)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in qnet.modules())
    with torch.no_grad():
        a, b = net(x), qnet(x)
    assert b.dtype == torch.float32 and b.shape == a.shape
    # relative error about 0.1 (8-bit activations of a random CNN with tiny logits)
    assert float((a - b).norm() / a.norm()) < 0.25
    assert float((a.argmax(1) == b.argmax(1)).float().mean()) > 0.8
    with pytest.raises(ValueError, match="not a quantized engine"):
        convert_int8_fx(net, x[:8], "tensorrt")
