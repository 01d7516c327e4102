"""Empirical bias correction (theory/multilayer.md section 16, eq. L22-L23).

The input means are checked against a per-sample unfold loop; the corrected layer's output
error has zero mean on the calibration inputs; the centred Grams and the bias-corrected
linearization (level 2L) against a torch.func reference that writes the corrected biases
b0 - (W - W0) u_bar into the parameters of the network (float64, rel < 1e-10).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from distortion.experiments.bias_correction import (  # noqa: E402
    InputMeans,
    apply_bias_correction,
    bias_corrections,
    input_means,
)
from distortion.experiments.compare import first_order_actual_flips  # noqa: E402
from distortion.experiments.models import get_layer  # noqa: E402
from distortion.experiments.sensitivity import gradient_grams  # noqa: E402
from distortion.quantize import UniformQuantizer  # noqa: E402

LAYERS = ["conv1", "conv2", "fc"]


class Tiny(nn.Module):
    """Strided padded conv, batch norm, grouped conv (no bias), linear."""

    def __init__(self, bias2: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=bias2)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def _net(seed: int = 0, bias2: bool = False) -> Tiny:
    torch.manual_seed(seed)
    net = Tiny(bias2).double().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 3, 8, 8), generator=g, dtype=torch.float64) + 0.2  # non-zero mean
    return x, torch.randint(0, 5, (n,), generator=g)


def _naive_means(net: Tiny, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample unfold of each layer's recorded input, averaged over samples and positions."""
    seen = {}
    hooks = [
        get_layer(net, n).register_forward_hook(
            lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach().clone())
        )
        for n in LAYERS
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    out = {}
    for n in ("conv1", "conv2"):
        m = get_layer(net, n)
        acc = 0.0
        for i in range(x.shape[0]):
            u = F.unfold(seen[n][i : i + 1], m.kernel_size, padding=m.padding, stride=m.stride)
            acc = acc + u[0].mean(1)  # (C * k * k,)
        mean = (acc / x.shape[0]).numpy()
        out[n] = mean.reshape(m.groups, -1)
    out["fc"] = seen["fc"].mean(0).numpy()[None]
    return out


def test_input_means_match_a_per_sample_unfold():
    net = _net()
    x, y = _data(7, 1)
    means = input_means(net, (x, y), batch_size=3, progress=False)
    assert means.layer_names == tuple(LAYERS) and means.n_samples == 7
    ref = _naive_means(net, x)
    for n in LAYERS:
        np.testing.assert_allclose(means.mean(n), ref[n], rtol=1e-12, atol=1e-14)
    assert means.mean("conv2").shape == (2, 2 * 9)  # groups x (in/groups * k * k)
    frame = means.to_frame()
    assert list(frame["layer"]) == LAYERS and (frame["mean_rms"] > 0).all()


def _quantized(net: Tiny, bits: int = 3) -> dict[str, np.ndarray]:
    q = UniformQuantizer(bits=bits, granularity="channel")
    return {
        n: torch.as_tensor(q.quantize(get_layer(net, n).weight.detach()).values).numpy()
        for n in LAYERS
    }


def test_corrected_layer_has_zero_mean_output_error_on_the_calibration_inputs():
    net = _net(bias2=False)
    x, y = _data(16, 2)
    means = input_means(net, (x, y), progress=False)
    w0 = {n: get_layer(net, n).weight.detach().clone() for n in LAYERS}
    wq = _quantized(net)
    shifts = bias_corrections(w0, wq, means)
    assert all(s.shape == (w0[n].shape[0],) for n, s in shifts.items())
    qnet = _net(bias2=False)
    with torch.no_grad():
        for n in LAYERS:
            get_layer(qnet, n).weight.copy_(torch.as_tensor(wq[n]))
    apply_bias_correction(qnet, shifts)
    assert qnet.conv2.bias is not None  # created: the layer had none
    # the first layer sees the same input in both networks: its output error, corrected,
    # averages to zero over the calibration images and positions, channel by channel
    with torch.no_grad():
        err = qnet.conv1(x) - net.conv1(x)
        plain = F.conv2d(x, torch.as_tensor(wq["conv1"]) - w0["conv1"], None, 2, 1)
    assert np.abs(err.mean((0, 2, 3)).numpy()).max() < 1e-13
    assert np.abs(plain.mean((0, 2, 3)).numpy()).max() > 1e-3  # the correction did something


