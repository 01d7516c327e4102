"""Activation Grams (theory/activations.md eq. A9-A13), the int8 reference and W+A predictions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from test_multilayer import LAYERS, tiny_data, tiny_net  # noqa: E402
from torch import nn  # noqa: E402

from distortion.activations import ActivationQParams, ActivationQuantizer  # noqa: E402
from distortion.estimator import AccuracyLossEstimator  # noqa: E402
from distortion.experiments.activation_grams import (  # noqa: E402
    ActivationGrams,
    activation_grams,
    check_disjoint,
    int8_reference,
    measure_quantized,
    weight_activation_split,
)
from distortion.experiments.activations import calibrate_activations  # noqa: E402
from distortion.experiments.sensitivity import gradient_grams  # noqa: E402
from distortion.quantize import UniformQuantizer  # noqa: E402
from distortion.theory.multilayer import multilayer_distortion  # noqa: E402


def _cal(net, x, bits=4, granularity="tensor"):
    return calibrate_activations(
        net, x, LAYERS, ActivationQuantizer(bits, granularity=granularity), n_images=len(x)
    )


def _reference(net, x, qps):
    """Naive transcription: g by torch.func.jacrev of the logits w.r.t. an additive
    perturbation of each layer's input (at 0), then the masked sums of eq. A10 in numpy."""
    from torch.func import jacrev

    k = net(x[:1]).shape[1]
    covs, shifts = [], []
    for i in range(len(x)):
        xi = x[i : i + 1]
        acts = {}

        def rec(name, acts=acts):
            def hook(m, a):
                acts[name] = a[0].detach()

            return hook

        hs = [net.get_submodule(n).register_forward_pre_hook(rec(n)) for n in LAYERS]
        net(xi)
        for h in hs:
            h.remove()

        def f(*deltas, xi=xi):
            def add(d):
                return lambda m, a: (a[0] + d, *a[1:])

            hs = [net.get_submodule(n).register_forward_pre_hook(add(d))
                  for n, d in zip(LAYERS, deltas, strict=True)]  # fmt: skip
            try:
                return net(xi)[0]
            finally:
                for h in hs:
                    h.remove()

        zeros = tuple(torch.zeros_like(acts[n]) for n in LAYERS)
        jac = jacrev(f, argnums=tuple(range(len(LAYERS))))(*zeros)
        c_i, s_i = [], []
        for n, j in zip(LAYERS, jac, strict=True):
            t = acts[n].numpy()[0]
            g = j.detach().numpy().reshape(k, *t.shape)
            qp = qps[n]
            lo, hi, step = qp.lo, qp.hi, qp.scale
            if qp.granularity == "channel":
                shp = (-1,) + (1,) * (t.ndim - 1)
                lo, hi, step = lo.reshape(shp), hi.reshape(shp), step.reshape(shp)
            clipped = (t < lo) | (t > hi)
            w = np.broadcast_to(((t != 0) & ~clipped) * step**2 / 12.0, t.shape).reshape(-1)
            gf = g.reshape(k, -1)
            c_i.append((gf * w) @ gf.T)
            s_i.append(gf @ (np.clip(t, lo, hi) - t).reshape(-1))
        covs.append(c_i)
        shifts.append(s_i)
    return np.array(covs), np.array(shifts)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_activation_grams_match_a_jacrev_reference(granularity, tmp_path):
    net = tiny_net()
    x, y = tiny_data(12)
    cal = _cal(net, tiny_data(6, seed=5)[0], 3, granularity)  # a range that clips some entries
    ag = activation_grams(net, (x, y), {"a": cal}, cache_dir=tmp_path, progress=False)["a"]
    ref_c, ref_s = _reference(net, x, cal.qparams)
    k = ref_c.shape[-1]
    for p in range(len(LAYERS)):
        got = ag.covariance([LAYERS[p]])
        ref = ref_c[:, p]
        assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()  # float32 storage
        sh = ag.shift([LAYERS[p]])
        assert np.abs(sh - ref_s[:, p]).max() <= 1e-6 * max(np.abs(ref_s[:, p]).max(), 1e-12)
    assert ag.clipped_share.sum() > 0 and ag.zero_share[1:].min() > 0  # after ReLUs
    assert ag.covariance().shape == (12, k, k) and ag.to_frame().shape[0] == len(LAYERS)


