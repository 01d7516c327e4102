r"""The second-order mean shift of the logits from the rectifiers (``theory/activations.md`` §10).

The first-order model propagates a noise :math:`\varepsilon` through a ReLU as
:math:`1[u > 0]\,\varepsilon`: zero mean. The ReLU is convex, so with a noise of standard
deviation :math:`s` at its input the output moves on average by (eq. A16)

.. math:: b(u, s) = E[\max(u + \varepsilon, 0)] - \max(u, 0)
          = s\,\bigl(\varphi(u/s) - |u/s|\,\Phi(-|u/s|)\bigr) \;\ge 0

(Gaussian :math:`\varepsilon`), largest where the unit sits near its kink. Every unit moves the
same way, so these small biases add coherently through the rest of the network: the logits
shift by :math:`\bar s(x) = \sum_j g_j(x)\,b_j(x)` (eq. A17), with :math:`g_j` the logit
gradient at unit j's output, a mean shift the first-order model lacks.

:func:`relu_curvature_shift` computes it with forward-mode passes only:

1. ``n_probes`` passes push a seeded draw of the activation error model (eq. A5: uniform
   errors of one step on the entries that are neither zero nor clipped) through the
   linearized network (forward-mode tangents); the mean square of the tangent at each ReLU
   input estimates :math:`s_j^2(x)`;
2. one pass injects :math:`b_j(x)` as the tangent of each ReLU output: its logit tangent is
   :math:`\bar s(x)`.

ReLUs are found by intercepting ``torch.relu`` / ``torch.nn.functional.relu`` (functional or
``nn.ReLU`` modules) with a ``TorchFunctionMode``. Torch is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from distortion.activations import ActivationQParams

__all__ = ["relu_bias", "relu_curvature_shift"]

_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


def relu_bias(u: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    r""":math:`E[\max(u + \varepsilon, 0)] - \max(u, 0)` for
    :math:`\varepsilon \sim N(0, s^2)` (eq. A16); 0 where ``s2`` is 0."""
    s = torch.sqrt(torch.clamp(s2, min=0.0))
    safe = torch.where(s > 0, s, torch.ones_like(s))
    a = torch.abs(u) / safe
    phi = torch.exp(-0.5 * a * a) / np.sqrt(2 * np.pi)
    tail = 0.5 * torch.erfc(a / np.sqrt(2.0))
    return torch.where(s > 0, safe * (phi - a * tail), torch.zeros_like(u))


class _ReluMode(TorchFunctionMode):
    """Calls ``hook(i, x, out)`` at the i-th ReLU call of a forward pass (its output)."""

    def __init__(self, hook):
        super().__init__()
        self.hook, self.i = hook, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            x = args[0]
            out = torch.relu(x)  # never in place: the tangent is read afterwards
            out = self.hook(self.i, x, out)
            self.i += 1
            return out
        return func(*args, **kwargs)


def relu_curvature_shift(
    model: torch.nn.Module,
    data: Any,
    qparams: Mapping[str, ActivationQParams],
    *,
    where: str = "input",
    n_probes: int = 16,
    seed: int = 0,
    batch_size: int = 250,
) -> np.ndarray:
    r"""The logits' second-order mean shift from the ReLUs under quantized activations.

    Parameters
    ----------
    model : torch.nn.Module
        The float network (run in eval mode, on the CPU, float64; not modified).
    data : ImageDataset or (x, y)
        The samples (those of the Grams the shift is added to).
    qparams : dict of point name to ActivationQParams
        The activation grids (the points of
        :func:`~distortion.experiments.activation_grams.activation_grams`).
    where : {"input", "output"}
        The points are layer inputs or module outputs.
    n_probes : int
        Noise draws behind each unit's variance :math:`s_j^2` (eq. A16).
    seed : int
    batch_size : int

    Returns
    -------
    ndarray of shape (N, K)
        :math:`\bar s(x_i)` (eq. A17), to add to the first-order shift.
    """
    import copy

    from distortion.experiments._torch_state import evaluated_on
    from distortion.experiments.activation_grams import _a5_noise, _hooked
    from distortion.experiments.sensitivity import _batches

    if where not in ("input", "output"):
        raise ValueError(f"where must be 'input' or 'output', got {where!r}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 2:
        raise ValueError(f"n_probes must be an integer >= 2, got {n_probes!r}")
    if not qparams:
        raise ValueError("qparams is empty: pass the activation grids")
    gen = torch.Generator().manual_seed(int(seed))
    with evaluated_on(model, "cpu"):
        net = copy.deepcopy(model).to(torch.float64).eval()
    state = {"inject": False}

    def add_noise(t: torch.Tensor, qp: ActivationQParams) -> torch.Tensor:
        if not state["inject"]:
            return t
        p, tan = fwad.unpack_dual(t)
        n = _a5_noise(p, qp, gen)[0]  # the noise part of eq. A5
        return fwad.make_dual(p, n if tan is None else tan + n)

    handles = []
    for name, qp in qparams.items():
        mod = _hooked(net, name, where)
        if where == "input":
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, qp=qp: (add_noise(a[0], qp), *a[1:])))  # fmt: skip
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, qp=qp: add_noise(o, qp)))
    out = []
    try:
        with torch.no_grad():
            for x, _ in _batches(data, batch_size):
                x = x.to(torch.float64)
                s2: dict[int, torch.Tensor] = {}
                u0: dict[int, torch.Tensor] = {}

                def probe(i, xin, y, u0=u0, s2=s2):
                    p, tan = fwad.unpack_dual(xin)
                    u0[i] = p
                    if tan is not None:
                        s2[i] = s2.get(i, 0.0) + tan * tan / n_probes
                    return y

                state["inject"] = True
                for _ in range(n_probes):  # (eq. A16: s_j^2 by forward-mode probes)
                    with fwad.dual_level(), _ReluMode(probe):
                        net(fwad.make_dual(x, torch.zeros_like(x)))
                state["inject"] = False
                bias = {i: relu_bias(u0[i], s2[i]) for i in s2}

                def inject(i, xin, y, bias=bias):
                    p, tan = fwad.unpack_dual(y)
                    b = bias.get(i)
                    if b is None:
                        return y
                    return fwad.make_dual(p, b if tan is None else tan + b)

                with fwad.dual_level(), _ReluMode(inject):  # (eq. A17: one pass)
                    z = net(fwad.make_dual(x, torch.zeros_like(x)))
                    out.append(fwad.unpack_dual(z).tangent.detach().numpy().copy())
    finally:
        for h in handles:
            h.remove()
    return np.concatenate(out).astype(np.float64)
