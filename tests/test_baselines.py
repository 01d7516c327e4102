"""Tests of the published comparators: Sakr et al.'s bound and the HAWQ-V2 sensitivity."""

from __future__ import annotations

import numpy as np
import pytest

from distortion.quantize import UniformQuantizer
from distortion.theory.baselines import (
    HessianTrace,
    hawq_v2_sensitivity,
    sakr_bound,
    sakr_noise_gains,
)
from distortion.theory.multilayer import margin_statistics, noise_covariance

torch = pytest.importorskip("torch")

from test_multilayer import LAYERS, reference_grams, tiny_data, tiny_net  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from distortion.experiments.sensitivity import gradient_grams

    net = tiny_net(seed=2)
    x, y = tiny_data(40, seed=5)
    g = gradient_grams(
        net, (x, y), granularity="channel", n_realizations=0, cache=False, progress=False
    )
    return net, x, y, g


def _naive_gains(net, x, channel: bool):
    """E_l = mean_x sum_{j != yhat} sum_w |d(z_j - z_yhat)/dw|^2 / (24 (z_yhat - z_j)^2)."""
    _, jac = reference_grams(net, x, LAYERS)
    with torch.no_grad():
        z = net(x).numpy()
    out = []
    for name in LAYERS:
        j = jac[f"{name}.weight"].numpy()  # (N, K, C, ...)
        j = j.reshape(j.shape[0], j.shape[1], j.shape[2], -1)
        rows = []
        for i in range(x.shape[0]):
            r = int(np.argmax(z[i]))
            acc = np.zeros(j.shape[2])
            for k in range(z.shape[1]):
                if k == r:
                    continue
                d = j[i, k] - j[i, r]  # (C, n/C)
                acc += (d**2).sum(axis=1) / (24.0 * (z[i, r] - z[i, k]) ** 2)
            rows.append(acc if channel else acc.sum())
        out.append(np.mean(rows, axis=0))
    return np.concatenate(out) if channel else np.array(out)


def test_sakr_gains_match_naive_transcription(tiny):
    net, x, _, g = tiny
    np.testing.assert_allclose(sakr_noise_gains(g), _naive_gains(net, x, False), rtol=1e-9)
    np.testing.assert_allclose(
        sakr_noise_gains(g, channel=True), _naive_gains(net, x, True), rtol=1e-4
    )


def test_sakr_bound_is_sum_of_chebyshev_terms_and_dominates_gaussian_union(tiny):
    _, _, _, g = tiny
    steps = [UniformQuantizer(5).qparams(w).step for w in g.weights]
    res = sakr_bound(g, steps)
    # per sample: sum_j Var(nu_j) / (2 m_j^2) = sum_j 1 / (2 t_j^2) with the z-scores of the
    # Gaussian model (an independent route through margin_statistics)
    cov = noise_covariance(g, [s**2 / 12 for s in steps])
    t = margin_statistics(g.logits, cov, g.predictions()).z_scores()
    np.testing.assert_allclose(res.per_sample, (0.5 / t**2).sum(axis=1), rtol=1e-10)
    assert res.bound == pytest.approx(np.sum(res.layer_terms))
    assert res.bound_clipped <= res.bound
    # Chebyshev is looser than the Gaussian tail term by term (Phi(-t) <= 1/(2t^2))
    from scipy.special import ndtr

    assert np.all(ndtr(-t).sum(axis=1) <= res.per_sample)
    # terms are Delta_l^2 E_l
    np.testing.assert_allclose(res.layer_terms, np.array(steps) ** 2 * sakr_noise_gains(g))


def test_sakr_per_channel_steps(tiny):
    _, _, _, g = tiny
    steps = [UniformQuantizer(4, granularity="channel").qparams(w).step for w in g.weights]
    res = sakr_bound(g, steps)
    gains = sakr_noise_gains(g, channel=True)
    off = g.channel_offsets()
    expect = [np.sum(s**2 * gains[off[i] : off[i + 1]]) for i, s in enumerate(steps)]
    np.testing.assert_allclose(res.layer_terms, expect, rtol=1e-5)
    with pytest.raises(ValueError, match="one entry per cached layer"):
        sakr_bound(g, steps[:2])
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        sakr_bound(g, [np.ones(2)] + steps[1:])


def _exact_traces(net, x, y, layers):
    """Tr(H_l) of the mean cross-entropy by one Hessian-vector product per basis vector."""
    params = [net.get_submodule(n).weight for n in layers]
    loss = torch.nn.functional.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    out = []
    for p, gr in zip(params, grads, strict=True):
        flat = gr.reshape(-1)
        tr = 0.0
        for i in range(flat.numel()):
            (h,) = torch.autograd.grad(flat[i], p, retain_graph=True)
            tr += float(h.reshape(-1)[i])
        out.append(tr)
    return np.array(out)


def test_hutchinson_trace_is_unbiased(tmp_path):
    from distortion.experiments.sensitivity import hessian_trace

    net = tiny_net(seed=2)
    x, y = tiny_data(48, seed=6)
    layers = ["conv1", "conv3", "fc2"]
    est = hessian_trace(
        net, (x, y), layers=layers, n_draws=200, batch_size=20, seed=3,
        cache_dir=tmp_path, progress=False,
    )  # fmt: skip
    exact = _exact_traces(net, x, y, layers)
    assert est.layer_names == tuple(layers)
    assert np.all(np.abs(est.trace - exact) < 4 * est.stderr), (est.trace, exact, est.stderr)
    # cached: same draws back
    again = hessian_trace(
        net, (x, y), layers=layers, n_draws=200, batch_size=20, seed=3,
        cache_dir=tmp_path, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(again.draws, est.draws)
    with pytest.raises(ValueError, match="needs labels"):
        hessian_trace(net, x, layers=layers, cache=False, progress=False)


def test_hawq_sensitivity_matches_definition():
    rng = np.random.default_rng(0)
    draws = rng.normal(5.0, 1.0, size=(30, 3))
    tr = HessianTrace(("a", "b", "c"), [10, 20, 40], draws)
    w = [rng.normal(size=n) for n in (10, 20, 40)]
    e = np.array([np.sum((UniformQuantizer(3).quantize(v).values - v) ** 2) for v in w])
    s = hawq_v2_sensitivity(tr, e)
    np.testing.assert_allclose(s.omega, draws.mean(0) / np.array([10, 20, 40]) * e)
    np.testing.assert_allclose(tr.stderr, draws.std(0, ddof=1) / np.sqrt(30))
    assert s.total() == pytest.approx(s.omega.sum())
    assert list(s.to_frame().columns) == ["layer", "omega", "omega_stderr", "squared_error"]
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        hawq_v2_sensitivity(tr, e[:2])
    with pytest.raises(ValueError, match="m >= 2"):
        HessianTrace(("a",), [3], np.ones((1, 1)))


def test_gauss_newton_trace_is_exact_for_piecewise_linear_nets(tiny):
    # the tiny CNN is ReLU + batch norm in eval mode: piecewise linear in each layer's
    # weights, so Tr(H_l) = mean_i tr[(diag p_i - p_i p_i^T) Gamma_l(x_i)] (eq. BL7)
    from distortion.theory.baselines import gauss_newton_trace

    net, x, y, g = tiny
    gn = gauss_newton_trace(g)
    some = ["conv1", "conv3", "fc2"]  # small layers: one Hessian-vector product per weight
    exact = _exact_traces(net, x, y, some)
    np.testing.assert_allclose(gn.trace[[LAYERS.index(n) for n in some]], exact, rtol=1e-8)
    assert gn.method == "gauss-newton" and gn.n_draws == g.n_samples
