"""Many classes: Grams of the nearest competitors, the tail estimate and its bound (eq. L17-L20)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import special
from torch import nn

from distortion.experiments.distributed import merge_grams
from distortion.experiments.sensitivity import gradient_grams, load_grams, save_grams
from distortion.theory.multilayer import (
    TAIL_CONSTANT,
    Truncation,
    multilayer_distortion,
    truncation_tail_bound,
)


def _net(k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 12), nn.ReLU(),
        nn.Linear(12, k),
    )  # fmt: skip
    return net.double().eval()


def _data(n: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, k, (n,))


def _kw(**extra):
    return {"cache": False, "progress": False, "n_realizations": 0, **extra}


@pytest.fixture(scope="module")
def k30():
    net, (x, y) = _net(30), _data(12, 30)
    full = gradient_grams(net, (x, y), granularity="channel", **_kw())
    return net, x, y, full


def _margin_gram(full: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Naive transcription of eq. L17: Gram of d(z_j - z_yhat) over the kept classes."""
    n, L = full.shape[:2]
    m = classes.shape[1]
    out = np.empty((n, L, m, m))
    for i in range(n):
        r = classes[i, 0]
        for li in range(L):
            g = full[i, li]
            for a in range(m):
                for b in range(m):
                    ja, jb = classes[i, a], classes[i, b]
                    out[i, li, a, b] = g[ja, jb] - g[ja, r] - g[r, jb] + g[r, r]
    return out