def test_covariance_matches_a_monte_carlo_of_small_input_noise():
    """Uniform noise of the grid's step on the entries of I (eq. A4), scaled down to stay
    linear: the empirical logit covariance matches eq. A11 within its Monte Carlo error."""
    net = tiny_net()
    x, y = tiny_data(3)
    qps = {n: ActivationQParams(scale=np.float64(1e-3), zero_point=np.int64(0), qmin=-(2**20),
                                qmax=2**20) for n in LAYERS}  # fmt: skip
    ag = activation_grams(net, (x, y), {"a": qps}, cache=False, progress=False)["a"]
    gen = torch.Generator().manual_seed(3)
    r = 4000

    def noisy(m, a):
        t = a[0]
        e = (torch.rand(t.shape, generator=gen, dtype=t.dtype) - 0.5) * 1e-3
        return (t + e * (t != 0), *a[1:])

    hs = [net.get_submodule(n).register_forward_pre_hook(noisy) for n in LAYERS]
    try:
        with torch.no_grad():
            z0 = net(x)
            dz = torch.stack([net(x) - z0 for _ in range(r)]).numpy()  # (R, N, K)
    finally:
        for h in hs:
            h.remove()
    pred = ag.covariance()
    for i in range(len(x)):
        emp = np.cov(dz[:, i].T)
        d = np.sqrt(np.diag(pred[i]))
        # correlation-scale error of a sample covariance: about 1/sqrt(R) = 0.016
        assert np.abs((emp - pred[i]) / np.outer(d, d)).max() < 0.08


def test_clipping_shift_is_the_first_order_effect_of_clipping():
    net = tiny_net()
    x, y = tiny_data(8)
    # clip each layer's input a little above its 99th percentile (grid step negligible)
    acts = {}
    hs = [net.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: acts.__setitem__(n, a[0].detach())) for n in LAYERS]  # fmt: skip
    net(x)
    for h in hs:
        h.remove()
    qps = {}
    for n, t in acts.items():
        hi = float(torch.quantile(t.flatten(), 0.998))
        lo = float(t.min()) - 1.0
        s = (hi - lo) / 2**20
        qps[n] = ActivationQParams(scale=np.float64(s), zero_point=np.int64(round(-lo / s)),
                                   qmin=0, qmax=2**20)  # fmt: skip
    ag = activation_grams(net, (x, y), {"a": qps}, cache=False, progress=False)["a"]
    for n in LAYERS:  # one layer clipped at a time: the exact effect against eq. A10
        qp = qps[n]
        h = net.get_submodule(n).register_forward_pre_hook(
            lambda m, a, qp=qp: (torch.clamp(a[0], float(qp.lo), float(qp.hi)), *a[1:]))
        with torch.no_grad():
            zc = net(x).numpy()
        h.remove()
        with torch.no_grad():
            exact = zc - net(x).numpy()
        first = ag.shift([n])
        # most samples are exact at first order; a ReLU that switches makes a few differ
        err = np.linalg.norm(first - exact, axis=1)
        scale = np.linalg.norm(exact, axis=1)
        hit = scale > 0
        rel = err[hit] / scale[hit]
        assert np.median(rel) < 0.1 and np.min(rel) < 1e-6  # exact where no ReLU switches
        assert np.linalg.norm(first - exact) <= 0.3 * np.linalg.norm(exact)
        assert np.all(err[~hit] == 0)
        # the grid step is negligible: the actual error is the clipping error
        np.testing.assert_allclose(ag.actual_shift([n]), first, rtol=1e-2, atol=1e-6)


