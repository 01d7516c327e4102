"""The rectifiers' second-order mean shift (theory/activations.md eq. A16-A17)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from distortion.activations import ActivationQParams  # noqa: E402
from distortion.experiments.activation_grams import _a5_noise  # noqa: E402
from distortion.experiments.curvature import relu_bias, relu_curvature_shift  # noqa: E402


def test_relu_bias_is_the_gaussian_expectation():
    """eq. A16 against a seeded Monte Carlo of max(u + e, 0) - max(u, 0), e ~ N(0, s^2)."""
    rng = np.random.default_rng(0)
    u = torch.tensor([-1.0, -0.2, 0.0, 0.3, 2.0], dtype=torch.float64)
    s2 = torch.tensor([0.25, 0.04, 1.0, 0.09, 0.01], dtype=torch.float64)
    e = rng.standard_normal((400_000, 5)) * np.sqrt(s2.numpy())
    mc = np.maximum(u.numpy() + e, 0) - np.maximum(u.numpy(), 0)
    se = mc.std(0) / np.sqrt(len(mc))
    got = relu_bias(u, s2).numpy()
    assert np.all(np.abs(got - mc.mean(0)) < 4 * se + 1e-12)
    assert np.all(got >= 0)
    assert relu_bias(u, torch.zeros(5, dtype=torch.float64)).abs().max() == 0
    # s -> 0 at u = 0: s / sqrt(2 pi)
    assert float(relu_bias(torch.zeros(1), torch.full((1,), 1e-6))) == pytest.approx(
        1e-3 / np.sqrt(2 * np.pi), rel=1e-5
    )


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 5)

    def forward(self, x):
        return self.fc2(nn.functional.relu(self.fc1(x)))


def test_shift_matches_a_monte_carlo_of_the_nonlinear_mean():
    """Noise at the input of a one-hidden-layer ReLU network: the mean logit shift of the real
    network (seeded Monte Carlo, 10 000 draws) is eq. A17 (Gaussian marginals of 24 uniform
    terms; the unit variances from 400 probes)."""
    torch.manual_seed(0)
    net = MLP().double().eval()
    x = torch.randn(6, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    qp = ActivationQParams(scale=np.array(0.6), zero_point=np.array(0), qmin=-100, qmax=100)
    shift = relu_curvature_shift(net, (x, torch.zeros(6, dtype=torch.long)), {"fc1": qp},
                                 n_probes=400, seed=3)  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        z0 = net(x)
        acc = torch.zeros_like(z0)
        acc2 = torch.zeros_like(z0)
        m = 10_000
        for _ in range(m):
            d = net(x + _a5_noise(x, qp, gen)[0]) - z0
            acc += d
            acc2 += d * d
    mc = (acc / m).numpy()
    se = np.sqrt(((acc2 / m).numpy() - mc**2) / m)
    assert np.abs(shift).max() > 10 * se.max()  # a shift the Monte Carlo resolves
    err = np.linalg.norm(shift - mc) / np.linalg.norm(mc)
    assert err < 0.1, err
    # no ReLU between the noise and the logits: no shift
    zero = relu_curvature_shift(net, (x, torch.zeros(6, dtype=torch.long)), {"fc2": qp},
                                n_probes=4)  # fmt: skip
    assert np.abs(zero).max() == 0


def test_bad_input():
    net = MLP().double()
    x = torch.zeros(2, 24, dtype=torch.float64)
    qp = ActivationQParams(scale=np.array(0.1), zero_point=np.array(0), qmin=-8, qmax=7)
    with pytest.raises(ValueError, match="n_probes"):
        relu_curvature_shift(net, (x, None), {"fc1": qp}, n_probes=1)
    with pytest.raises(ValueError, match="where"):
        relu_curvature_shift(net, (x, None), {"fc1": qp}, where="middle")
    with pytest.raises(ValueError, match="qparams is empty"):
        relu_curvature_shift(net, (x, None), {})


class TanhMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_second_order_weight_shift_is_half_the_variance_weighted_hessian_trace():
    """eq. L21 against the exact Hessian (torch.func.hessian, float64): per sample and logit
    1/2 sum_l sum_c sigma^2_lc tr H_lc, per-channel and per-tensor second moments; the
    Hutchinson estimate is within 4 of its own standard errors, which shrink as 1/sqrt(P)."""
    from torch.func import functional_call, hessian

    from distortion.experiments.curvature import second_order_weight_shift

    torch.manual_seed(0)
    net = TanhMLP().double().eval()
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s1 = np.linspace(0.01, 0.05, 10)  # per output channel of fc1
    s2 = 0.03  # per tensor of fc2
    w1, w2 = net.fc1.weight.detach(), net.fc2.weight.detach()

    def z(a, b):
        return functional_call(net, {"fc1.weight": a, "fc2.weight": b}, (x,))

    h = hessian(z, argnums=(0, 1))(w1, w2)
    h11 = h[0][0].reshape(4, 3, 80, 80).diagonal(dim1=-2, dim2=-1).reshape(4, 3, 10, 8)
    h22 = h[1][1].reshape(4, 3, 30, 30).diagonal(dim1=-2, dim2=-1)
    exact = 0.5 * ((h11 * torch.as_tensor(s1)[:, None]).sum((-2, -1)) + s2 * h22.sum(-1))
    exact = exact.detach().numpy()
    shift, se = second_order_weight_shift(net, (x, None), {"fc1": s1, "fc2": s2},
                                          n_probes=2000, seed=1)  # fmt: skip
    assert shift.shape == se.shape == (4, 3)
    assert np.abs(exact).max() > 6 * se.max()  # a shift the estimate resolves
    assert np.all(np.abs(shift - exact) < 4 * se + 1e-12)
    _, se_small = second_order_weight_shift(net, (x, None), {"fc1": s1, "fc2": s2},
                                            n_probes=500, seed=1)  # fmt: skip
    assert 1.5 < float(np.median(se_small / se)) < 2.5  # 1/sqrt(P)
    # the last layer alone is linear in its weights: no second-order shift
    lin, _ = second_order_weight_shift(net, (x, None), {"fc2": s2}, n_probes=4)
    assert np.abs(lin).max() < 1e-14
    with pytest.raises(ValueError, match="n_probes"):
        second_order_weight_shift(net, (x, None), {"fc2": s2}, n_probes=1)
    with pytest.raises(ValueError, match="one per output channel"):
        second_order_weight_shift(net, (x, None), {"fc1": np.ones(3)})
    with pytest.raises(ValueError, match="no layer"):
        second_order_weight_shift(net, (x, None), {"nope": 1.0})
    with pytest.raises(ValueError, match="empty"):
        second_order_weight_shift(net, (x, None), {})
