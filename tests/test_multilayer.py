"""Tests of the first-order multi-layer model: per-sample Grams, orthant probabilities,
closed-form flip rates against real (dithered) quantization, and the knapsack allocation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from distortion.quantize import UniformQuantizer
from distortion.theory.multiclass import semiparametric_distortion
from distortion.theory.multilayer import (
    GradientGrams,
    knapsack_allocation,
    margin_statistics,
    multilayer_distortion,
    noise_covariance,
    orthant_flip,
)

torch = pytest.importorskip("torch")
nn = torch.nn


# ----------------------------------------------------------------------------- a tiny CNN
class TinyNet(nn.Module):
    """Conv (bias, BN) -> grouped strided conv -> 'same' conv with even kernel -> 2 linear."""

    def __init__(self, n_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.conv3 = nn.Conv2d(8, 8, 2, padding="same", dilation=1, bias=True)
        self.fc1 = nn.Linear(8 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, n_classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.conv2(out))
        out = torch.relu(self.conv3(out))
        out = torch.relu(self.fc1(out.flatten(1)))
        return self.fc2(out)


LAYERS = ["conv1", "conv2", "conv3", "fc1", "fc2"]


def tiny_net(seed: int = 0, n_classes: int = 4, dtype=torch.float64) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet(n_classes)
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 1.5)
        net.bn1.weight.uniform_(0.5, 1.5)
    net = net.to(dtype).eval()
    with torch.no_grad():  # centre the logits so that every class gets predicted
        x = torch.randn(512, 3, 8, 8, generator=torch.Generator().manual_seed(99), dtype=dtype)
        net.fc2.bias -= net(x).mean(0)
    return net


def tiny_data(n: int, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def reference_grams(net, x, layers):
    """Naive per-sample Jacobians with torch.func (vmap of jacrev), Grams in float64."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}
    names = [f"{n}.weight" for n in layers]

    def f(w, xi):
        p = dict(params)
        p.update(w)
        return functional_call(net, (p, buffers), (xi[None],))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))({n: params[n] for n in names}, x)
    out = []
    for n in names:
        j = jac[n].reshape(x.shape[0], jac[n].shape[1], -1).double()  # (N, K, n)
        out.append(torch.einsum("nki,nji->nkj", j, j).numpy())
    return np.stack(out, axis=1), jac


@pytest.fixture(scope="module")
def tiny_grams(tmp_path_factory):
    from distortion.experiments.sensitivity import gradient_grams

    net = tiny_net()
    x, y = tiny_data(64)
    g = gradient_grams(
        net, (x, y), granularity="channel", n_realizations=40, batch_size=17,
        cache_dir=tmp_path_factory.mktemp("cache"), progress=False,
    )  # fmt: skip
    return net, x, y, g


