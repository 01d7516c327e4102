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

:func:`second_order_weight_shift` is the weights' counterpart of a different kind
(``theory/multilayer.md`` §15, eq. L21): the mean shift :math:`\tfrac12\sum_\ell
E[\mathrm{vec}(E_\ell)^\top H_\ell(x)\,\mathrm{vec}(E_\ell)]` from the curvature of the
logits in the weights (products of the errors of successive layers; a ReLU network's kinks
have zero second derivative almost everywhere, so this term does not contain A16), estimated
by Hutchinson probes with forward-over-forward passes.

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

__all__ = ["relu_bias", "relu_curvature_shift", "second_order_weight_shift"]

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


def second_order_weight_shift(
    model: torch.nn.Module,
    data: Any,
    second_moments: Mapping[str, Any],
    *,
    n_probes: int = 8,
    seed: int = 0,
    batch_size: int = 250,
) -> tuple[np.ndarray, np.ndarray]:
    r"""The logits' second-order mean shift under independent weight errors (eq. L21).

    :math:`\mu(x) = \tfrac12 \sum_\ell \sum_c \sigma_{\ell c}^2
    \operatorname{tr} H_{\ell c}(x)`, with :math:`H_{\ell c}` the Hessian of each logit in
    the weights of channel c of layer :math:`\ell`: what a zero-mean error of these second
    moments moves the logits by on average at second order. Estimated as
    :math:`\tfrac12 \overline{\partial_t^2 z(W + t\,\sigma\circ r)}` over ``n_probes``
    Rademacher draws r (Hutchinson: unbiased, and the least-variance probe), each one
    forward-over-forward pass (``torch.func.jvp`` of a ``jvp``) in float64.

    Parameters
    ----------
    model : torch.nn.Module
        The float network (evaluated in eval mode on a float64 copy; not modified).
    data : ImageDataset, (x, y), DataLoader or Dataset
        The samples (those of the Grams the shift is added to).
    second_moments : dict of layer name to float or array of shape (C,)
        :math:`\sigma^2` per tensor or per output channel of each perturbed layer (the
        error model, e.g. ``compressor.compress(w).second_moment``).
    n_probes : int, default 8
        Rademacher draws (>= 2: the standard error needs two).
    seed : int
        Seeds the draws (one generator for the whole call).
    batch_size : int

    Returns
    -------
    shift, stderr : ndarrays of shape (N, K)
        :math:`\mu(x_i)` and the standard error of its estimate (probe to probe).
    """
    import copy

    from torch.func import functional_call, jvp

    from distortion.experiments._torch_state import evaluated_on
    from distortion.experiments.models import get_layer
    from distortion.experiments.sensitivity import _batches

    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 2:
        raise ValueError(f"n_probes must be an integer >= 2, got {n_probes!r}")
    if not second_moments:
        raise ValueError("second_moments is empty: give the error model of at least one layer")
    with evaluated_on(model, "cpu"):
        net = copy.deepcopy(model).to(torch.float64).eval()
    params, scales = {}, {}
    for name, m2 in second_moments.items():
        try:
            w = get_layer(net, name).weight.detach()
        except (AttributeError, KeyError, ValueError) as exc:
            raise ValueError(f"no layer {name!r} with a weight in the model") from exc
        v = np.asarray(m2, dtype=np.float64)
        if not np.all(np.isfinite(v)) or np.any(v < 0) or v.ndim > 1 or \
                (v.ndim == 1 and v.size != w.shape[0]):  # fmt: skip
            raise ValueError(f"second moment of {name!r} must be finite, >= 0, a scalar or one "
                             f"per output channel ({w.shape[0]}), got shape {v.shape}")
        sd = torch.as_tensor(np.sqrt(v), dtype=torch.float64)
        params[f"{name}.weight"] = w
        scales[f"{name}.weight"] = sd.reshape((-1,) + (1,) * (w.ndim - 1)) if v.ndim else sd
    gen = torch.Generator().manual_seed(int(seed))

    def f(p, x):
        return functional_call(net, p, (x,))

    shifts, errs = [], []
    with torch.no_grad():
        for x, _ in _batches(data, batch_size):
            x = x.to(torch.float64)
            draws = []
            for _ in range(n_probes):
                tang = {k: scales[k] * (2.0 * torch.randint(0, 2, w.shape, generator=gen,
                                                            dtype=torch.float64) - 1.0)
                        for k, w in params.items()}  # fmt: skip

                def first(t, tang=tang, x=x):
                    moved = {k: params[k] + t * tang[k] for k in params}
                    return jvp(lambda p: f(p, x), (moved,), (tang,))[1]

                _, d2 = jvp(first, (torch.zeros((), dtype=torch.float64),),
                            (torch.ones((), dtype=torch.float64),))  # fmt: skip
                draws.append(0.5 * d2.numpy())  # (eq. L21)
            d = np.stack(draws)
            shifts.append(d.mean(0))
            errs.append(d.std(0, ddof=1) / np.sqrt(n_probes))
    return np.concatenate(shifts), np.concatenate(errs)