def test_kept_classes_are_the_nearest_competitors(k30):
    net, x, y, full = k30
    tr = gradient_grams(net, (x, y), competitors=4, **_kw()).truncation
    order = np.argsort(-full.logits, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(tr.classes, order)
    assert tr.n_classes == 30 and tr.n_competitors == 4
    z = full.logits
    rest = z.copy()
    np.put_along_axis(rest, order, -np.inf, axis=1)
    np.testing.assert_allclose(tr.tail_margin, z.max(1) - rest.max(1), rtol=1e-12)


def test_truncated_grams_match_the_margin_transform_of_the_full_grams(k30):
    net, x, y, full = k30
    g = gradient_grams(net, (x, y), competitors=4, granularity="channel", **_kw())
    tr = g.truncation
    ref = _margin_gram(full.grams, tr.classes)
    np.testing.assert_allclose(g.grams, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_allclose(g.logits, np.take_along_axis(full.logits, tr.classes, 1))
    # labels are column indices, -1 when the label is not kept
    for i in range(len(y)):
        hit = np.flatnonzero(tr.classes[i] == int(y[i]))
        assert g.labels[i] == (hit[0] if hit.size else -1)
    assert g.predictions().tolist() == [0] * len(y)


def test_all_competitors_kept_is_the_full_computation(k30):
    net, x, y, full = k30
    g = gradient_grams(net, (x, y), competitors=29, granularity="channel", **_kw())
    assert g.truncation is None
    np.testing.assert_array_equal(g.grams, full.grams)


def _exact_tail(full: np.ndarray, classes: np.ndarray) -> np.ndarray:
    n, L, k, _ = full.shape
    out = np.zeros((n, L))
    for i in range(n):
        r = classes[i, 0]
        for j in sorted(set(range(k)) - set(classes[i].tolist())):
            out[i] += full[i, :, j, j] - 2 * full[i, :, j, r] + full[i, :, r, r]
    return out


def test_tail_is_an_unbiased_hutchinson_estimate(k30):
    """Mean of P probes against the exact sum from the full Grams, within 4 standard errors
    (the Rademacher variance 2 * sum_{j != k} <v_j, v_k>^2, computed exactly)."""
    net, x, y, full = k30
    p = 64
    g = gradient_grams(net, (x, y), competitors=3, tail_probes=p, **_kw())
    tr = g.truncation
    exact = _exact_tail(full.grams, tr.classes)
    n, L, k, _ = full.grams.shape
    for i in range(n):
        r = tr.classes[i, 0]
        rest = sorted(set(range(k)) - set(tr.classes[i].tolist()))
        for li in range(L):
            gg = full.grams[i, li]
            v = gg[np.ix_(rest, rest)] - gg[rest, r][:, None] - gg[r, rest][None, :] + gg[r, r]
            var = 2.0 * (np.sum(v**2) - np.sum(np.diag(v) ** 2))
            assert abs(tr.tail[i, li] - exact[i, li]) <= 4.0 * np.sqrt(var / p) + 1e-12
    # per-channel tails add up to the per-tensor tail
    gc = gradient_grams(net, (x, y), competitors=3, tail_probes=4, granularity="channel", **_kw())
    off = gc.channel_offsets()
    for li in range(gc.n_layers):
        np.testing.assert_allclose(
            gc.truncation.channel_tail[:, off[li] : off[li + 1]].sum(1), gc.truncation.tail[:, li],
            rtol=1e-5,
        )  # fmt: skip


def test_tail_constant():
    t = np.linspace(0.01, 6, 60001)
    assert TAIL_CONSTANT == pytest.approx(np.max(t**2 * special.ndtr(-t)), rel=1e-6)


def test_tail_bound_holds_by_monte_carlo():
    """Eq. L19 with exact margin variances bounds the union of the tail flips (seeded MC)."""
    rng = np.random.default_rng(0)
    n_rest, n = 40, 200
    d = rng.uniform(0.5, 3.0, (n, n_rest))
    s2 = rng.uniform(0.05, 1.0, (n, n_rest))
    # the union of independent tail flips, exact for independent margins
    exact_union = 1.0 - np.prod(special.ndtr(d / np.sqrt(s2)), axis=1)
    tr = Truncation(
        classes=np.tile(np.arange(2), (n, 1)), n_classes=2 + n_rest, tail=s2.sum(1)[:, None],
        tail_margin=d.min(1), n_probes=1,
    )  # fmt: skip
    bound = truncation_tail_bound(tr, [np.asarray(1.0)], np.array([0, 1]))
    assert np.all(bound >= exact_union - 1e-12)
    # and by simulation with correlated margins (a common shift: Slepian does not apply)
    z = rng.standard_normal((4000, 1))
    e = rng.standard_normal((4000, n_rest))
    i = 7
    m = d[i] + np.sqrt(s2[i]) * (np.sqrt(0.5) * z + np.sqrt(0.5) * e)
    p_mc = np.mean(np.any(m < 0, axis=1))
    assert p_mc <= bound[i] + 3 * np.sqrt(p_mc * (1 - p_mc) / 4000)


def test_prediction_with_truncated_grams(k30):
    net, x, y, full = k30
    g = gradient_grams(net, (x, y), competitors=5, tail_probes=4, granularity="channel", **_kw())
    v = [1e-4 * np.ones(s[0]) for s in g.weight_shapes]
    rf = multilayer_distortion(full, v, band=False)
    rt = multilayer_distortion(g, v, band=False)
    # the kept margins are a subset: flips within them are at most the flips of all K
    assert rt.flip_rate <= rf.flip_rate + 3 * (rt.flip_rate_stderr + rf.flip_rate_stderr) + 1e-9
    assert rt.truncation_bound >= 0.0
    rb = multilayer_distortion(g, v, band=False)
    assert np.isnan(rb.flip_band().low) and np.isnan(rb.flip_band().high)
    assert rt.accuracy_float == pytest.approx(rf.accuracy_float)
    assert "truncation_bound" in rt.to_frame().columns
    # per-channel steps on a per-tensor cache: a clear error
    gt = gradient_grams(net, (x, y), competitors=5, tail_probes=2, **_kw())
    vc = [1e-4 * np.linspace(0.5, 1.5, s[0]) for s in g.weight_shapes]
    with pytest.raises(ValueError, match="per-channel"):
        multilayer_distortion(gt, vc, band=False)


def test_no_tail_probes_gives_an_unknown_bound(k30):
    net, x, y, _ = k30
    g = gradient_grams(net, (x, y), competitors=3, tail_probes=0, **_kw(n_realizations=40))
    r = multilayer_distortion(g, [1e-4] * g.n_layers)
    assert np.isnan(r.truncation_bound)
    assert r.flip_band().high == 1.0  # nothing is known about the classes not kept


def test_save_load_and_merge_keep_the_truncation(tmp_path, k30):
    net, x, y, _ = k30
    g = gradient_grams(net, (x, y), competitors=3, tail_probes=2, granularity="channel", **_kw())
    back = load_grams(save_grams(g, tmp_path / "g.npz"))
    for a in ("classes", "tail", "tail_margin", "channel_tail"):
        np.testing.assert_array_equal(getattr(back.truncation, a), getattr(g.truncation, a))
    assert back.truncation.n_probes == 2 and back.truncation.n_classes == 30
    a = gradient_grams(net, (x[:5], y[:5]), competitors=3, tail_probes=2, **_kw())
    b = gradient_grams(net, (x[5:], y[5:]), competitors=3, tail_probes=2, **_kw())
    m = merge_grams([a, b])
    np.testing.assert_array_equal(m.truncation.classes, g.truncation.classes)
    np.testing.assert_allclose(m.grams, g.grams, rtol=1e-12)


def test_cache_key_depends_on_the_truncation(tmp_path, k30):
    net, x, y, _ = k30
    kw = {"cache_dir": tmp_path, "progress": False, "n_realizations": 0}
    a = gradient_grams(net, (x, y), **kw)
    b = gradient_grams(net, (x, y), competitors=3, **kw)
    c = gradient_grams(net, (x, y), competitors=4, **kw)
    assert len({a.key, b.key, c.key}) == 3
    again = gradient_grams(net, (x, y), competitors=3, **kw)
    assert again.key == b.key and "cache_file" in again.meta


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "3"])
def test_bad_competitors(bad, k30):
    net, x, y, _ = k30
    with pytest.raises(ValueError, match="competitors"):
        gradient_grams(net, (x, y), competitors=bad, **_kw())


