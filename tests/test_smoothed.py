"""The noise-smoothed network: moment propagation at first order (theory/multilayer.md §17)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from scipy import integrate, stats  # noqa: E402
from torch import nn  # noqa: E402

from distortion.experiments.smoothed import (  # noqa: E402
    _SmoothMode,
    fresh_covariance,
    noise_scales,
    residual_variance,
    smooth_relu,
    smoothed_grams,
    smoothed_shift,
)


def _moments(u: float, s: float) -> tuple[float, float]:
    """E[max(u + e, 0)] and E[max(u + e, 0)^2], e ~ N(0, s^2), by quadrature."""
    f = lambda e, p: max(u + e, 0.0) ** p * stats.norm.pdf(e, scale=s)  # noqa: E731
    lo = -u  # the integrand is 0 below e = -u
    m1 = integrate.quad(f, lo, np.inf, args=(1,), epsabs=1e-13)[0]
    m2 = integrate.quad(f, lo, np.inf, args=(2,), epsabs=1e-13)[0]
    return m1, m2


def test_smooth_relu_and_residual_variance_are_the_gaussian_moments():
    """eq. L30 and L34 against quadrature; the smoothed gate is Phi(u/s); s = 0 is the ReLU."""
    u = torch.tensor([-2.0, -0.3, 0.0, 0.4, 1.5], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.5, 1.0, 0.2, 0.7, 3.0], dtype=torch.float64)
    mean = smooth_relu(u, s)
    var = residual_variance(u.detach(), s)
    (gate,) = torch.autograd.grad(mean.sum(), u)
    mean = mean.detach()
    for j in range(5):
        uj, sj = float(u.detach()[j]), float(s[j])
        m1, m2 = _moments(uj, sj)
        phi = stats.norm.cdf(uj / sj)
        assert float(mean[j]) == pytest.approx(m1, rel=1e-9, abs=1e-12)
        assert float(var[j]) == pytest.approx(m2 - m1**2 - phi**2 * sj**2, rel=1e-7, abs=1e-12)
        assert float(gate[j]) == pytest.approx(phi, rel=1e-12)
    assert torch.all(var > 0)
    zero = torch.zeros(5, dtype=torch.float64)
    assert torch.equal(smooth_relu(u.detach(), zero), torch.relu(u.detach()))
    assert torch.equal(residual_variance(u.detach(), zero), zero)


class Chain(nn.Module):
    """conv1 -> [ReLU] -> conv2 -> ReLU -> pool -> fc."""

    def __init__(self, relu_between: bool = True):
        super().__init__()
        self.relu_between = relu_between
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        a = self.conv1(x)
        if self.relu_between:
            a = nn.functional.relu(a)
        a = nn.functional.relu(self.conv2(a))
        return self.fc(a.mean((2, 3)))


def _net(relu_between: bool = True, seed: int = 0) -> Chain:
    torch.manual_seed(seed)
    return Chain(relu_between).double().eval()


def _x(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        n, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


def _pre_relu(net: Chain, x: torch.Tensor, weights: dict | None = None) -> list[torch.Tensor]:
    """The inputs of every ReLU call of one forward pass (weights optionally replaced)."""
    from torch.func import functional_call

    seen: list[torch.Tensor] = []
    with torch.no_grad(), _SmoothMode({}, lambda i, u: seen.append(u.clone())):
        functional_call(net, weights or {}, (x,))
    return seen


def _uniform(w: torch.Tensor, m2: float, gen: torch.Generator) -> torch.Tensor:
    return np.sqrt(3.0 * m2) * (2 * torch.rand(w.shape, generator=gen, dtype=w.dtype) - 1)


def test_first_probe_is_the_exact_first_order_variance():
    """One perturbed layer: the hard probes' s^2 at the next ReLU is sigma^2 |patch|^2 (eq. L27)
    up to the probes' own error (400 probes: ~7 % per unit, the mean ratio within 3 %)."""
    net, x = _net(), _x()
    m2 = 0.004
    scales, changes = noise_scales(net, x, {"conv1": m2}, n_probes=400, iterations=0,
                                   residual=False, bilinear=False,
                                   generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert changes == []
    patch = nn.functional.unfold(x, 3, padding=1)  # (N, 27, 36)
    exact = (m2 * (patch**2).sum(1)).reshape(3, 1, 6, 6).expand(3, 8, 6, 6)
    ratio = (scales[0] ** 2 / exact).numpy()
    assert abs(ratio.mean() - 1) < 0.03, ratio.mean()
    assert np.sqrt(np.mean((ratio - 1) ** 2)) < 0.15
    # a variance 10 % off would be seen
    assert abs(ratio.mean() / 1.1 - 1) > 0.05


def test_bilinear_term_makes_the_probes_exact_without_a_rectifier_between():
    """conv1 -> conv2 with both perturbed is bilinear in the errors: with the term dW2 da of
    eq. L35 the probes' variance at the ReLU after conv2 is the exact one (seeded Monte Carlo
    of the real network, 4 000 draws); without it, it is short by the second-order part."""
    net, x = _net(relu_between=False), _x()
    m2 = {"conv1": 0.05, "conv2": 0.02}
    gen = torch.Generator().manual_seed(3)
    params = {f"{k}.weight": getattr(net, k).weight.detach() for k in m2}
    base = _pre_relu(net, x)[0]
    acc = torch.zeros_like(base)
    m = 4000
    for _ in range(m):
        w = {k: v + _uniform(v, m2[k.split(".")[0]], gen) for k, v in params.items()}
        acc += (_pre_relu(net, x, w)[0] - base) ** 2
    mc = acc / m  # the errors are zero-mean and independent: no mean to remove
    kw = dict(n_probes=800, iterations=0, residual=False)
    with_term, _ = noise_scales(net, x, m2, bilinear=True,
                                generator=torch.Generator().manual_seed(4), **kw)  # fmt: skip
    without, _ = noise_scales(net, x, m2, bilinear=False,
                              generator=torch.Generator().manual_seed(4), **kw)  # fmt: skip
    r_with = float((with_term[0] ** 2).sum() / mc.sum())
    r_without = float((without[0] ** 2).sum() / mc.sum())
    assert abs(r_with - 1) < 0.04, r_with
    assert r_without < 0.9, r_without


def test_smoothed_shift_matches_a_monte_carlo_at_one_rectifier():
    """One perturbed layer before one ReLU: the mean logit move of the real network (seeded
    Monte Carlo, 4 000 draws of H_U) is the smoothed network's shift (eq. L31; the unit noise is
    a sum of 27 uniform terms, close to Gaussian)."""

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 36, 4)

        def forward(self, x):
            return self.fc(nn.functional.relu(self.conv1(x)).flatten(1))

    torch.manual_seed(0)
    net = One().double().eval()
    x = _x()
    m2 = {"conv1": 0.01}
    shift, changes = smoothed_shift(net, (x, torch.zeros(3, dtype=torch.long)), m2,
                                    n_probes=400, iterations=1, seed=5,
                                    probe_dtype=torch.float64)  # fmt: skip
    assert shift.shape == (3, 4) and changes.shape == (1, 1)
    from torch.func import functional_call

    w0 = net.conv1.weight.detach()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        z0 = net(x)
        d = torch.stack([
            functional_call(net, {"conv1.weight": w0 + _uniform(w0, 0.01, gen)}, (x,)) - z0
            for _ in range(4000)
        ])  # fmt: skip
    mc, se = d.mean(0).numpy(), (d.std(0) / np.sqrt(len(d))).numpy()
    assert np.abs(mc).max() > 8 * se.max()  # a shift the Monte Carlo resolves
    assert np.linalg.norm(shift - mc) / np.linalg.norm(mc) < 0.1


