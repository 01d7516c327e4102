"""Tests of AccuracyLossEstimator: last-layer and multi-layer fits, predictions, allocation."""

from __future__ import annotations

import itertools
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from distortion.estimator import AccuracyLossEstimator, BitAllocation
from distortion.quantize import UniformQuantizer
from distortion.theory.multiclass import semiparametric_distortion

torch = pytest.importorskip("torch")

from test_multilayer import LAYERS, tiny_data, tiny_net  # noqa: E402


def test_import_does_not_load_torch():
    code = (
        "import sys, distortion.estimator, distortion.theory.multilayer, "
        "distortion.theory.baselines; assert 'torch' not in sys.modules, 'torch loaded'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _feature_set(seed=0, n=300, d=6, k=4):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(k, d)) * 2
    y = rng.integers(0, k, n)
    x = mu[y] + rng.normal(size=(n, d))
    w = rng.normal(size=(k, d))
    b = rng.normal(size=k) * 0.1
    return SimpleNamespace(features=x, labels=y, W=w, b=b, logits=x @ w.T + b)


def test_fit_feature_set_is_level3():
    fs = _feature_set()
    est = AccuracyLossEstimator(UniformQuantizer(4), n_realizations=40, seed=3).fit(fs)
    pred = est.predict(bits=[2, 4, 6])
    frame = pred.to_frame()
    assert list(frame["bits"]) == [2, 4, 6] and set(frame["level"]) == {"3"}
    for i, b in enumerate([2, 4, 6]):
        step = UniformQuantizer(b).qparams(fs.W).step
        ref = semiparametric_distortion(
            fs.features, fs.W, fs.b, step=step, labels=fs.labels, n_realizations=40, seed=3
        )
        assert pred.flip_rate[i] == pytest.approx(ref.flip_rate, rel=1e-12)
        assert pred.accuracy_loss[i] == pytest.approx(ref.accuracy_loss, rel=1e-12, abs=1e-15)
        assert (pred.flip_rate_low[i], pred.flip_rate_high[i]) == tuple(ref.flip_band())
    # per-channel steps are per row of W
    pc = AccuracyLossEstimator(UniformQuantizer(3, granularity="channel")).fit(fs).predict(3)
    ref = semiparametric_distortion(
        fs.features, fs.W, fs.b, labels=fs.labels, n_realizations=40, seed=0,
        step=UniformQuantizer(3, granularity="channel").qparams(fs.W).step,
    )  # fmt: skip
    assert pc.flip_rate[0] == pytest.approx(ref.flip_rate, rel=1e-12)


def test_fit_errors_k_mismatch_and_unfitted():
    fs = _feature_set()
    with pytest.raises(ValueError, match="K mismatch"):
        AccuracyLossEstimator().fit(fs, labels=np.full(fs.labels.size, 7))
    bad = SimpleNamespace(**{**vars(fs), "logits": np.zeros((300, 5))})
    with pytest.raises(ValueError, match="K mismatch"):
        AccuracyLossEstimator().fit(bad)
    with pytest.raises(ValueError, match="not fitted"):
        AccuracyLossEstimator().predict(4)
    with pytest.raises(ValueError, match="fit_model"):
        AccuracyLossEstimator().fit(fs).allocate(avg_bits=4)
    with pytest.raises(ValueError, match="bits must"):
        AccuracyLossEstimator().fit(fs).predict([0, 4])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    net = tiny_net(seed=3)
    x, y = tiny_data(200, seed=8)
    est = AccuracyLossEstimator(
        UniformQuantizer(4), n_realizations=40, cache_dir=tmp_path_factory.mktemp("c"),
        progress=False,
    ).fit_model(net, (x, y))  # fmt: skip
    return net, x, y, est


def test_fit_model_predict_and_min_bits(fitted):
    _, _, _, est = fitted
    pred = est.predict(bits=range(1, 9))
    frame = pred.to_frame()
    assert len(frame) == 8 and set(frame["level"]) == {"3L"}
    assert pred.layers == tuple(LAYERS)
    assert np.all(np.diff(pred.flip_rate[1:]) <= 1e-12)  # fewer flips with more bits (b >= 2)
    assert np.all(pred.flip_rate_low <= pred.flip_rate_high)
    # the same numbers as one allocation with every layer at b bits
    r = est.predict_allocation(dict.fromkeys(LAYERS, 3))
    assert pred.flip_rate[2] == pytest.approx(r.flip_rate)
    # min_bits is the first bit-width that meets the budget
    budget = float(pred.accuracy_loss[3]) + 1e-12
    b = est.min_bits(budget, bits=range(1, 9))
    assert pred.accuracy_loss[b - 1] <= budget
    assert all(pred.accuracy_loss[i] > budget for i in range(b - 1))
    worst = int(np.argmax(pred.accuracy_loss))
    assert pred.accuracy_loss[worst] > 0
    with pytest.raises(ValueError, match="no bit-width"):
        est.min_bits(0.0, bits=[int(pred.bits[worst])])


def test_allocation_errors(fitted):
    _, _, _, est = fitted
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        est.predict_allocation({"nope": 4})
    with pytest.raises(ValueError, match="1..16"):
        est.predict_allocation({"fc2": 17})
    with pytest.raises(ValueError, match="impossible"):
        est.allocate(avg_bits=1.5, bits=range(2, 9))
    with pytest.raises(ValueError, match="exactly one"):
        est.allocate()
    with pytest.raises(ValueError, match="per-channel Grams"):
        est.predict(4, quantizer=UniformQuantizer(4, granularity="channel"))


def test_allocate_is_optimal_for_the_additive_model(fitted):
    _, _, _, est = fitted
    bits = [2, 4, 6]
    alloc = est.allocate(avg_bits=4.0, bits=bits)
    assert isinstance(alloc, BitAllocation)
    n_w = est.grams_.layer_sizes()
    assert alloc.total_bits == int(np.sum(n_w * alloc.bits)) <= alloc.budget_bits
    assert alloc.avg_bits() <= 4.0
    # brute force over all 3^5 allocations of the same additive surrogate
    table = alloc.contributions.flip_rate
    best = min(
        sum(table[l, c] for l, c in enumerate(ch))
        for ch in itertools.product(range(3), repeat=len(LAYERS))
        if sum(n_w[l] * bits[c] for l, c in enumerate(ch)) <= alloc.budget_bits
    )
    assert alloc.surrogate == pytest.approx(best)
    # re-evaluated with the full closed form
    again = est.predict_allocation(alloc.as_dict())
    assert alloc.flip_rate == pytest.approx(again.flip_rate)
    frame = alloc.to_frame()
    assert list(frame["layer"]) == LAYERS and frame["contribution"].notna().all()


def test_additive_surrogate_brackets_full_model_for_small_noise(fitted):
    # with small noise the per-sample flip probability grows like the margin noise sd,
    # sqrt(sum_l v_l) <= sum_l sqrt(v_l): the sum of single-layer flip rates is larger
    _, _, _, est = fitted
    c = est.layer_contributions([8])
    full = est.predict_allocation(dict.fromkeys(LAYERS, 8), band=False)
    assert full.flip_rate <= c.flip_rate[:, 0].sum() + 1e-12


def test_stochastic_rounding_uses_its_own_error_model(fitted):
    # E[e^2] = Delta^2 p (1 - p) per weight (eq. E2), about twice Delta^2 / 12 (eq. E3)
    net, _, _, est = fitted
    near = est.predict_allocation({"fc1": 5}, band=False)
    sto = est.predict_allocation({"fc1": 5}, quantizer=UniformQuantizer(5, rounding="stochastic"))
    v_near = float(near.noise_variances[LAYERS.index("fc1")])
    v_sto = float(sto.noise_variances[LAYERS.index("fc1")])
    w = net.get_submodule("fc1").weight.detach().numpy().astype(np.float64)
    step = UniformQuantizer(5).qparams(w).step
    naive = np.mean([step**2 * (v / step - np.floor(v / step)) * (1 - v / step + np.floor(v / step))
                     for v in w.ravel()])  # fmt: skip
    assert v_sto == pytest.approx(naive, rel=1e-12)
    assert v_near == pytest.approx(step**2 / 12, rel=1e-12)
    assert 1.7 < v_sto / v_near < 2.3


def test_bits_and_settings_are_not_coerced_silently(fitted):
    _, _, _, est = fitted
    with pytest.raises(ValueError, match="string"):
        est.predict(bits="16")  # was bits 1 and 6
    with pytest.raises(ValueError, match="4.5"):
        est.predict(bits=[4.5])  # was truncated to 4
    with pytest.raises(ValueError, match="integer"):
        est.predict(bits=[True])
    assert est.predict(bits=[4.0], quantizer=UniformQuantizer(4)).bits.tolist() == [4]
    with pytest.raises(ValueError, match="n_realizations"):
        AccuracyLossEstimator(n_realizations=4.7)
    with pytest.raises(ValueError, match="at least 39"):
        AccuracyLossEstimator(n_realizations=5)  # a 95 % band needs 39 realizations
    AccuracyLossEstimator(n_realizations=39)
    AccuracyLossEstimator(n_realizations=0)
    with pytest.raises(ValueError, match="memory_mb"):
        AccuracyLossEstimator(memory_mb=0)


def test_fit_model_passes_batch_size_and_memory_budget(monkeypatch):
    import distortion.experiments.sensitivity as sens

    seen = {}

    def fake(model, data, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(sens, "gradient_grams", fake)
    est = AccuracyLossEstimator(batch_size=7, memory_mb=64, progress=False)
    with pytest.raises(RuntimeError, match="stop"):
        est.fit_model(None, None)
    assert seen["batch_size"] == 7 and seen["memory_mb"] == 64


def test_predictions_have_the_shared_shape(fitted):
    _, _, _, est = fitted
    pred = est.predict(bits=[4, 6])
    ps = pred.predictions()
    assert [p.level for p in ps] == ["3L", "3L"]
    assert ps[0].flip_rate == pred.flip_rate[0]
    assert ps[1].flip_rate_band == (pred.flip_rate_low[1], pred.flip_rate_high[1])
    assert np.isfinite(pred.to_frame()["flip_rate_stderr"]).all()


def test_empirical_error_variance_is_the_mean_square_error(fitted):
    net, x, y, est = fitted
    emp = AccuracyLossEstimator(UniformQuantizer(3), error_variance="empirical")
    emp.fit_grams(est.grams_)
    r = emp.predict_allocation({"conv2": 3, "fc1": 3}, band=False)
    for name in ("conv2", "fc1"):
        w = net.get_submodule(name).weight.detach().numpy()
        e = UniformQuantizer(3).quantize(w).error
        assert float(r.noise_variances[LAYERS.index(name)]) == pytest.approx(np.mean(e**2))
    pc = UniformQuantizer(3, granularity="channel")
    with pytest.raises(ValueError, match="per-channel Grams"):
        emp.predict(3, quantizer=pc)
    with pytest.raises(ValueError, match="error_variance"):
        AccuracyLossEstimator(error_variance="actual")


def _naive_deviation(w, q):
    """12 mean((e / step)^2) - 1 over the elements, element by element (nearest rounding)."""
    qt = q.quantize(np.asarray(w, dtype=np.float64))
    e, step = np.asarray(qt.error).reshape(w.shape[0], -1), np.asarray(qt.step)
    total = 0.0
    for r in range(e.shape[0]):
        s = float(step[r] if step.ndim else step)
        for v in e[r]:
            total += 12.0 * (v / s) ** 2
    return total / e.size - 1.0


def test_hu_check_is_the_second_moment_of_the_actual_error(fitted):
    net, _, _, est = fitted
    pred = est.predict(bits=[2, 4, 8])
    frame = pred.to_frame()
    for i, b in enumerate([2, 4, 8]):
        devs = [
            abs(_naive_deviation(net.get_submodule(n).weight.detach().numpy(), UniformQuantizer(b)))
            for n in LAYERS
        ]
        assert pred.hu_deviation[i] == pytest.approx(max(devs), rel=1e-9, abs=1e-12)
        assert pred.hu_fail_share[i] == pytest.approx(np.mean(np.array(devs) > 0.20))
    assert list(frame["hu_deviation"]) == list(pred.hu_deviation)
    # last layer, per-channel steps: each row in units of its own step
    fs = _feature_set(seed=5, d=40)
    q = UniformQuantizer(2, granularity="channel")
    last = AccuracyLossEstimator(q, n_realizations=0).fit(fs).predict([2, 6])
    for i, b in enumerate([2, 6]):
        dev = abs(_naive_deviation(fs.W, q.with_bits(b)))
        assert last.hu_deviation[i] == pytest.approx(dev, rel=1e-9, abs=1e-12)
        assert last.hu_fail_share[i] == float(dev > 0.20)


def test_parse_bits():
    from distortion.commands.predict import parse_bits

    assert parse_bits("2-5") == [2, 3, 4, 5]
    assert parse_bits("8,2,4") == [2, 4, 8]
    for bad in ("5-2", "0-3", "a", "17"):
        with pytest.raises(ValueError, match="--bits"):
            parse_bits(bad)


@pytest.mark.real_data
def test_predict_command(real_data, tmp_path, capsys):
    from distortion.cli import main

    npz = str(real_data / "data" / "cifar10" / "test.npz")
    args = ["predict", "--model", "resnet20", "--data", npz, "--n", "40", "--bits", "3,6",
            "--layers", "last", "--quiet", "--cache-dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "flip %" in out and "3L" in out
    assert len([ln for ln in out.splitlines() if ln.strip().startswith(("3 ", "6 "))]) == 2
    bad = args[:-5] + ["--layers", "nope", "--quiet", "--cache-dir", str(tmp_path)]
    assert main(bad) == 2
    assert "unknown layer" in capsys.readouterr().err


def test_min_bits_holds_for_every_larger_bit_width():
    # The predicted loss need not fall monotonically (1-bit sign quantizer, noise): min_bits
    # returns the bit-width from which every larger candidate meets the budget.
    fs = _feature_set(seed=5, n=400, d=16, k=5)
    est = AccuracyLossEstimator(UniformQuantizer(4), n_realizations=40).fit(fs)
    bits = list(range(1, 11))
    loss = est.predict(bits=bits).accuracy_loss
    for budget in (0.001, 0.005, 0.02):
        if not np.any(loss <= budget):
            continue
        b = est.min_bits(max_loss=budget, bits=bits)
        i = bits.index(b)
        assert np.all(loss[i:] <= budget)
        assert i == 0 or loss[i - 1] > budget


def test_predict_compression_reads_any_compressors_error_model(fitted):
    from distortion.compressors import LowRank, MagnitudePruner
    from distortion.theory.multilayer import multilayer_distortion

    net, _, _, est = fitted
    # a uniform quantizer through the generic path equals predict_allocation
    q = UniformQuantizer(6)
    a = est.predict_compression(q, band=False)
    b = est.predict_allocation(dict.fromkeys(LAYERS, 6), band=False)
    assert a.flip_rate == pytest.approx(b.flip_rate, rel=1e-12) and a.level == "3L"
    # pruning: the error model is the mean square of the pruned weights of each layer
    p = est.predict_compression(MagnitudePruner(0.3), band=False)
    m2 = []
    for name in LAYERS:
        w = net.get_submodule(name).weight.detach().numpy().astype(np.float64).ravel()
        k = int(round(0.3 * w.size))
        pruned = np.argsort(np.abs(w), kind="stable")[:k]
        m2.append(np.sum(w[pruned] ** 2) / w.size)
    ref = multilayer_distortion(est.grams_, m2, seed=est.seed, band=False)
    assert p.flip_rate == pytest.approx(ref.flip_rate, rel=1e-9)
    # one compressor per layer, others float; a grid of strengths
    only = est.predict_compression({"fc1": MagnitudePruner(0.5)}, band=False)
    assert 0 < only.flip_rate < p.flip_rate + 1
    grid = est.predict_grid(lambda s: MagnitudePruner(s), [0.1, 0.5, 0.9], band=False)
    assert grid["flip_rate"].is_monotonic_increasing and list(grid["strength"]) == [0.1, 0.5, 0.9]
    assert est.predict_compression(MagnitudePruner(0.5, scope="global"), band=False).flip_rate > 0
    with pytest.raises(ValueError, match="unknown layer"):
        est.predict_compression({"nope": LowRank(1)})
    with pytest.raises(ValueError, match="Compressor protocol"):
        est.predict_compression("prune")


def test_allocate_compression_is_the_exhaustive_optimum(fitted, monkeypatch):
    """Per-layer sparsity under a global sparsity: the DP's choice is the best of all 3^5
    allocations of the additive surrogate (each layer's term computed independently, by
    predict_compression of that layer alone), within the budget, re-evaluated with every
    layer compressed; no backward pass runs."""
    from distortion.compressors import MagnitudePruner
    from distortion.compressors.size import compressed_size

    net, _, _, est = fitted

    def no_backward(*a, **k):
        raise AssertionError("allocate_compression ran a backward pass")

    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    opts = (0.2, 0.5, 0.8)
    alloc = est.allocate_compression(lambda s: MagnitudePruner(s), opts, ratio=0.5, band=False)
    monkeypatch.undo()
    term = np.array([[est.predict_compression({n: MagnitudePruner(s)}, band=False).flip_rate
                      for s in opts] for n in LAYERS])  # fmt: skip
    size = np.array([[compressed_size(MagnitudePruner(s).compress(
        net.get_submodule(n).weight.detach().numpy())).parameters for s in opts]
        for n in LAYERS])  # fmt: skip
    n_total = sum(net.get_submodule(n).weight.numel() for n in LAYERS)
    budget = int(np.floor(0.5 * n_total))
    best = min(
        (sum(term[i, j] for i, j in enumerate(c)), c)
        for c in itertools.product(range(3), repeat=len(LAYERS))
        if sum(size[i, j] for i, j in enumerate(c)) <= budget
    )
    assert alloc.budget == budget and alloc.dense_size == n_total and alloc.cost_unit == 1
    np.testing.assert_allclose(alloc.contributions, term, rtol=1e-10, atol=1e-15)
    np.testing.assert_array_equal(alloc.sizes, size)
    assert alloc.surrogate == pytest.approx(best[0], rel=1e-10, abs=1e-15)
    assert alloc.total <= budget and alloc.ratio() <= 0.5
    chosen = {n: MagnitudePruner(s) for n, s in zip(LAYERS, alloc.strengths, strict=True)}
    full = est.predict_compression(chosen, band=False)
    assert alloc.flip_rate == pytest.approx(full.flip_rate, rel=1e-12)
    frame = alloc.to_frame()
    assert list(frame["layer"]) == LAYERS and frame["parameters"].sum() == alloc.total
    # with a uniform choice allowed, the allocation is at least as good as it
    uniform = est.predict_compression(MagnitudePruner(0.5), band=False)
    assert alloc.surrogate <= sum(term[:, 1]) + 1e-15
    assert alloc.flip_rate <= uniform.flip_rate * 1.5 + 1e-3


def test_allocate_compression_codebook_bits_and_rounded_costs(fitted):
    """Mixed k-means clusters under a model size in bits; with a coarse DP resolution the
    costs are rounded up and the true total still respects the budget."""
    from distortion.compressors import KMeansQuantizer, LowRank, MagnitudePruner

    _, _, _, est = fitted
    n_total = int(est.grams_.layer_sizes().sum())
    fine = est.allocate_compression(lambda k: KMeansQuantizer(k), (2, 4, 16), cost="bits",
                                    ratio=3 / 32, band=False)  # fmt: skip
    assert fine.cost == "bits" and fine.dense_size == 32 * n_total
    assert fine.total <= fine.budget == int(3 * n_total)
    assert set(fine.strengths) <= {2, 4, 16} and len(set(fine.strengths)) > 1
    coarse = est.allocate_compression(lambda k: KMeansQuantizer(k), (2, 4, 16), cost="bits",
                                      ratio=3 / 32, resolution=50, band=False)  # fmt: skip
    assert coarse.cost_unit > 1 and coarse.total <= coarse.budget
    assert coarse.surrogate >= fine.surrogate - 1e-15  # coarser costs: never better
    # per-layer rank under a parameter budget
    lr = est.allocate_compression(lambda e: LowRank(energy=e), (0.5, 0.9, 0.99), ratio=0.8,
                                  band=False)  # fmt: skip
    assert lr.total <= lr.budget
    with pytest.raises(ValueError, match="global scope"):
        est.allocate_compression(lambda s: MagnitudePruner(s, scope="global"), (0.5,), ratio=0.9)
    with pytest.raises(ValueError, match="impossible"):
        est.allocate_compression(lambda s: MagnitudePruner(s), (0.1, 0.2), ratio=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        est.allocate_compression(lambda s: MagnitudePruner(s), (0.5,), ratio=0.5, budget=10)
    with pytest.raises(ValueError, match="empty"):
        est.allocate_compression(lambda s: MagnitudePruner(s), (), ratio=0.5)
    with pytest.raises(ValueError, match="cost must"):
        est.allocate_compression(lambda s: MagnitudePruner(s), (0.5,), ratio=0.5, cost="bytes")


def test_dithered_prediction_is_the_mean_and_order_statistics_of_dithered_networks(fitted):
    """Level 3N from the estimator against a transcription: R networks, each quantized layer
    with a subtractive-dither error of its step (float layers untouched), run and
    compared with the float decisions; the band is [min, max] of the R flip counts (R = 40,
    95 %, eq. L15)."""
    from distortion.compression import realization_seed

    net, x, y, est = fitted
    alloc = {LAYERS[0]: None, **dict.fromkeys(LAYERS[1:], 3)}  # the first stays float
    pred = est.dithered_prediction(net, (x, y), alloc, repeats=40)
    assert pred.level == "3N" and pred.n_samples == len(y) and pred.coverage == est.coverage
    base = realization_seed(est.seed, 3)
    with torch.no_grad():
        z0 = net(x).argmax(1)
        flips, losses = [], []
        for r in range(40):
            qn = __import__("copy").deepcopy(net)
            for i, name in enumerate(LAYERS[1:]):
                w = qn.get_submodule(name).weight
                q = UniformQuantizer(3, rounding="dither")
                w.copy_(q.quantize(w.detach().clone(), seed=base + 1000 * r + i).values)
            zq = qn(x).argmax(1)
            flips.append(int((zq != z0).sum()))
            losses.append(int((z0 == y).sum() - (zq == y).sum()))
        # the first layer is left alone
        assert torch.equal(qn.get_submodule(LAYERS[0]).weight, net.get_submodule(LAYERS[0]).weight)
    n = len(y)
    assert pred.flip_rate == pytest.approx(np.mean(flips) / n, rel=1e-12)
    assert pred.accuracy_loss == pytest.approx(np.mean(losses) / n, rel=1e-12, abs=1e-15)
    assert tuple(pred.flip_rate_band) == (min(flips) / n, max(flips) / n)
    assert tuple(pred.accuracy_loss_band) == (min(losses) / n, max(losses) / n)
    assert max(flips) > min(flips) > 0  # the realizations differ: the band has a width
    with pytest.raises(ValueError, match="needs at least 39"):
        est.dithered_prediction(net, (x, y), alloc, repeats=10)
    with pytest.raises(ValueError, match="quantizes no layer"):
        est.dithered_prediction(net, (x, y), {})
    with pytest.raises(ValueError, match="repeats must be an integer"):
        est.dithered_prediction(net, (x, y), alloc, repeats=40.0)


def test_smoothed_shift_moves_the_allocation_prediction(fitted):
    """Level 3S from the estimator: the shift of eq. L31 for the allocation's error model,
    added to the same Grams' prediction (theory/multilayer.md §17)."""
    from distortion.experiments.smoothed import smoothed_shift
    from distortion.theory.multilayer import multilayer_distortion

    net, x, y, est = fitted
    alloc = dict.fromkeys(LAYERS[1:], 3)  # the first layer stays float
    shift = est.smoothed_shift(net, (x, y), alloc, n_probes=4)
    q = UniformQuantizer(3)
    m2 = {k: np.asarray(q.compress(net.get_submodule(k).weight.detach()).second_moment)
          for k in LAYERS[1:]}  # fmt: skip
    ref, _ = smoothed_shift(net, (x, y), m2, n_probes=4, seed=est.seed, cache=False)
    np.testing.assert_allclose(shift, ref, rtol=1e-12, atol=1e-12)
    assert np.abs(shift).max() > 0
    moved = est.predict_allocation(alloc, logit_shift=shift)
    var = [0.0] + [m2[k] for k in LAYERS[1:]]
    direct = multilayer_distortion(est.grams_, var, seed=est.seed, band=True, shift=shift)
    assert moved.flip_rate == pytest.approx(direct.flip_rate, rel=1e-12)
    assert moved.flip_rate != est.predict_allocation(alloc).flip_rate
    np.testing.assert_array_equal(est.smoothed_shift(net, (x, y), {}), 0)  # all float
    with pytest.raises(ValueError, match="logit_shift must be"):
        est.predict_allocation(alloc, logit_shift=shift[:-1])
    with pytest.raises(ValueError, match="not the data the estimator was fitted on"):
        est.smoothed_shift(net, (x[:-1], y[:-1]), alloc)