def test_bad_tail_probes(k30):
    net, x, y, _ = k30
    with pytest.raises(ValueError, match="tail_probes"):
        gradient_grams(net, (x, y), competitors=3, tail_probes=-1, **_kw())


def test_bad_truncation_arrays():
    with pytest.raises(ValueError, match="classes"):
        Truncation(classes=np.zeros((3, 1), int), n_classes=5, tail=np.zeros((3, 1)))
    with pytest.raises(ValueError, match="tail"):
        Truncation(classes=np.zeros((3, 2), int), n_classes=5, tail=-np.ones((3, 1)))


def _estimator(tmp_path):
    from distortion.estimator import AccuracyLossEstimator
    from distortion.quantize import UniformQuantizer

    return AccuracyLossEstimator(
        UniformQuantizer(4), layers="all", n_realizations=40, cache_dir=tmp_path, progress=False
    )


def _mlp(k: int):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, k)).double().eval()
    return net, torch.randn(16, 6, dtype=torch.float64), torch.randint(0, k, (16,))


def test_estimator_fit_model_with_competitors_at_1000_classes(tmp_path):
    """K = 1 000: m + 2 backward passes, the band widened by the bound."""
    net, x, y = _mlp(1000)
    est = _estimator(tmp_path).fit_model(net, (x, y), competitors=5)
    assert est.grams_.truncation.n_classes == 1000 and est.grams_.n_classes == 6
    assert est.grams_.meta["backward_passes"] == 7
    p = est.predict([3, 6]).to_frame()
    assert np.all(p.flip_rate_high >= p.flip_rate)


def test_estimator_truncated_against_full(tmp_path):
    net, x, y = _mlp(100)
    p = _estimator(tmp_path).fit_model(net, (x, y), competitors=5).predict([3, 6]).to_frame()
    pf = _estimator(tmp_path).fit_model(net, (x, y)).predict([3, 6]).to_frame()
    tol = 4 * (p.flip_rate_stderr + pf.flip_rate_stderr)
    # the kept classes' flips never exceed all classes' flips (beyond integration error) ...
    assert np.all(p.flip_rate <= pf.flip_rate + tol)
    # ... and the widened band reaches the full prediction
    assert np.all(p.flip_rate_high >= pf.flip_rate - tol)
