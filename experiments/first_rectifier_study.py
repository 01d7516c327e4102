"""One layer at a time: how much of the first order's miss is the rectifier right after it?

For a residual block's first convolution (conv -> BN -> ReLU -> conv2 ...), quantized alone
under subtractive dither with its real step (H_U exact), three flip rates are computed for the
same error realizations E on the same images (``theory/multilayer.md`` section 16):

* ``linear`` -- the first order: J (1[a > 0] d), with d = BN-scaled conv(x, E) the exact error
  at the rectifier's input, a the float pre-activation and J the Jacobian of the logits in the
  rectifier's output (the rest of the network linearized at the float point);
* ``rectifier`` -- the same rest linearized, but the rectifier exact: J (relu(a + d) - relu(a));
* ``real`` -- the real network with W + E (level 3N for one layer);
* ``shifted`` -- the first order plus the closed-form mean shift of the rectifier (eq. L27-L28,
  ``distortion.experiments.curvature.rectifier_weight_shift``), the same for every E.

``share`` = (rectifier - linear) / (real - linear) is the part of the linearization's miss that
the one rectifier carries; ``share_shifted`` the part its closed-form mean shift carries.

    python experiments/first_rectifier_study.py --model resnet56 --n 500 --bits 3 \\
        --layers layer1.8.conv1 layer1.4.conv1 --realizations 8

Writes ``first_rectifier.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))


def block_first_convolutions(model) -> list[str]:
    """The ``conv1`` of every residual block (``<block>.conv1`` followed by ``<block>.bn1``)."""
    return [
        f"{name}.conv1"
        for name, m in model.named_modules()
        if name and all(hasattr(m, a) for a in ("conv1", "bn1", "conv2"))
    ]


def first_rectifier_flips(model, x, layer: str, errors, shift=None) -> dict[str, np.ndarray]:
    """Flip rates of ``linear``, ``rectifier`` and ``real`` for each error in ``errors``, and
    of ``shifted`` (``linear`` plus the logit ``shift``, shape (N, K)) when one is given."""
    out: dict[str, list[float]] = {"linear": [], "rectifier": [], "real": []}
    if shift is not None:
        out["shifted"] = []
    for z0, z in logit_perturbations(model, x, layer, errors):
        ref = z0.argmax(1)
        if shift is not None:
            z["shifted"] = z["linear"] + torch_like(shift, z0)
        for key, zk in z.items():
            out[key].append(float((zk.argmax(1) != ref).double().mean()))
    return {k: np.asarray(v) for k, v in out.items()}


def torch_like(a, ref):
    """``a`` as a tensor of ``ref``'s dtype, checked against its shape."""
    import torch

    t = torch.as_tensor(np.asarray(a), dtype=ref.dtype)
    if t.shape != ref.shape:
        raise ValueError(f"shift of shape {tuple(t.shape)} for logits {tuple(ref.shape)}")
    return t