def _reference_corrected(net: Tiny, means: InputMeans, x: torch.Tensor, errors=None):
    """vmap(jacrev) of the network whose biases are b0 - (W - W0) u_bar, every layer biased
    in the reference copy (conv2 gets a zero bias), and the tangent J vec(E) if ``errors``."""
    from torch.func import functional_call, jacrev, jvp, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}
    w0 = {n: params[f"{n}.weight"] for n in LAYERS}
    b0 = {n: params.get(f"{n}.bias", torch.zeros(w0[n].shape[0], dtype=torch.float64))
          for n in LAYERS}  # fmt: skip
    ub = {n: torch.as_tensor(means.mean(n)) for n in LAYERS}
    ref = _net(bias2=True)  # same structure with a bias everywhere
    ref.load_state_dict({**net.state_dict(), "conv2.bias": b0["conv2"]})

    def f(w, xi):
        p = {k: v for k, v in params.items()}
        for n in LAYERS:
            g = ub[n].shape[0]
            e = (w[n] - w0[n]).reshape(g, w0[n].shape[0] // g, -1)
            p[f"{n}.weight"] = w[n]
            p[f"{n}.bias"] = b0[n] - torch.einsum("god,gd->go", e, ub[n]).reshape(-1)
        return functional_call(ref, (p, buffers), (xi,))

    jac = vmap(jacrev(lambda w, xi: f(w, xi[None])[0]), in_dims=(None, 0))(w0, x)
    grams = []
    for n in LAYERS:
        j = jac[n].reshape(x.shape[0], jac[n].shape[1], -1)
        grams.append(torch.einsum("nki,nji->nkj", j, j).numpy())
    dz = None
    if errors is not None:
        tang = {n: torch.as_tensor(errors[n]) for n in LAYERS}
        _, dz = jvp(lambda w: f(w, x), (w0,), (tang,))
        dz = dz.numpy()
    return np.stack(grams, axis=1), dz


def test_centred_grams_and_corrected_linearization_match_torch_func():
    net = _net()
    xc, yc = _data(12, 3)  # calibration
    x, y = _data(5, 4)  # evaluation
    means = input_means(net, (xc, yc), progress=False)
    g = gradient_grams(net, (x, y), input_means=means, cache=False, progress=False,
                       n_realizations=0)  # fmt: skip
    w0 = {n: get_layer(net, n).weight.detach() for n in LAYERS}
    wq = _quantized(net)
    errors = {n: wq[n] - w0[n].numpy() for n in LAYERS}
    ref, dz_ref = _reference_corrected(net, means, x, errors)
    scale = np.abs(ref).max(axis=(2, 3), keepdims=True)
    assert np.abs(g.grams - ref).max() / scale.min() < 1e-10
    plain = gradient_grams(net, (x, y), cache=False, progress=False, n_realizations=0)
    assert np.abs(plain.grams - ref).max() / scale.min() > 1e-3  # centring changes them

    class Err:  # what first_order_actual_flips reads of a quantized tensor
        def __init__(self, e):
            self.error = e

    data = type("D", (), {"batches": lambda self, b: iter([(x, y)])})()
    z, zl = first_order_actual_flips(net, data, {n: Err(e) for n, e in errors.items()},
                                     bias_correction=means)  # fmt: skip
    np.testing.assert_allclose(zl - z, dz_ref, rtol=1e-10, atol=1e-12)


def test_grams_cache_key_changes_with_the_means(tmp_path):
    net = _net()
    x, y = _data(4, 5)
    m1 = input_means(net, (x, y), progress=False)
    m2 = input_means(net, (x + 0.1, y), progress=False)
    kw = {"cache_dir": tmp_path, "progress": False, "n_realizations": 0}
    keys = {gradient_grams(net, (x, y), input_means=m, **kw).key for m in (None, m1, m2)}
    assert len(keys) == 3
    again = gradient_grams(net, (x, y), input_means=m1, **kw)  # from the cache
    assert again.key in keys and again.meta["bias_correction"]["n_samples"] == 4


def test_clear_errors():
    net = _net()
    x, y = _data(4, 6)
    with pytest.raises(ValueError, match="at least one sample"):
        input_means(net, (x[:0], y[:0]), progress=False)
    means = input_means(net, (x, y), layers=["conv1"], progress=False)
    with pytest.raises(ValueError, match="no input mean for layer 'conv2'"):
        gradient_grams(net, (x, y), input_means=means, cache=False, progress=False)
    with pytest.raises(ValueError, match="must be an InputMeans"):
        gradient_grams(net, (x, y), input_means={"conv1": 0}, cache=False, progress=False)
    with pytest.raises(ValueError, match="finite"):
        InputMeans(("a",), (np.array([[np.nan]]),), 1)
    w = get_layer(net, "conv1").weight.detach()
    with pytest.raises(ValueError, match="different layers"):
        bias_corrections({"conv1": w}, {}, means)
    with pytest.raises(ValueError, match="compressed shape"):
        bias_corrections({"conv1": w}, {"conv1": w[:2]}, means)


def test_attention_projections_are_refused():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.att(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    net = Attn().double().eval()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="not supported for 'att.in_proj'"):
        input_means(net, (x, torch.zeros(3, dtype=torch.long)), progress=False)
    means = input_means(net, (x, torch.zeros(3, dtype=torch.long)), layers=["fc"],
                        progress=False)  # fmt: skip
    assert means.mean("fc").shape == (1, 8)


def test_estimator_and_measurement_of_the_corrected_network():
    from distortion.estimator import AccuracyLossEstimator
    from distortion.experiments.measure import measure, quantize_model
    from distortion.theory.multilayer import multilayer_distortion

    net = _net()
    xc, yc = _data(20, 7)
    x, y = _data(30, 8)
    q = UniformQuantizer(bits=3, granularity="channel")
    kw = {"quantizer": q, "progress": False, "cache_dir": None, "n_realizations": 0}
    est = AccuracyLossEstimator(**kw).fit_model(net, (x, y), bias_correction=(xc, yc))
    plain = AccuracyLossEstimator(**kw).fit_model(net, (x, y))
    means = est.bias_correction_
    assert isinstance(means, InputMeans) and means.n_samples == 20
    assert plain.bias_correction_ is None and est.grams_.key != plain.grams_.key
    # the estimator's prediction is the closed form on the centred Grams
    g = gradient_grams(net, (x, y), input_means=means, granularity="channel",
                       n_realizations=0, cache=False, progress=False)  # fmt: skip
    np.testing.assert_allclose(est.grams_.grams, g.grams, rtol=1e-12)
    pred = est.predict(bits=[3])
    m2 = [q.compress(get_layer(net, n).weight.detach()).error_model.second_moment for n in LAYERS]
    ref = multilayer_distortion(g, m2, band=False)
    assert pred.flip_rate[0] == pytest.approx(ref.flip_rate, rel=1e-9)
    # the measurement runs the corrected network: its biases moved, its weights quantized
    qnet, _ = quantize_model(net, q, LAYERS, bias_correction=means, input_shape=(1, 3, 8, 8))
    plain_q, _ = quantize_model(net, q, LAYERS, input_shape=(1, 3, 8, 8))
    assert not torch.equal(qnet.conv1.bias, plain_q.conv1.bias)
    assert torch.equal(qnet.conv1.weight, plain_q.conv1.weight)
    with torch.no_grad():
        corrected_flips = float(np.mean((qnet(x).argmax(1) != net(x).argmax(1)).numpy()))
    m = measure(net, (x, y), q, layers=LAYERS, bias_correction=means, progress=False)
    assert m.flip_rate == pytest.approx(corrected_flips)


def test_any_compressor_gets_the_same_correction():
    from distortion.compressors import MagnitudePruner
    from distortion.experiments.compare_compression import compress_layers, compressed_model

    net = _net()
    x, y = _data(16, 9)
    means = input_means(net, (x, y), progress=False)
    weights = {n: get_layer(net, n).weight.detach() for n in LAYERS}
    comp = compress_layers(MagnitudePruner(0.5), weights)
    plain = compressed_model(net, comp)
    corrected = compressed_model(net, comp, bias_correction=means)
    assert torch.equal(plain.conv1.weight, corrected.conv1.weight)
    assert plain.conv2.bias is None and corrected.conv2.bias is not None
    with torch.no_grad():
        err = corrected.conv1(x) - net.conv1(x)
        err_plain = plain.conv1(x) - net.conv1(x)
    assert np.abs(err.mean((0, 2, 3)).numpy()).max() < 1e-13
    assert np.abs(err_plain.mean((0, 2, 3)).numpy()).max() > 1e-3


def test_means_of_the_wrong_type_are_a_clear_error():
    from distortion.experiments.measure import quantize_model

    net = _net()
    with pytest.raises(ValueError, match="must be an InputMeans"):
        quantize_model(net, UniformQuantizer(3), LAYERS, bias_correction={"conv1": 0},
                       input_shape=(1, 3, 8, 8))  # fmt: skip