def test_fresh_covariance_is_the_sum_over_units():
    """eq. L36 against a naive transcription: the Jacobian of the logits in a perturbation
    added at each point (torch.func.jacrev), its variances, summed unit by unit."""
    from torch.func import jacrev

    net, x = _net(), _x(2)
    m2 = {"conv1": 0.003, "conv2": 0.002, "fc": 0.01}
    in_var: dict = {}
    scales, _ = noise_scales(net, x, m2, n_probes=8, iterations=1,
                             generator=torch.Generator().manual_seed(7), inputs=in_var)  # fmt: skip
    assert set(in_var) == {"conv2", "fc"}  # the stem's input carries no noise
    got = fresh_covariance(net, x, scales, in_var, m2)
    pre = _pre_relu(net, x)  # the hard pre-activations only fix the shapes here
    for i in range(len(pre)):
        assert scales[i].shape == pre[i].shape

    def smoothed(d2, d3, r1, r2, xi):
        a = smooth_relu(net.conv1(xi), scales[0][idx]) + r1
        b = net.conv2(a) + d2
        b = smooth_relu(b, scales[1][idx]) + r2
        return net.fc(b.mean((2, 3))) + d3

    want = np.zeros_like(got)
    for idx in range(2):
        xi = x[idx : idx + 1]
        with torch.no_grad():
            a = net.conv1(xi)
            u1 = a
            a = smooth_relu(a, scales[0][idx])
            u2 = net.conv2(a)
            b = smooth_relu(u2, scales[1][idx])
        zeros = [torch.zeros_like(t) for t in (u2, net.fc(b.mean((2, 3))), a, b)]
        jac = jacrev(smoothed, argnums=(0, 1, 2, 3))(*zeros, xi)
        w2 = net.conv2.weight
        v_conv2 = nn.functional.conv2d(in_var["conv2"][idx : idx + 1],
                                       m2["conv2"] * torch.ones_like(w2), padding=1)  # fmt: skip
        v_fc = (in_var["fc"][idx : idx + 1] * m2["fc"]).sum(1, keepdim=True).expand(1, 4)
        v_r1 = residual_variance(u1.detach(), scales[0][idx])
        v_r2 = residual_variance(u2, scales[1][idx])
        for j, v in ((0, v_conv2), (1, v_fc), (2, v_r1), (3, v_r2)):
            jj = jac[j].detach().reshape(4, -1)
            want[idx] += (jj * v.reshape(1, -1) @ jj.T).numpy()
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_smoothed_grams_are_the_smoothed_networks_jacobian():
    """The Grams of smoothed_grams are J J^T of the smoothed network's weight Jacobian
    (torch.func.jacrev, same noise scales), its logits the float network's, and the shift the
    smoothed network's output minus the float one; tiny noise gives the hard Grams back."""
    from torch.func import functional_call, jacrev

    from distortion.experiments.sensitivity import gradient_grams

    net, x = _net(), _x(2)
    data = (x, torch.zeros(2, dtype=torch.long))
    m2 = {"conv1": 0.003, "conv2": 0.002}
    seed = 3
    sg = smoothed_grams(net, data, m2, n_realizations=0, n_probes=8, iterations=1, chunk=2,
                        seed=seed, probe_dtype=torch.float64)  # fmt: skip
    # the same scales: the same generator, one chunk
    scales, _ = noise_scales(net, x, m2, n_probes=8, iterations=1,
                             generator=torch.Generator().manual_seed(seed * 7 + 17),
                             inputs={}, draws=[])  # fmt: skip
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p, name):
        with _SmoothMode(scales):
            return functional_call(net, {**params, name: p}, (x,))

    for li, name in enumerate(("conv1.weight", "conv2.weight")):
        j = jacrev(f)(params[name], name).reshape(2, 4, -1)
        want = torch.einsum("nki,nji->nkj", j, j).numpy()
        np.testing.assert_allclose(sg.grams.grams[:, li], want, rtol=1e-8,
                                   atol=1e-12 * np.abs(want).max())  # fmt: skip
    with torch.no_grad():
        z = net(x).numpy()
        with _SmoothMode(scales):
            zs = net(x).numpy()
    np.testing.assert_allclose(sg.grams.logits, z, rtol=1e-12)
    np.testing.assert_allclose(sg.shift, zs - z, rtol=1e-8, atol=1e-12)
    assert sg.fresh.shape == (2, 4, 4) and sg.draws.shape == (2, 8, 4)
    assert sg.to_frame().shape[0] == 1
    tiny = smoothed_grams(net, data, {k: v * 1e-16 for k, v in m2.items()}, n_realizations=0,
                          n_probes=4, iterations=1, chunk=1, seed=1)  # fmt: skip
    hard = gradient_grams(net, data, layers=list(m2), n_realizations=0, cache=False,
                          progress=False)  # fmt: skip
    np.testing.assert_allclose(tiny.grams.grams, hard.grams, rtol=1e-5)
    assert np.abs(tiny.shift).max() < 1e-6


