"""`experiments/first_rectifier_study.py`: the first order, the first rectifier exact, and the
real network, for one block's first convolution (float64, a small random CIFAR ResNet).

References: the first order against `torch.func.jvp` of the network in the layer's weight; the
rectifier's input error against the real perturbed convolution and batch norm; tiny errors
give the first order back."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _scripts import load_script  # noqa: E402


def _script():
    return load_script("first_rectifier_study")


def _net():
    from distortion.experiments.models import CifarResNet

    torch.manual_seed(0)
    net = CifarResNet(depth=8).double()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=g, dtype=torch.float64))
    x = torch.randn((6, 3, 32, 32), generator=g, dtype=torch.float64)
    return net.eval(), x


def _error(w, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return scale * float(w.abs().max()) * (torch.rand(w.shape, generator=g, dtype=w.dtype) - 0.5)


def test_three_levels_against_references():
    from torch.func import functional_call, jvp

    mod = _script()
    net, x = _net()
    assert mod.block_first_convolutions(net) == ["layer1.0.conv1", "layer2.0.conv1",
                                                 "layer3.0.conv1"]  # fmt: skip
    layer = "layer2.0.conv1"
    w = dict(net.named_parameters())[f"{layer}.weight"].detach().clone()
    big, tiny = _error(w, 0.5, 2), _error(w, 1e-7, 3)
    (z0, zb), (_, zt) = list(mod.logit_perturbations(net, x, layer, [big, tiny]))
    assert torch.equal(dict(net.named_parameters())[f"{layer}.weight"], w)  # left unchanged

    params = {k: v.detach() for k, v in net.named_parameters()}

    def logits(wl):
        return functional_call(net, {**params, f"{layer}.weight": wl}, (x,))

    ref = jvp(logits, (w,), (big,))[1].detach()  # first order in the weight
    assert torch.allclose(zb["linear"] - z0, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    with torch.no_grad():
        real = logits(w + big)
    assert torch.allclose(zb["real"], real, rtol=1e-12, atol=1e-12)

    # the rectifier exact: its output moves by relu(bn1(conv1_{W+E} x)) - relu(bn1(conv1_W x)),
    # taken from the real modules, and the rest is linear in that move
    block = net.layer2[0]
    acts = {}
    h = block.bn1.register_forward_hook(lambda m, i, o: acts.setdefault("a", []).append(o))
    with torch.no_grad():
        logits(w), logits(w + big)
    h.remove()
    move = torch.relu(acts["a"][1]) - torch.relu(acts["a"][0])

    def rest(t):
        hk = block.conv2.register_forward_pre_hook(lambda m, i: (i[0] + t * move,))
        try:
            return net(x)
        finally:
            hk.remove()

    want = jvp(
        rest, (torch.zeros((), dtype=torch.float64),), (torch.ones((), dtype=torch.float64),)
    )[1].detach()
    assert torch.allclose(
        zb["rectifier"] - z0, want, rtol=1e-10, atol=1e-12 * float(want.abs().max())
    )
    # large errors switch units: the exact rectifier is not the first order (the test can fail)
    assert float((zb["rectifier"] - zb["linear"]).abs().max()) > 1e-3 * float(ref.abs().max())
    # tiny errors: all three agree to first order
    dz = zt["linear"] - z0
    for key in ("rectifier", "real"):
        assert float((zt[key] - z0 - dz).abs().max()) < 1e-5 * float(dz.abs().max())

    f = mod.first_rectifier_flips(net, x, layer, [big, tiny])
    assert set(f) == {"linear", "rectifier", "real"} and all(v.shape == (2,) for v in f.values())
    for key, z in zb.items():
        assert f[key][0] == np.mean((z.argmax(1) != z0.argmax(1)).numpy())
    # a logit shift moves the first order only: "shifted" = linear + shift
    shift = np.zeros(tuple(z0.shape))
    shift[:, 0] = 5.0 * float((zb["linear"] - z0).abs().max())  # class 0 wins everywhere
    fs = mod.first_rectifier_flips(net, x, layer, [big], shift=shift)
    assert fs["linear"][0] == f["linear"][0] and fs["real"][0] == f["real"][0]
    assert fs["shifted"][0] == np.mean((z0.argmax(1) != 0).numpy())
    with pytest.raises(ValueError, match="shift of shape"):
        mod.first_rectifier_flips(net, x, layer, [big], shift=shift[:, :3])


def test_bad_input():
    mod = _script()
    net, x = _net()
    w = dict(net.named_parameters())["layer1.0.conv1.weight"].detach()
    with pytest.raises(ValueError, match="first convolution"):
        mod.first_rectifier_flips(net, x, "layer1.0.conv2", [w * 0])
    with pytest.raises(ValueError, match="shape"):
        mod.first_rectifier_flips(net, x, "layer1.0.conv1", [torch.zeros(3, 3)])
    with pytest.raises(SystemExit):
        mod.main(["--realizations", "0"])
    net.train()
    with pytest.raises(ValueError, match="eval mode"):
        mod.first_rectifier_flips(net, x, "layer1.0.conv1", [w * 0])