# ----------------------------------------------------------------------------- Grams
def test_grams_match_torch_func_reference(tiny_grams):
    net, x, y, g = tiny_grams
    assert g.layer_names == tuple(LAYERS)
    ref, jac = reference_grams(net, x, LAYERS)
    np.testing.assert_allclose(g.grams, ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        np.testing.assert_allclose(g.logits, net(x).numpy(), rtol=1e-12)
    # per-channel Grams sum to the per-tensor ones and match the reference per channel
    k = g.n_classes
    iu = np.triu_indices(k)
    off = g.channel_offsets()
    for li, name in enumerate(LAYERS):
        cg = g.channel_grams[:, off[li] : off[li + 1]]
        j = jac[f"{name}.weight"].reshape(x.shape[0], k, g.weight_shapes[li][0], -1)
        refc = torch.einsum("nkci,njci->nckj", j, j).numpy()[:, :, iu[0], iu[1]]
        np.testing.assert_allclose(cg, refc, rtol=1e-5, atol=1e-6)  # float32 storage
        full = cg.sum(axis=1)
        np.testing.assert_allclose(full, g.grams[:, li][:, iu[0], iu[1]], rtol=1e-5, atol=1e-5)


def test_projections_are_jacobian_times_cached_draws(tiny_grams):
    from distortion.experiments.sensitivity import _uniform_draws

    net, x, _, g = tiny_grams
    _, jac = reference_grams(net, x[:5], LAYERS)
    for li, name in enumerate(LAYERS):
        j = jac[f"{name}.weight"].reshape(5, g.n_classes, -1).numpy()
        e = _uniform_draws(j.shape[2], 40, g.projection_scales[li], 0, li)
        np.testing.assert_allclose(
            g.projections[:5, li], np.einsum("nki,ir->nrk", j, e), rtol=1e-5, atol=1e-6
        )


def test_grams_cache_roundtrip_and_key(tiny_grams, tmp_path):
    from distortion.experiments.sensitivity import gradient_grams, load_grams, save_grams

    net, x, y, g = tiny_grams
    path = save_grams(g, tmp_path / "g.npz")
    back = load_grams(path, expected_key=g.key)
    np.testing.assert_array_equal(back.grams, g.grams)
    np.testing.assert_array_equal(back.projections, g.projections)
    assert back.layer_names == g.layer_names and back.weight_shapes == g.weight_shapes
    for a, b in zip(back.weights, g.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="other weights"):
        load_grams(path, expected_key="0" * 64)
    # the key changes with the weights, the data and the layers
    kw = dict(cache_dir=tmp_path, progress=False, n_realizations=0)
    a = gradient_grams(net, (x[:8], y[:8]), layers=["fc2"], **kw)
    b = gradient_grams(net, (x[:9], y[:9]), layers=["fc2"], **kw)
    c = gradient_grams(net, (x[:8], y[:8]), layers=["fc1", "fc2"], **kw)
    assert len({a.key, b.key, c.key}) == 3
    again = gradient_grams(net, (x[:8], y[:8]), layers=["fc2"], **kw)
    assert again.meta.get("cache_file")  # read back from the cache
    np.testing.assert_array_equal(again.grams, a.grams)


def test_unknown_layer_and_bad_options_are_clear_errors():
    from distortion.experiments.sensitivity import gradient_grams

    net = tiny_net()
    x, y = tiny_data(4)
    with pytest.raises(ValueError, match="unknown layer.*quantizable layers are: conv1"):
        gradient_grams(net, (x, y), layers=["nope"], cache=False, progress=False)
    with pytest.raises(ValueError, match="granularity"):
        gradient_grams(net, (x, y), granularity="row", cache=False, progress=False)


def test_last_layer_grams_are_feature_norms(tiny_grams):
    # z = W h + b: dz_j/dW = e_j h^T, so Gamma = ||h||^2 I (eq. L3)
    net, x, _, g = tiny_grams
    with torch.no_grad():
        h = torch.relu(net.fc1(torch.relu(net.conv3(torch.relu(net.conv2(
            torch.relu(net.bn1(net.conv1(x)))))).flatten(1))))  # fmt: skip
    norms = (h**2).sum(1).numpy()
    np.testing.assert_allclose(g.grams[:, -1], norms[:, None, None] * np.eye(g.n_classes))


# ----------------------------------------------------------------------------- orthant
def _random_problem(rng, n, dim, scale=1.5):
    a = rng.standard_normal((n, dim, dim + 3))
    s = a @ a.transpose(0, 2, 1) / (dim + 3) + 0.5  # positively correlated margins
    m = np.abs(rng.standard_normal((n, dim))) * scale + 0.3
    return m, s


def test_radial_orthant_matches_scipy_mvn_within_stderr():
    rng = np.random.default_rng(5)
    m, s = _random_problem(rng, 20, 4)
    res = orthant_flip(m, s, method="radial", n_rotations=64, seed=1)
    ref = np.array(
        [
            1.0 - stats.multivariate_normal.cdf(
                m[i], mean=np.zeros(4), cov=s[i], abseps=1e-6, releps=1e-6
            )
            for i in range(20)
        ]
    )  # fmt: skip
    # Each sample: unbiased estimate with its own integration stderr; pooled over samples
    z = (res.leave - ref) / res.stderr
    assert np.all(np.abs(z) < 5)
    assert abs(np.mean(res.leave - ref)) < 4 * np.sqrt(np.sum(res.stderr**2)) / 20


def test_radial_is_exact_for_one_margin_and_mixed_signs_agree_with_scipy():
    rng = np.random.default_rng(6)
    m = rng.normal(size=(50, 1))
    s = rng.uniform(0.2, 3.0, size=(50, 1, 1))
    res = orthant_flip(m, s, method="radial")
    np.testing.assert_allclose(res.stay, stats.norm.cdf(m[:, 0] / np.sqrt(s[:, 0, 0])), atol=1e-12)
    m2, s2 = _random_problem(rng, 10, 3)
    m2 = m2 - 1.5  # some margins negative (the correct-class probability of an error)
    res2 = orthant_flip(m2, s2, method="radial", n_rotations=64, seed=2)
    ref = np.array(
        [
            stats.multivariate_normal.cdf(m2[i], cov=s2[i], abseps=1e-6, releps=1e-6)
            for i in range(10)
        ]
    )
    assert np.all(np.abs(res2.stay - ref) < 5 * res2.stderr + 1e-9)


def test_union_bounds_and_independence_brackets():
    rng = np.random.default_rng(7)
    m, s = _random_problem(rng, 30, 6, scale=2.5)
    rad = orthant_flip(m, s, method="radial", n_rotations=32)
    uni = orthant_flip(m, s, method="union")
    ind = orthant_flip(m, s, method="independent")
    # Boole: union >= exact; Slepian (correlations >= 0 here): independent >= exact
    assert np.all(uni.leave >= rad.leave - 4 * rad.stderr)
    assert np.all(ind.leave >= rad.leave - 4 * rad.stderr)
    assert np.all(uni.leave >= ind.leave - 1e-12)


def test_orthant_input_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        orthant_flip(np.ones((2, 3)), np.tile(np.eye(3), (2, 1, 1)), method="exact")
    with pytest.raises(ValueError, match="shape"):
        orthant_flip(np.ones((2, 3)), np.ones((2, 3)))


# ----------------------------------------------------------------------------- closed form
def test_margin_covariance_matches_naive_transcription(tiny_grams):
    _, _, _, g = tiny_grams
    rng = np.random.default_rng(3)
    v = list(rng.uniform(0, 1e-3, g.n_layers))
    cov = noise_covariance(g, v)
    naive = sum(v[l] * g.grams[:, l] for l in range(g.n_layers))
    np.testing.assert_allclose(cov, naive, rtol=1e-12)
    pred = g.predictions()
    ms = margin_statistics(g.logits, cov, pred)
    for i in range(5):
        r = pred[i]
        a = np.eye(g.n_classes)[r][None, :] - np.delete(np.eye(g.n_classes), r, axis=0)
        np.testing.assert_allclose(ms.covariance[i], a @ cov[i] @ a.T, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(ms.margins[i], a @ g.logits[i])
    # diagonal = sum_l sigma_l^2 G_lj (eq. L5)
    gn = g.margin_gradient_norms()
    for i in range(5):
        diag = np.delete((gn[i] * np.array(v)[:, None]).sum(0), pred[i])
        np.testing.assert_allclose(np.diag(ms.covariance[i]), diag, rtol=1e-10)


def test_per_channel_variances_use_channel_grams(tiny_grams):
    _, _, _, g = tiny_grams
    rng = np.random.default_rng(4)
    v = [rng.uniform(0, 1e-3, c) for c in g.channel_counts()]
    cov = noise_covariance(g, v)
    # naive: per channel Gram from the packed triangles
    k = g.n_classes
    iu = np.triu_indices(k)
    off = g.channel_offsets()
    naive = np.zeros_like(cov)
    for li in range(g.n_layers):
        for c in range(g.channel_counts()[li]):
            p = g.channel_grams[:, off[li] + c].astype(np.float64)
            full = np.zeros((g.n_samples, k, k))
            full[:, iu[0], iu[1]] = p
            full[:, iu[1], iu[0]] = p
            naive += v[li][c] * full
    np.testing.assert_allclose(cov, naive, rtol=1e-5, atol=1e-9)
    # equal per-channel variances reduce to the per-tensor path
    same = [np.full(c, 2e-4) for c in g.channel_counts()]
    np.testing.assert_allclose(
        noise_covariance(g, same), noise_covariance(g, [2e-4] * g.n_layers), rtol=1e-12
    )

    # the memoized per-layer contraction: a proportional vector (another bit-width) is the
    # same sum rescaled, and a new direction (or a vector of the same norm) is recomputed
    for scale in (0.25, 3.0):
        np.testing.assert_allclose(
            noise_covariance(g, [scale * a for a in v]), scale * cov, rtol=1e-12, atol=1e-18
        )
    w = [np.roll(a, 1) for a in v]
    naive_w = noise_covariance(g.__class__(**{f: getattr(g, f) for f in g.__dataclass_fields__}), w)
    np.testing.assert_allclose(noise_covariance(g, w), naive_w, rtol=1e-12)
    assert not np.allclose(naive_w, cov)


def test_last_layer_only_agrees_with_semiparametric_level3(tiny_grams):
    net, x, y, g = tiny_grams
    from distortion.experiments.sensitivity import gradient_grams

    gl = gradient_grams(net, (x, y), layers="last", cache=False, progress=False)
    w = net.fc2.weight.detach().numpy()
    step = UniformQuantizer(4).qparams(w).step
    res = multilayer_distortion(gl, [step**2 / 12], band=True, n_rotations=32)
    with torch.no_grad():
        h = net.fc2.weight.new_zeros(0)
        feats = []
        net.fc2.register_forward_hook(lambda m, i, o: feats.append(i[0]))
        net(x)
        h = feats[-1].numpy()
    ref = semiparametric_distortion(
        h, w, net.fc2.bias.detach().numpy(), step=float(step), labels=y.numpy(), n_realizations=0
    )
    # both integrate the same Gaussian orthant (radial vs Gauss-Hermite)
    assert abs(res.flip_rate - ref.flip_rate) < 4 * res.flip_rate_stderr + 1e-6
    # per sample: the radial estimate is unbiased with its own integration stderr
    err = np.abs(res.flip_probabilities - ref.flip_probabilities)
    assert np.all(err <= 5 * _per_sample_stderr(gl, step**2 / 12, 32) + 1e-9)
    assert abs(res.accuracy_quantized - ref.accuracy_quantized) < 0.01


def _per_sample_stderr(g, var, n_rotations):
    cov = noise_covariance(g, [var])
    ms = margin_statistics(g.logits, cov, g.predictions())
    return orthant_flip(ms.margins, ms.covariance, n_rotations=n_rotations).stderr


def _dither_flip_rates(net, x, allocation, n_draws, seed=0):
    """Brute force: quantize every layer for real with subtractive dither (H_U exact)."""
    import copy

    with torch.no_grad():
        pred = net(x).argmax(1)
    rates = []
    for r in range(n_draws):
        q = copy.deepcopy(net)
        with torch.no_grad():
            for i, (name, bits) in enumerate(allocation.items()):
                mod = q.get_submodule(name)
                res = UniformQuantizer(bits, rounding="dither").quantize(
                    mod.weight, seed=seed + 1000 * r + i
                )
                mod.weight.copy_(res.values)
            rates.append(float((q(x).argmax(1) != pred).double().mean()))
    return np.array(rates)


def boundary_data(net, n: int, seed: int, dmax: float):
    """Inputs close to the decision boundary (so that small errors flip them).

    Bisection along segments between inputs of different predicted classes, then a step
    back of ``U(0, dmax)`` of the segment towards the first input.
    """
    x, _ = tiny_data(6 * n, seed=seed)
    with torch.no_grad():
        p = net(x).argmax(1)
    a, b = x[: 3 * n], x[3 * n :]
    keep = p[: 3 * n] != p[3 * n :]
    a, b, pa = a[keep][:n], b[keep][:n], p[: 3 * n][keep][:n]
    lo = torch.zeros(len(a), dtype=x.dtype)
    hi = torch.ones(len(a), dtype=x.dtype)
    with torch.no_grad():
        for _ in range(40):
            mid = (lo + hi) / 2
            same = net(a + mid[:, None, None, None] * (b - a)).argmax(1) == pa
            lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    d = torch.rand(len(a), generator=torch.Generator().manual_seed(seed), dtype=x.dtype) * dmax
    return a + (lo - d)[:, None, None, None] * (b - a)


def test_first_order_flip_rate_matches_dithered_quantization():
    """Predicted flip rate vs the mean of 100 dithered quantizations of all five layers.

    Subtractive dither makes H_U exact, so the only approximations left are the first-order
    propagation and the Gaussian (CLT) margin noise; 400 inputs near the decision boundary.
    """
    from distortion.experiments.sensitivity import gradient_grams

    net = tiny_net(seed=3)
    x = boundary_data(net, 400, seed=4, dmax=0.1)
    y = torch.zeros(len(x), dtype=torch.long)
    g = gradient_grams(net, (x, y), n_realizations=40, cache=False, progress=False)
    for bits in (4, 6, 8):
        steps = [UniformQuantizer(bits).qparams(w).step for w in g.weights]
        var = [s**2 / 12 for s in steps]
        pred = multilayer_distortion(g, var, n_rotations=8)
        rates = _dither_flip_rates(net, x, dict.fromkeys(LAYERS, bits), 100)
        se = rates.std(ddof=1) / np.sqrt(rates.size)
        assert 0.01 < rates.mean() < 0.5  # a regime with flips to compare
        # statistical tolerance: Monte-Carlo error of the measurement and of the integral
        tol = 4 * np.hypot(se, pred.flip_rate_stderr)
        assert abs(pred.flip_rate - rates.mean()) < tol, (bits, pred.flip_rate, rates.mean(), tol)
        # the simulated realizations (linear model, exact H_U) have the same mean
        sim = pred.flip_counts / g.n_samples
        assert abs(sim.mean() - rates.mean()) < 4 * np.hypot(se, sim.std(ddof=1) / np.sqrt(40))
        if bits == 4:
            # at 4 bits the margins' correlation matters: treating them as independent
            # overestimates the flip rate by more than the measurement error (0.423 vs
            # 0.378 +- 0.007 with these seeds), the union bound even more
            ind = multilayer_distortion(g, var, method="independent", band=False)
            uni = multilayer_distortion(g, var, method="union", band=False)
            assert ind.flip_rate - rates.mean() > 4 * se
            assert uni.flip_rate >= ind.flip_rate


def test_band_from_cached_realizations(tiny_grams):
    _, _, _, g = tiny_grams
    v = [1e-2 * w.var() for w in g.weights]
    res = multilayer_distortion(g, v)
    lo, hi = res.flip_band()
    assert res.n_realizations == 40
    assert lo <= res.simulated_flip_rate() <= hi
    # the band is the order-statistic interval of eq. M16 / L15, computed here independently:
    # the largest l with (R + 1 - 2l) / (R + 1) >= coverage, then the l-th smallest and largest
    srt = sorted(int(c) for c in res.flip_counts)
    for cov in (0.95, 0.9, 0.5):
        l_ = max(l for l in range(0, 21) if (41 - 2 * l) / 41 >= cov - 1e-12)
        assert res.flip_band(cov) == (srt[l_ - 1] / 64, srt[40 - l_] / 64), cov
    assert np.isnan(res.flip_band(0.99).low)  # 40 realizations are too few for 99 %
    p = res.to_prediction()
    assert p.level == "3L" and tuple(p.flip_rate_band) == (lo, hi)
    assert p.flip_rate_stderr == res.flip_rate_stderr
    assert tuple(p.accuracy_loss_band) == tuple(res.accuracy_loss_band())
    assert p.accuracy_compressed == res.accuracy_quantized and p.n_samples == 64
    frame = res.to_frame()
    assert {"flip_rate", "flip_rate_low", "accuracy_loss_high", "level"} <= set(frame.columns)
    assert len(res.to_frame(per_sample=True)) == 64


def test_variance_input_errors(tiny_grams):
    _, _, _, g = tiny_grams
    with pytest.raises(ValueError, match="one entry per cached layer"):
        multilayer_distortion(g, [1e-3])
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        multilayer_distortion(g, [np.ones(3)] + [0.0] * 4)
    with pytest.raises(ValueError, match="finite"):
        multilayer_distortion(g, [np.nan] + [0.0] * 4)
    no_ch = GradientGrams(
        g.layer_names, g.layer_kinds, g.weight_shapes, g.logits, g.grams, labels=g.labels
    )
    with pytest.raises(ValueError, match="granularity='channel'"):
        multilayer_distortion(no_ch, [np.arange(6.0)] + [0.0] * 4, band=False)
    with pytest.raises(ValueError, match="band=False"):
        multilayer_distortion(no_ch, [1e-3] * 5)
    with pytest.raises(ValueError, match="K mismatch"):
        GradientGrams(
            g.layer_names, g.layer_kinds, g.weight_shapes, g.logits, g.grams,
            labels=np.full(g.n_samples, 7),
        )  # fmt: skip


def test_zero_noise_gives_no_flips(tiny_grams):
    _, _, _, g = tiny_grams
    res = multilayer_distortion(g, [0.0] * g.n_layers)
    assert res.flip_rate == 0.0 and res.accuracy_loss == pytest.approx(0.0, abs=1e-15)


# ----------------------------------------------------------------------------- knapsack
def test_knapsack_matches_brute_force():
    rng = np.random.default_rng(8)
    for _ in range(20):
        L, B = rng.integers(2, 5), rng.integers(2, 4)
        sizes = rng.integers(1, 6, size=L) * 4
        bits = np.sort(rng.choice(np.arange(1, 9), size=B, replace=False))
        costs = sizes[:, None] * bits[None, :]
        values = rng.random((L, B))
        budget = int(rng.integers(costs.min(1).sum(), costs.max(1).sum() + 1))
        sol = knapsack_allocation(costs, values, budget)
        best = min(
            (sum(values[l, c] for l, c in enumerate(ch)), ch)
            for ch in itertools.product(range(B), repeat=L)
            if sum(costs[l, c] for l, c in enumerate(ch)) <= budget
        )
        assert sol.total_value == pytest.approx(best[0])
        assert sol.total_cost <= budget


def test_knapsack_impossible_budget():
    with pytest.raises(ValueError, match="budget 5 is impossible"):
        knapsack_allocation(np.array([[4, 8], [4, 8]]), np.ones((2, 2)), 5)


# ----------------------------------------------------------------------------- real data
@pytest.mark.real_data
@pytest.mark.slow
def test_resnet20_grams_match_torch_func(real_data, resnet20_model):
    from distortion.experiments.data import load_dataset
    from distortion.experiments.sensitivity import gradient_grams

    ds = load_dataset(real_data / "data" / "cifar10" / "test.npz", n=5)
    x, _ = next(ds.batches(5))
    layers = ["conv1", "layer2.0.conv1", "layer3.2.conv2", "linear"]
    g = gradient_grams(resnet20_model, ds, layers=layers, n_realizations=0, cache=False,
                       progress=False)  # fmt: skip
    ref, _ = reference_grams(resnet20_model, x, layers)  # float32 Jacobians, float64 Grams
    scale = np.abs(ref).max(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(g.grams / scale, ref / scale, atol=1e-5)
    assert g.accuracy() == pytest.approx(np.mean(g.predictions() == ds.labels))


@pytest.mark.real_data
@pytest.mark.slow
def test_resnet20_last_layer_3L_agrees_with_level3(real_data, resnet20_model, tmp_path):
    """The multi-layer machinery restricted to the last layer is the level-3 model."""
    from distortion.estimator import AccuracyLossEstimator
    from distortion.experiments.data import load_dataset
    from distortion.experiments.features import extract_features

    ds = load_dataset(real_data / "data" / "cifar10" / "test.npz", n=400)
    fs = extract_features(resnet20_model, ds, cache=False, progress=False)
    kw = dict(n_realizations=0, cache_dir=tmp_path, progress=False)
    l3 = AccuracyLossEstimator(UniformQuantizer(3), **kw).fit(fs).predict([3, 5])
    est = AccuracyLossEstimator(UniformQuantizer(3), layers="last", **kw)
    l3l = est.fit_model(resnet20_model, ds).predict([3, 5])
    assert l3l.level == "3L" and l3.level == "3"
    np.testing.assert_allclose(l3l.flip_rate, l3.flip_rate, rtol=0.02)
    np.testing.assert_allclose(l3l.accuracy_loss, l3.accuracy_loss, atol=2e-3)