def test_bad_input():
    net, x = _net(), _x(2)
    with pytest.raises(ValueError, match="n_probes"):
        noise_scales(net, x, {"conv1": 0.1}, n_probes=1)
    with pytest.raises(ValueError, match="iterations"):
        noise_scales(net, x, {"conv1": 0.1}, iterations=-1)
    with pytest.raises(ValueError, match="second moment"):
        noise_scales(net, x, {"conv1": -0.1})
    with pytest.raises(ValueError, match="no layer"):
        noise_scales(net, x, {"nope": 0.1})
    with pytest.raises(ValueError, match="chunk"):
        smoothed_shift(net, (x, None), {"conv1": 0.1}, chunk=0)
    with pytest.raises(ValueError, match="probe_dtype"):
        smoothed_shift(net, (x, None), {"conv1": 0.1}, probe_dtype=torch.int32)
    with pytest.raises(ValueError, match="data must be"):
        smoothed_shift(net, "images", {"conv1": 0.1})
    with pytest.raises(ValueError, match="does not accept inputs of shape"):
        smoothed_shift(net, (x[:, :1], None), {"conv1": 0.1}, cache=False)
    with pytest.raises(ValueError, match="not finite"):
        smoothed_shift(net, (x * float("nan"), None), {"conv1": 0.1}, cache=False)
    scales, _ = noise_scales(net, x, {"conv1": 0.1}, n_probes=2)
    with pytest.raises(ValueError, match="forward pass differs"), _SmoothMode(scales):
        net(_x(3))


