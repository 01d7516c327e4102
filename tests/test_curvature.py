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


# -- the rectifier right after one layer under weight errors (theory/multilayer.md L27-L28) --


class _Block(nn.Module):
    def __init__(self, c, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False, groups=groups)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class _Net(nn.Module):
    def __init__(self, c=6, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.block = _Block(c, groups)
        self.linear = nn.Linear(c, 5)

    def forward(self, x):
        out = self.block(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(out.mean(dim=(2, 3)))


def _net(groups=1):
    torch.manual_seed(3)
    net = _Net(groups=groups).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _rectifier_reference(net, x, layer, m2, *, mean=None, draws=300, seed=0):
    """Seeded Monte Carlo of J (relu(a + d) - relu(a) - 1[a > 0] d) over Gaussian weight
    errors E of second moment m2 (so d = gamma * conv(u, E) is Gaussian, eq. L27): the
    exact error at the rectifier's input from the drawn E, the rest of the network linear
    (torch.func.jvp). Returns the mean and its standard error."""
    import torch.nn.functional as F
    from torch.func import jvp

    from distortion.experiments.models import get_layer

    prefix, _, leaf = layer.rpartition(".")
    conv = get_layer(net, layer)
    bn = get_layer(net, (prefix + "." if prefix else "") + "bn" + leaf[4:])
    # where the rectifier's output goes: the input of the next module, or the block's output
    rect_out = {"conv1": ("pre", net.block), "block.conv1": ("pre", net.block.conv2),
                "block.conv2": ("post", net.block)}  # fmt: skip
    store = {}
    hs = [conv.register_forward_hook(lambda m, i, o: store.update(u=i[0])),
          bn.register_forward_hook(lambda m, i, o: store.update(y=o))]  # fmt: skip
    if layer == "block.conv2":  # the residual sum: the rectifier's input is the block's
        hs.append(net.block.register_forward_hook(lambda m, i, o: store.update(res=i[0])))
    with torch.no_grad():
        net(x)
    for h in hs:
        h.remove()
    a = store["y"] + (store["res"] if layer == "block.conv2" else 0.0)
    gamma = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
    sd = torch.as_tensor(np.sqrt(m2), dtype=torch.float64)
    sd = sd.view(-1, 1, 1, 1) if sd.ndim else sd
    gen = torch.Generator().manual_seed(seed)
    kind, target = rect_out[layer]
    samples = []
    for _ in range(draws):
        e = torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64) * sd
        d = F.conv2d(store["u"], e, stride=conv.stride, padding=conv.padding, groups=conv.groups)
        if mean is not None:  # bias-corrected: the output error is E (u_p - u_bar)
            d = d - (e.reshape(e.shape[0], -1) * torch.as_tensor(mean).repeat_interleave(
                e.shape[0] // conv.groups, 0)).sum(1).view(1, -1, 1, 1)  # fmt: skip
        d = gamma * d
        pert = torch.relu(a + d) - torch.relu(a) - (a > 0).double() * d

        def f(t, pert=pert):
            if kind == "post":
                h = target.register_forward_hook(lambda m, i, o: o + t * pert)
            else:
                h = target.register_forward_pre_hook(lambda m, i: (i[0] + t * pert,))
            try:
                return net(x)
            finally:
                h.remove()

        with torch.no_grad():
            samples.append(jvp(f, (torch.zeros((), dtype=torch.float64),),
                               (torch.ones((), dtype=torch.float64),))[1].numpy())  # fmt: skip
    s = np.stack(samples)
    return s.mean(0), s.std(0, ddof=1) / np.sqrt(draws)


@pytest.mark.parametrize(
    "layer, per_channel, centred, groups",
    [
        ("block.conv1", False, False, 1),
        ("block.conv1", True, True, 2),
        ("block.conv2", True, False, 1),
        ("conv1", False, True, 1),
    ],  # fmt: skip
)
def test_rectifier_weight_shift_matches_a_monte_carlo_of_the_exact_rectifier(
    layer, per_channel, centred, groups
):
    """eq. L27-L28 against a seeded Monte Carlo (300 Gaussian weight errors) of the rectifier
    exact and the rest linear: per tensor and per channel, plain and bias-corrected, grouped,
    after a batch norm alone and after a residual sum."""
    from distortion.experiments.curvature import rectifier_weight_shift
    from distortion.experiments.models import get_layer

    net = _net(groups)
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    conv = get_layer(net, layer)
    rng = np.random.default_rng(2)
    m2 = rng.uniform(0.02, 0.08, conv.out_channels) if per_channel else 0.05
    mean = None
    if centred:
        g = conv.groups
        mean = rng.uniform(0.0, 0.5, (g, conv.weight[0].numel()))
    got = rectifier_weight_shift(net, (x, None), layer, m2, input_mean=mean)
    ref, se = _rectifier_reference(net, x, layer, m2, mean=mean)
    z = (got - ref) / se
    assert got.shape == (12, 5) and np.all(np.isfinite(got))
    assert np.sqrt(np.mean(got**2)) > 5 * np.sqrt(np.mean(se**2))  # a shift the MC resolves
    # rms z: 0.6-1.1 here; a 10 % error in the variance of eq. L27 gives 1.8-2.1
    assert np.abs(z).max() < 4.5 and np.sqrt(np.mean(z**2)) < 1.5
    f32 = rectifier_weight_shift(net, (x, None), layer, m2, input_mean=mean, dtype=torch.float32)
    assert np.abs(f32 - got).max() <= 1e-4 * np.abs(got).max()
    zero = rectifier_weight_shift(net, (x, None), layer, 0.0 * np.asarray(m2), input_mean=mean)
    assert np.abs(zero).max() == 0


def test_rectifier_weight_shift_rejects_what_it_cannot_model():
    from distortion.experiments.curvature import rectified_layers, rectifier_weight_shift

    net = _net()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert rectified_layers(net) == ["conv1", "block.conv1", "block.conv2"]
    with pytest.raises(ValueError, match="not a convolution"):
        rectifier_weight_shift(net, (x, None), "linear", 0.1)
    with pytest.raises(ValueError, match="no layer"):
        rectifier_weight_shift(net, (x, None), "block.conv9", 0.1)
    with pytest.raises(ValueError, match="second_moment"):
        rectifier_weight_shift(net, (x, None), "block.conv1", np.ones(4))
    with pytest.raises(ValueError, match="second_moment"):
        rectifier_weight_shift(net, (x, None), "block.conv1", -1.0)
    with pytest.raises(ValueError, match="input_mean"):
        rectifier_weight_shift(net, (x, None), "block.conv1", 0.1, input_mean=np.ones((1, 3)))
    with pytest.raises(ValueError, match="dtype"):
        rectifier_weight_shift(net, (x, None), "block.conv1", 0.1, dtype=torch.float16)
    net.block.bn1 = nn.Identity()
    with pytest.raises(ValueError, match="batch norm"):
        rectifier_weight_shift(net, (x, None), "block.conv1", 0.1)

    class NoRelu(nn.Module):  # conv -> bn -> (no rectifier) -> linear
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(self.bn1(self.conv1(x)).mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="no ReLU"):
        rectifier_weight_shift(NoRelu().double().eval(), (x, None), "conv1", 0.1)


class _Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(10, 30), nn.Linear(30, 30), nn.Linear(30, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_weight_noise_rectifier_shift_matches_its_exact_variances():
    """eq. L29 with 400 probes against the same sum with each unit's first-order variance
    computed exactly (per-sample Jacobians of the ReLU inputs in the weights, torch.func,
    float64), in a network of two rectifiers with every layer perturbed."""
    from torch.func import functional_call, jacrev, jvp

    from distortion.experiments.curvature import weight_noise_rectifier_shift

    torch.manual_seed(4)
    net = _Deep().double().eval()
    x = torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    m2 = {"fc1": 0.01, "fc2": np.linspace(0.005, 0.02, 30), "fc3": 0.02}
    got = weight_noise_rectifier_shift(net, (x, None), m2, n_probes=400, seed=1)
    names = {n: f"{n}.weight" for n in m2}
    p0 = {k: v.detach() for k, v in net.named_parameters()}

    def pre(p, xi):  # the two ReLU inputs of one sample under weights p
        h1 = functional_call(net.fc1, {"weight": p["fc1.weight"], "bias": p0["fc1.bias"]}, xi)
        h2 = functional_call(net.fc2, {"weight": p["fc2.weight"], "bias": p0["fc2.bias"]},
                             torch.relu(h1))  # fmt: skip
        return h1, h2

    ws = {names[n]: p0[names[n]] for n in m2}
    want = []
    for xi in x:
        jac = jacrev(lambda p, xi=xi: pre(p, xi))(ws)  # per ReLU: {weight: d pre / d W}
        s2 = []
        for j in range(2):
            v = 0.0
            for n, m in m2.items():
                g = jac[j][names[n]]  # (units, out, in)
                sig = torch.as_tensor(np.asarray(m), dtype=torch.float64)
                sig = sig.view(1, -1, 1) if sig.ndim else sig
                v = v + (g**2 * sig).sum(dim=(1, 2))
            s2.append(v)
        h1, h2 = pre(ws, xi)
        b1, b2 = relu_bias(h1, s2[0]), relu_bias(h2, s2[1])

        def rest(t1, t2, xi=xi, b1=b1, b2=b2):  # ReLU outputs moved by t1 b1, t2 b2
            a1 = torch.relu(net.fc1(xi)) + t1 * b1
            return net.fc3(torch.relu(net.fc2(a1)) + t2 * b2)

        one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        want.append(jvp(rest, (zero, zero), (one, one))[1].detach().numpy())
    want = np.stack(want)
    assert np.sqrt(np.mean((got - want) ** 2)) < 0.08 * np.sqrt(np.mean(want**2))
    assert np.sqrt(np.mean(want**2)) > 1e-3
    zero = weight_noise_rectifier_shift(net, (x, None), {n: 0.0 for n in m2}, n_probes=2)
    assert np.abs(zero).max() == 0
    with pytest.raises(ValueError, match="n_probes"):
        weight_noise_rectifier_shift(net, (x, None), m2, n_probes=1)
    with pytest.raises(ValueError, match="second moment"):
        weight_noise_rectifier_shift(net, (x, None), {"fc2": np.ones(3)})
    with pytest.raises(ValueError, match="empty"):
        weight_noise_rectifier_shift(net, (x, None), {})