def logit_perturbations(model, x, layer: str, errors):
    """Yield ``(z0, {"linear": z, "rectifier": z, "real": z})``, the float logits and the three
    perturbed logits, for each error in ``errors``.

    Parameters
    ----------
    model : a CIFAR ResNet (eval mode; left unchanged)
    x : tensor (N, 3, H, W)
    layer : str
        A block's first convolution, ``<block>.conv1``.
    errors : sequence of tensors shaped like the layer's weight
    """
    import torch
    import torch.nn.functional as F
    from torch.func import jvp

    from distortion.experiments.models import get_layer

    block_name, _, leaf = layer.rpartition(".")
    block = get_layer(model, block_name) if block_name else None
    if leaf != "conv1" or block is None or not hasattr(block, "bn1"):
        raise ValueError(f"{layer!r} is not a residual block's first convolution (<block>.conv1)")
    conv, bn = block.conv1, block.bn1
    if bn.training or model.training:
        raise ValueError("the model must be in eval mode (batch norm as an affine map)")
    with torch.no_grad():
        store = {}
        hook = conv.register_forward_hook(lambda m, i, o: store.update(x=i[0], y=o))
        try:
            z0 = model(x)
        finally:
            hook.remove()
        a = bn(store["y"])
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
        w = conv.weight.detach().clone()

    def rest_jvp(pert):  # J pert: the logits' derivative along a perturbation of relu1's output
        def f(t):
            h = block.conv2.register_forward_pre_hook(lambda m, i: (i[0] + t * pert,))
            try:
                return model(x)
            finally:
                h.remove()

        one = torch.ones((), dtype=x.dtype)
        with torch.no_grad():  # forward mode only: no graph for backward
            return jvp(f, (torch.zeros((), dtype=x.dtype),), (one,))[1]

    try:
        for e in errors:
            e = torch.as_tensor(e, dtype=w.dtype)
            if e.shape != w.shape:
                raise ValueError(f"error of shape {tuple(e.shape)} for weight {tuple(w.shape)}")
            with torch.no_grad():
                d = F.conv2d(store["x"], e, stride=conv.stride, padding=conv.padding,
                             dilation=conv.dilation, groups=conv.groups) * scale  # fmt: skip
            z = {"linear": z0 + rest_jvp((a > 0).to(a.dtype) * d),
                 "rectifier": z0 + rest_jvp(F.relu(a + d) - F.relu(a))}  # fmt: skip
            with torch.no_grad():
                conv.weight.copy_(w + e)
                z["real"] = model(x)
                conv.weight.copy_(w)
            yield z0, z
    finally:
        with torch.no_grad():
            conv.weight.copy_(w)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--n", type=int, default=500, help="first N test images")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--layers", nargs="*", default=None,
                   help="block first convolutions (default: all of them)")  # fmt: skip
    p.add_argument("--realizations", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=".", help="folder of first_rectifier.csv")
    a = p.parse_args(argv)
    if a.n < 1 or a.realizations < 1:
        p.error("--n and --realizations must be >= 1")

    import pandas as pd
    import torch

    from distortion.experiments import _paths
    from distortion.experiments.curvature import rectifier_weight_shift
    from distortion.experiments.data import load_dataset
    from distortion.experiments.models import get_layer, load_model
    from distortion.quantize import UniformQuantizer

    shared = _paths.shared_dir()
    if shared is None or not (shared / "data" / "cifar10" / "test.npz").is_file():
        raise SystemExit("needs <DISTORTION_DATA>/data/cifar10/test.npz (set DISTORTION_DATA)")
    model = load_model(a.model).eval()
    data = load_dataset(shared / "data" / "cifar10" / "test.npz", n=a.n)
    x = torch.cat([b[0] for b in data.batches(a.n)])
    known = block_first_convolutions(model)
    layers = a.layers or known
    if unknown := [name for name in layers if name not in known]:
        p.error(f"not a block's first convolution of {a.model}: {', '.join(unknown)} "
                f"(these are: {known[0]} ... {known[-1]})")  # fmt: skip
    dq = UniformQuantizer(a.bits, rounding="dither")
    rows = []
    for li, name in enumerate(layers):
        t = time.perf_counter()
        w = get_layer(model, name).weight.detach()
        errors = [
            torch.as_tensor(dq.compress(w, seed=a.seed + 1009 * li + r).values, dtype=w.dtype) - w
            for r in range(a.realizations)
        ]
        m2 = dq.compress(w).error_model.second_moment  # the dither's Delta^2 / 12
        shift = rectifier_weight_shift(model, (x, None), name, m2, dtype=torch.float32)
        f = first_rectifier_flips(model, x, name, errors, shift=shift)
        gap = f["real"].mean() - f["linear"].mean()
        rows.append({
            "model": a.model, "layer": name, "bits": a.bits, "n": a.n, "realizations": len(errors),
            **{k: float(v.mean()) for k, v in f.items()},
            **{f"{k}_sd": float(v.std(ddof=1)) if v.size > 1 else np.nan for k, v in f.items()},
            "share": float((f["rectifier"].mean() - f["linear"].mean()) / gap) if gap else np.nan,
            "share_shifted": float((f["shifted"].mean() - f["linear"].mean()) / gap)
            if gap else np.nan,
            "seconds": time.perf_counter() - t,
        })  # fmt: skip
        print(pd.DataFrame(rows[-1:]).round(4).to_string(index=False, header=li == 0), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "first_rectifier.csv", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