def test_several_configurations_share_one_pass_and_the_cache(tmp_path):
    net = tiny_net()
    x, y = tiny_data(10)
    cfgs = {"A8": _cal(net, x, 8), "A4": _cal(net, x, 4)}
    a = activation_grams(net, (x, y), cfgs, cache_dir=tmp_path, progress=False)
    assert list(a) == ["A8", "A4"]
    # minmax ranges: no clipping on the calibration images, covariance scales with step^2
    ratio = a["A4"].covariance().sum() / a["A8"].covariance().sum()
    assert 200 < ratio < 330  # (255/15)^2 = 289, up to the per-layer mix of ranges
    b = activation_grams(net, (x, y), cfgs, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(a["A4"].covariances, b["A4"].covariances)
    assert a["A4"].key == b["A4"].key
    c = activation_grams(net, (x, y), {"A6": _cal(net, x, 6)}, cache_dir=tmp_path,
                         progress=False)  # fmt: skip
    assert c["A6"].key.split(":")[0] != a["A4"].key.split(":")[0]


def test_w_plus_a_prediction_band_and_split(tmp_path):
    net = tiny_net()
    x, y = tiny_data(64)
    g = gradient_grams(net, (x, y), layers=LAYERS, n_realizations=40, cache_dir=tmp_path,
                       progress=False)  # fmt: skip
    ag = activation_grams(net, (x, y), {"A4": _cal(net, x[:32], 4)}, cache_dir=tmp_path,
                          progress=False)["A4"]  # fmt: skip
    est = AccuracyLossEstimator(quantizer=UniformQuantizer(4)).fit_grams(g)
    alloc = dict.fromkeys(LAYERS, 6)
    w = est.predict_allocation(alloc)
    wa = est.predict_allocation(alloc, activations=ag)
    a = est.predict_allocation({}, activations=ag)
    assert wa.flip_rate >= max(w.flip_rate, a.flip_rate) - 1e-9
    # the same as the closed form with the covariances added (eq. A12)
    v = est._variances(np.full(len(LAYERS), 6), est.quantizer)
    direct = multilayer_distortion(g, v, activation_covariance=ag.covariance(), shift=ag.shift(),
                                   seed=est.seed)  # fmt: skip
    assert direct.flip_rate == pytest.approx(wa.flip_rate)
    np.testing.assert_array_equal(direct.flip_counts, wa.flip_counts)
    # no activation noise: the weight-only result, bit for bit
    zero = multilayer_distortion(g, v, activation_covariance=np.zeros_like(ag.covariance()),
                                 seed=est.seed)  # fmt: skip
    np.testing.assert_array_equal(zero.flip_counts, w.flip_counts)
    p = est.predict([4, 8], activations=ag)
    assert p.to_frame().shape[0] == 2
    split = weight_activation_split(g, v, ag)
    parts = split.to_frame()
    assert set(parts["kind"]) == {"weights", "activations"}
    assert parts["noise_share"].sum() == pytest.approx(1.0)
    assert split.flip_low <= split.flip_rate <= split.flip_high + 1e-12
    assert split.to_dict()["parts"]
    import matplotlib

    matplotlib.use("agg")
    from distortion.plotting.activations import plot_weight_activation_split

    ax = plot_weight_activation_split(split, top=4)
    assert len(ax.patches) == 5  # the 4 largest parts and "others"
    with pytest.raises(ValueError, match="top must be"):
        plot_weight_activation_split(split, top=0)


def test_bad_input_gets_a_clear_error(tmp_path):
    net = tiny_net()
    x, y = tiny_data(8)
    cal = _cal(net, x, 8)
    with pytest.raises(ValueError, match="where must be"):
        activation_grams(net, (x, y), {"a": cal}, where="middle", cache=False)
    with pytest.raises(ValueError, match="non-empty"):
        activation_grams(net, (x, y), {}, cache=False)
    with pytest.raises(ValueError, match="same points"):
        activation_grams(net, (x, y), {"a": cal, "b": {"conv1": cal.qparams["conv1"]}},
                         cache=False)  # fmt: skip
    with pytest.raises(ValueError, match="cannot be hooked|no layer|not"):
        activation_grams(net, (x, y), {"a": {"bn1": cal.qparams["conv1"]}}, cache=False)
    with pytest.raises(ValueError, match="no submodule"):
        activation_grams(net, (x, y), {"a": {"nope": cal.qparams["conv1"]}}, where="output",
                         cache=False)  # fmt: skip
    g = gradient_grams(net, (x, y), layers=LAYERS, n_realizations=0, cache=False, progress=False)
    est = AccuracyLossEstimator().fit_grams(g)
    other = activation_grams(net, tiny_data(8, seed=9), {"a": cal}, cache=False, progress=False)
    with pytest.raises(ValueError, match="other samples"):
        est.predict_allocation({}, activations=other["a"], band=False)
    with pytest.raises(ValueError, match="ActivationGrams"):
        est.predict_allocation({}, activations=np.zeros(3), band=False)
    with pytest.raises(ValueError, match="activation_covariance must have shape"):
        multilayer_distortion(g, [0.0] * 5, activation_covariance=np.zeros((3, 4, 4)), band=False)
    with pytest.raises(ValueError, match="not a quantized engine"):
        int8_reference(net, x, "tensorrt")
    with pytest.raises(ValueError, match="empty"):
        int8_reference(net, x[:0], "x86")
    check_disjoint(x[:4], (x[4:], y[4:]))
    with pytest.raises(ValueError, match="2 of the 4 calibration images are also evaluation"):
        check_disjoint(x[:4], (x[2:], y[2:]))
    with pytest.raises(ValueError, match="empty"):
        check_disjoint(x[:0], (x, y))
    with pytest.raises(ValueError, match="covariances must have shape"):
        ActivationGrams(point_names=("a",), logits=np.zeros((2, 3)),
                        covariances=np.zeros((2, 1, 5)), shifts=np.zeros((2, 1, 3)))  # fmt: skip


class ResBlockNet(nn.Module):
    """conv-BN-ReLU, a residual block with an identity shortcut, avg-pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.shortcut = nn.Identity()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)) + self.shortcut(out))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


@pytest.fixture
def keep_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def test_int8_reference_points_simulation_and_prediction(keep_engine, tmp_path):
    if "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("no x86 engine")
    torch.manual_seed(0)
    net = ResBlockNet().eval()
    x, y = tiny_data(96, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = int8_reference(net, x[:48], "x86")
        xe, ye = x[48:], y[48:]
        assert ref.exact_points  # the identity shortcut of a quantized tensor
        assert "input" in ref.sources.values() and "adaptive_avg_pool2d" in ref.sources.values()
        assert set(ref.qparams).isdisjoint(ref.exact_points)
        assert all(q.qmin == 0 and q.qmax == 127 for q in ref.qparams.values())  # reduce_range
        assert len(ref.layers) == 3 and ref.to_frame().shape[0] == len(ref.qparams) + len(
            ref.exact_points
        )
        m8 = measure_quantized(ref.fused, (xe, ye), int8_model=ref.int8)
        sim = measure_quantized(ref.fused, (xe, ye), weights=ref.weight_quantizer,
                                layers=list(ref.layers), activations=ref.qparams,
                                where="output")  # fmt: skip
        with torch.no_grad():
            z8 = ref.int8(xe)
            zf = ref.fused(xe)
        # the int8 model is close to the float one (8-bit grids of a small network)
        assert float((z8 - zf).norm() / zf.norm()) < 0.1
        assert 0 <= m8.flip_rate <= 1 and 0 <= sim.flip_rate <= 1
        ag = activation_grams(ref.fused, (xe, ye), {"int8": ref.qparams}, where="output",
                              cache_dir=tmp_path, progress=False)["int8"]  # fmt: skip
        g = gradient_grams(ref.fused, (xe, ye), layers=list(ref.layers), granularity="channel",
                           n_realizations=10, cache_dir=tmp_path, progress=False)  # fmt: skip
    assert ag.point_names == tuple(ref.qparams)
    est = AccuracyLossEstimator(quantizer=ref.weight_quantizer).fit_grams(g)
    r = est.predict_allocation(dict.fromkeys(g.layer_names, 8), activations=ag)
    assert 0 <= r.flip_rate <= 1 and r.flip_counts is not None


def test_w_plus_a_band_covers_fresh_realizations_at_its_nominal_level(tmp_path):
    """200 realizations of the first-order model drawn apart from the band's 40 (weights:
    other cached uniform draws; activations: an independent generator, one draw per sample):
    the 95 % band of one realization (eq. A13) holds about 95 % of their flip counts."""
    from dataclasses import replace

    from distortion.theory.multilayer import _factor

    net = tiny_net()
    x, y = tiny_data(200)
    g = gradient_grams(net, (x, y), layers=LAYERS, n_realizations=240, cache_dir=tmp_path,
                       progress=False)  # fmt: skip
    ag = activation_grams(net, (x, y), {"A4": _cal(net, x[:50], 4)}, cache_dir=tmp_path,
                          progress=False)["A4"]  # fmt: skip
    v = [float(np.mean(np.asarray(w) ** 2)) * 1e-3 for w in g.weights]
    band_g = replace(g, projections=g.projections[:, :, :40])
    cov = ag.covariance()
    r = multilayer_distortion(band_g, v, activation_covariance=cov, shift=ag.shift(), seed=7)
    b = r.flip_band()
    kappa = np.sqrt(np.asarray(v))  # per-tensor profiles are ones: eq. L12 scaling
    pr = g.projections[:, :, 40:]  # (N, L, 200, K)
    dz = np.einsum("l,nlrk->nrk", kappa, pr)
    rng = np.random.default_rng(12345)
    xi = rng.standard_normal((len(x), cov.shape[1], pr.shape[2]))
    dz = dz + np.matmul(_factor(cov), xi).transpose(0, 2, 1)
    z = g.logits + ag.shift()
    flips = np.mean(np.argmax(z[:, None, :] + dz, axis=2) != g.predictions()[:, None], axis=0)
    inside = np.mean((flips >= b.low) & (flips <= b.high))
    assert flips.mean() > 0.02  # the test has flips to count
    print(f"coverage {inside:.3f}, mean {flips.mean():.3f}, band {b.low:.3f}-{b.high:.3f}")
    assert 0.90 <= inside <= 0.995, inside


def test_compare_activations_table_splits_and_files(keep_engine, tmp_path):
    """The study function of the script and of `distortion run`: one row per cell, the
    measurement of each cell agrees with measure_quantized run by hand, the splits add up."""
    from distortion.experiments.compare_activations import (
        ACTIVATION_COLUMNS,
        compare_activations,
    )

    engines = torch.backends.quantized.supported_engines
    torch.manual_seed(0)
    net = ResBlockNet().eval()
    x, y = tiny_data(96, dtype=torch.float32)
    cal, ev = (x[:48], y[:48]), (x[48:], y[48:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = compare_activations(
            net, cal, ev, model_name="tiny", grid=[(8, 4), (4, 8)], granularities=["tensor"],
            int8_backends=["x86"] if "x86" in engines else [], n_realizations=40,
            cache_dir=tmp_path, progress=False,
        )  # fmt: skip
        t = st.to_frame()
        assert list(t.columns) == list(ACTIVATION_COLUMNS)
        cells = ["W8A4 tensor", "W4A8 tensor"]
        assert t["cell"].tolist()[-2:] == cells
        q = calibrate_activations(net, cal, "all", ActivationQuantizer(4), n_images=48)
        hand = measure_quantized(net, ev, weights=UniformQuantizer(8, granularity="channel"),
                                 activations=q.qparams, progress=False)  # fmt: skip
    row = t.set_index("cell").loc["W8A4 tensor"]
    assert row["measured_flips"] == hand.flips and row["n"] == 48
    assert row["band_low"] <= row["predicted_flip_rate"] <= row["band_high"]
    assert 0 <= row["activation_noise_share"] <= 1
    # fewer bits, more flips: the weights' part grows from W8 to W4, the activations' from A8
    # to A4
    w4 = t.set_index("cell").loc["W4A8 tensor"]
    assert w4["weights_alone"] > row["weights_alone"]
    assert row["activations_alone"] >= w4["activations_alone"] - 1e-3  # a clipped shift: 1/48
    assert row["activation_noise_share"] > w4["activation_noise_share"]
    out = st.save(tmp_path / "out", figures=False)
    assert (out / "activations.csv").is_file() and (out / "activations_summary.txt").is_file()
    assert (out / "activations_split_tiny_W8A4_tensor.json").is_file()
    cov, miss = st.coverage(1.0)
    assert 0 <= cov <= 1 and all(m.startswith("tiny ") for m in miss)
    with pytest.raises(ValueError, match="activation bits must be an integer in 2..16"):
        compare_activations(net, cal, ev, grid=[(8, 1)], int8_backends=[])
    with pytest.raises(ValueError, match="granularity"):
        compare_activations(net, cal, ev, granularities=["row"], int8_backends=[])
    with pytest.raises(ValueError, match="also evaluation images"):
        compare_activations(net, ev, ev, grid=[(8, 8)], int8_backends=[])


def test_allocation_over_weight_and_activation_bits(tmp_path):
    """allocate(..., activations={bits: Grams}, avg_activation_bits=): the activations'
    knapsack is the exact optimum of the additive surrogate (brute force), meets its budget,
    and the allocation is re-evaluated with the chosen grids mixed point by point."""
    import itertools

    net = tiny_net()
    x, y = tiny_data(64)
    g = gradient_grams(net, (x, y), layers=LAYERS, n_realizations=40, cache_dir=tmp_path,
                       progress=False)  # fmt: skip
    opts = (3, 5, 8)
    ags = activation_grams(net, (x, y), {f"A{b}": _cal(net, x[:32], b) for b in opts},
                           cache_dir=tmp_path, progress=False)  # fmt: skip
    by_bits = {b: ags[f"A{b}"] for b in opts}
    sizes = by_bits[8].point_sizes
    assert sizes.shape == (len(LAYERS),)
    assert sizes[0] == 3 * 8 * 8  # the first layer's input: one image, 3 x 8 x 8
    est = AccuracyLossEstimator(quantizer=UniformQuantizer(4)).fit_grams(g)
    al = est.allocate(avg_bits=6, bits=[4, 8], activations=by_bits, avg_activation_bits=5)
    assert al.activation_total_bits <= al.activation_budget_bits
    assert al.avg_activation_bits() <= 5 + 1e-12
    vals = al.activation_contributions
    best = np.inf
    for combo in itertools.product(range(len(opts)), repeat=len(LAYERS)):
        cost = sum(sizes[i] * opts[c] for i, c in enumerate(combo))
        if cost <= al.activation_budget_bits:
            best = min(best, sum(vals[i, c] for i, c in enumerate(combo)))
    col = {b: j for j, b in enumerate(opts)}
    got = sum(vals[i, col[int(b)]] for i, b in enumerate(al.activation_bits))
    assert got == pytest.approx(best, rel=1e-12, abs=1e-15)
    # each term is that point alone at those bits
    p0 = al.point_names[0]
    alone = multilayer_distortion(g, [0.0] * len(LAYERS), band=False, seed=est.seed,
                                  activation_covariance=by_bits[3].covariance([p0]),
                                  shift=by_bits[3].shift([p0]))  # fmt: skip
    assert vals[0, 0] == pytest.approx(alone.flip_rate)
    # the re-evaluation: every point at its chosen grid
    mixed = by_bits[8].mixed({n: by_bits[int(b)] for n, b in al.activation_dict().items()})
    again = est.predict_allocation(al.as_dict(), activations=mixed)
    assert al.flip_rate == pytest.approx(again.flip_rate)
    for i, b in enumerate(al.activation_dict().values()):
        np.testing.assert_array_equal(mixed.covariances[:, i], by_bits[b].covariances[:, i])
    frame = al.to_frame()
    assert list(frame["kind"].unique()) == ["weights", "activations"]
    assert len(frame) == 2 * len(LAYERS)
    with pytest.raises(ValueError, match="together"):
        est.allocate(avg_bits=6, bits=[4, 8], activations=by_bits)
    with pytest.raises(ValueError, match="below the fewest allowed bits"):
        est.allocate(avg_bits=6, bits=[4, 8], activations=by_bits, avg_activation_bits=2)


def test_dithered_activations_follow_the_error_model():
    """activation_error="dither" (level 3N for the activations) draws eq. A5: zeros kept,
    clipped entries at the outer level, uniform errors of one step elsewhere."""
    from distortion.experiments.activation_grams import _dithered

    x = torch.relu(torch.randn(4000, 6, generator=torch.Generator().manual_seed(3)))
    q = ActivationQuantizer(4).calibrate(x[:100])
    e = _dithered(x, q, torch.Generator().manual_seed(0)) - x
    lo, hi, d = float(q.lo), float(q.hi), float(q.step)
    zero, clip = x == 0, x >= hi
    assert torch.all(e[zero] == 0) and clip.any()
    assert torch.allclose(e[clip], hi - x[clip])
    inside = ~zero & (x > lo) & (x < hi)
    ei = e[inside].double() / d
    assert ei.abs().max() <= 0.5 + 1e-6
    n = ei.numel()
    assert abs(float(ei.mean())) < 4 * (1 / 12) ** 0.5 / n**0.5  # mean 0
    assert float(ei.var()) == pytest.approx(1 / 12, rel=0.05)
    again = _dithered(x, q, torch.Generator().manual_seed(0))
    assert torch.equal(again, e + x)  # seeded