def test_shift_is_cached_under_its_key(tmp_path, monkeypatch):
    import distortion.experiments.smoothed as smoothed

    net, x = _net(), _x(4)
    m2 = {"conv1": 0.01, "conv2": np.array([0.02, 0.01, 0.03, 0.02, 0.01, 0.02])}
    kw = dict(n_probes=4, iterations=1, chunk=2, seed=3, cache_dir=tmp_path)
    shift, changes = smoothed_shift(net, (x, None), m2, **kw)
    assert shift.shape == (4, 4) and changes.shape == (2, 1)

    def again(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(smoothed, "_chunks", again)
    cached, cached_changes = smoothed_shift(net, (x, None), m2, **kw)
    np.testing.assert_array_equal(cached, shift)
    np.testing.assert_array_equal(cached_changes, changes)
    for other in (
        dict(kw, seed=4),
        dict(kw, n_probes=5),
        dict(kw, cache=False),
    ):  # another setting, or no cache: computed
        with pytest.raises(AssertionError, match="computed again"):
            smoothed_shift(net, (x, None), m2, **other)
    with pytest.raises(AssertionError, match="computed again"):  # another error model
        smoothed_shift(net, (x, None), {**m2, "conv1": 0.02}, **kw)
    with pytest.raises(AssertionError, match="computed again"):  # other images
        smoothed_shift(net, (_x(4, seed=2), None), m2, **kw)
    with pytest.raises(ValueError, match="second_moments"):
        smoothed_shift(net, (x, None), {}, **kw)


def test_compare_all_layers_level_3s_is_3l_moved_by_the_smoothed_mean(tmp_path):
    from test_compare import _tiny

    from distortion.compression import error_second_moment
    from distortion.experiments.compare import compare_all_layers
    from distortion.experiments.sensitivity import gradient_grams
    from distortion.quantize import UniformQuantizer
    from distortion.theory.multilayer import multilayer_distortion

    net, data = _tiny(n=120)
    qs = [UniformQuantizer(3), UniformQuantizer(6)]
    comp = compare_all_layers(net, data, qs, cache_dir=tmp_path, n_realizations=40,
                              smoothed_probes=4, smoothed_bits=[3], progress=False)  # fmt: skip
    t = comp.table.set_index("bits")
    assert comp.cells[0].predictions["L3S"].level == "3S"
    assert "L3S" not in comp.cells[1].predictions and np.isnan(t.loc[6, "L3S_flip_rate"])
    grams = gradient_grams(net, data, n_realizations=40, cache_dir=tmp_path, progress=False)
    names = list(grams.layer_names)
    m2 = [
        error_second_moment(qs[0].compress(net.get_submodule(k).weight.detach(), seed=i),
                            "uniform")
        for i, k in enumerate(names)
    ]  # fmt: skip
    shift, _ = smoothed_shift(net, data, dict(zip(names, m2, strict=True)), n_probes=4,
                              cache=False)  # fmt: skip
    assert np.abs(shift).max() > 0
    ref = multilayer_distortion(grams, m2, seed=0, band=True, shift=shift)
    assert t.loc[3, "L3S_flip_rate"] == pytest.approx(ref.flip_rate, rel=1e-12)
    assert t.loc[3, "L3S_flip_rate"] != t.loc[3, "L3L_flip_rate"]
    summary = comp.summary()
    assert summary["band_coverage_L3S"].notna().all()
    for bad, match in (
        (dict(smoothed_probes=1), "smoothed_probes"),
        (dict(smoothed_probes=4, bias_correction=object()), "bias correction"),
        (dict(smoothed_probes=4, smoothed_bits="3"), "smoothed_bits"),
    ):
        with pytest.raises(ValueError, match=match):
            compare_all_layers(net, data, qs, cache_dir=tmp_path, progress=False, **bad)
