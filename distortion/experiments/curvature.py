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

__all__ = [
    "rectified_layers",
    "rectifier_weight_shift",
    "relu_bias",
    "relu_curvature_shift",
    "second_order_weight_shift",
    "weight_noise_rectifier_shift",
]

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

                def forward(noisy: bool, x=x) -> torch.Tensor:
                    state["inject"] = noisy
                    try:
                        return net(fwad.make_dual(x, torch.zeros_like(x)))
                    finally:
                        state["inject"] = False

                out.append(_kink_shift(forward, n_probes))
    finally:
        for h in handles:
            h.remove()
    return np.concatenate(out).astype(np.float64)


def _kink_shift(forward: Any, n_probes: int) -> np.ndarray:
    """Eq. A16-A17 for one batch. ``forward(noisy)`` runs the network once inside a
    forward-mode dual level, with a fresh draw of the noise as tangents when ``noisy``."""
    s2: dict[int, torch.Tensor] = {}
    u0: dict[int, torch.Tensor] = {}

    def probe(i, xin, y):
        p, tan = fwad.unpack_dual(xin)
        u0[i] = p
        if tan is not None:
            s2[i] = s2.get(i, 0.0) + tan * tan / n_probes
        return y

    for _ in range(n_probes):  # (eq. A16: s_j^2 by forward-mode probes)
        with fwad.dual_level(), _ReluMode(probe):
            forward(True)
    bias = {i: relu_bias(u0[i], s2[i]) for i in s2}

    def inject(i, xin, y):
        p, tan = fwad.unpack_dual(y)
        b = bias.get(i)
        if b is None:
            return y
        return fwad.make_dual(p, b if tan is None else tan + b)

    with fwad.dual_level(), _ReluMode(inject):  # (eq. A17: one pass)
        z = forward(False)
        tan = fwad.unpack_dual(z).tangent
        return np.zeros(tuple(z.shape)) if tan is None else tan.detach().numpy().copy()


def _weight_scales(net: torch.nn.Module, second_moments: Mapping[str, Any]):
    """The weights of the layers of ``second_moments`` and their error sd, shaped to broadcast
    (one per tensor or per output channel), checked."""
    from distortion.experiments.models import get_layer

    if not second_moments:
        raise ValueError("second_moments is empty: give the error model of at least one layer")
    params, scales = {}, {}
    for name, m2 in second_moments.items():
        try:
            w = get_layer(net, name).weight.detach()
        except (AttributeError, KeyError, ValueError) as exc:
            raise ValueError(f"no layer {name!r} with a weight in the model") from exc
        v = np.asarray(m2, dtype=np.float64)
        if not np.all(np.isfinite(v)) or np.any(v < 0) or v.ndim > 1 or \
                (v.ndim == 1 and v.size != w.shape[0]):  # fmt: skip
            raise ValueError(
                f"second moment of {name!r} must be finite, >= 0, a scalar or one "
                f"per output channel ({w.shape[0]}), got shape {v.shape}"
            )
        sd = torch.as_tensor(np.sqrt(v), dtype=w.dtype)
        params[f"{name}.weight"] = w
        scales[f"{name}.weight"] = sd.reshape((-1,) + (1,) * (w.ndim - 1)) if v.ndim else sd
    return params, scales


def weight_noise_rectifier_shift(
    model: torch.nn.Module,
    data: Any,
    second_moments: Mapping[str, Any],
    *,
    n_probes: int = 16,
    seed: int = 0,
    batch_size: int = 250,
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    r"""The logits' mean shift from every rectifier at once under weight errors (eq. L29).

    Eq. A16-A17 with the weights' noise: ``n_probes`` forward-mode passes push a seeded draw
    of H_U (independent uniform errors of the given second moments in every listed layer)
    through the linearized network; the mean square of the tangent at each ReLU input
    estimates that unit's first-order noise variance :math:`s_j^2(x)`, and one more pass
    injects :math:`b(u_j, s_j)` at every ReLU output. All layers perturbed together, so the
    noise a rectifier sees is that of every layer upstream of it (where
    :func:`rectifier_weight_shift` has one layer, one rectifier and the exact variance).

    Parameters
    ----------
    model : torch.nn.Module
        The float network (evaluated in eval mode on a copy; not modified).
    data : ImageDataset, (x, y), DataLoader or Dataset
    second_moments : dict of layer name to float or array of shape (C,)
        :math:`\sigma^2` per tensor or per output channel of each perturbed layer.
    n_probes : int, default 16
    seed : int
        Seeds the draws (one generator for the whole call).
    batch_size : int
    dtype : torch.float64 or torch.float32

    Returns
    -------
    ndarray of shape (N, K), float64
    """
    import copy

    from torch.func import functional_call

    from distortion.experiments._torch_state import evaluated_on
    from distortion.experiments.sensitivity import _batches

    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 2:
        raise ValueError(f"n_probes must be an integer >= 2, got {n_probes!r}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")
    with evaluated_on(model, "cpu"):
        net = copy.deepcopy(model).to(dtype).eval()
    params, scales = _weight_scales(net, second_moments)
    gen = torch.Generator().manual_seed(int(seed))
    root3 = float(np.sqrt(3.0))
    out = []
    with torch.no_grad():
        for x, _ in _batches(data, batch_size):
            x = x.to(dtype)

            def forward(noisy: bool, x=x) -> torch.Tensor:
                if not noisy:
                    return net(x)
                dual = {}
                for k, w in params.items():  # uniform, unit variance, times sigma (H_U)
                    r = 2 * torch.rand(w.shape, generator=gen, dtype=dtype) - 1
                    dual[k] = fwad.make_dual(w, scales[k] * root3 * r)
                return functional_call(net, dual, (x,))

            out.append(_kink_shift(forward, n_probes))
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
    from distortion.experiments.sensitivity import _batches

    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 2:
        raise ValueError(f"n_probes must be an integer >= 2, got {n_probes!r}")
    with evaluated_on(model, "cpu"):
        net = copy.deepcopy(model).to(torch.float64).eval()
    params, scales = _weight_scales(net, second_moments)
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


def _rectifier_after(net: torch.nn.Module, layer: str) -> tuple[Any, Any]:
    """The convolution ``layer`` and the batch norm that feeds its output to a rectifier.

    The rule is the residual blocks' naming: ``<block>.conv<k>`` is followed by
    ``<block>.bn<k>`` (CIFAR and torchvision ResNets, their first, second and bottleneck
    convolutions, and the stem ``conv1``/``bn1``); the first ReLU called after that batch norm
    is the rectifier (checked at run time: its input must have the batch norm's shape).
    """
    from distortion.experiments.models import get_layer

    prefix, _, leaf = layer.rpartition(".")
    k = leaf[4:] if leaf.startswith("conv") else ""
    try:
        conv = get_layer(net, layer)
    except (AttributeError, KeyError, ValueError) as exc:
        raise ValueError(f"no layer {layer!r} in the model") from exc
    if not isinstance(conv, torch.nn.Conv2d) or not k.isdigit():
        raise ValueError(
            f"{layer!r} is not a convolution named <block>.conv<k>: the rectifier shift needs a "
            "Conv2d whose output goes through <block>.bn<k> into a ReLU"
        )
    try:
        bn = get_layer(net, f"{prefix}.bn{k}" if prefix else f"bn{k}")
    except (AttributeError, KeyError, ValueError):
        bn = None
    if not isinstance(bn, torch.nn.BatchNorm2d) or bn.num_features != conv.out_channels:
        raise ValueError(
            f"{layer!r} is not followed by a batch norm {prefix + '.' if prefix else ''}bn{k} "
            f"of {conv.out_channels} channels: the rectifier shift (theory/multilayer.md eq. "
            "L27) needs conv -> batch norm -> (residual sum) -> ReLU"
        )
    return conv, bn


def rectified_layers(model: torch.nn.Module) -> list[str]:
    """The convolutions of ``model`` that :func:`rectifier_weight_shift` accepts by structure
    (``<block>.conv<k>`` followed by ``<block>.bn<k>``), in module order."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            try:
                _rectifier_after(model, name)
            except ValueError:
                continue
            names.append(name)
    return names


def rectifier_weight_shift(
    model: torch.nn.Module,
    data: Any,
    layer: str,
    second_moment: Any,
    *,
    input_mean: Any = None,
    batch_size: int = 250,
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    r"""The logits' mean shift from the rectifier after one layer under weight errors (eq. L28).

    A zero-mean error :math:`E` of the convolution ``layer`` (independent entries of second
    moment :math:`\sigma_c^2` in output channel c, H_U) moves the pre-activation of the ReLU
    that follows its batch norm by :math:`d = \gamma_c E_c u_p` at unit (c, p), with
    :math:`\gamma_c` the batch norm's scale and :math:`u_p` the input patch: close to
    Gaussian, of variance :math:`v = \gamma_c^2\sigma_c^2\|u_p\|^2` (eq. L27; with bias
    correction the patch is centred, :math:`\|u_p - \bar u\|^2`). The first order passes it
    as :math:`1[a > 0]\,d`; the rectifier's output moves on average by
    :math:`b(a, \sqrt v) \ge 0` more (eq. A16), and the logits by :math:`J\,b`, with J the
    Jacobian of the logits in the rectifier's output at the float point: one forward-mode
    pass with tangent b. Exact per unit (no probes): the variance is known in closed form.

    Parameters
    ----------
    model : torch.nn.Module
        The float network (evaluated in eval mode on a copy in ``dtype``; not modified).
    data : ImageDataset, (x, y), DataLoader or Dataset
        The samples (those of the Grams the shift is added to).
    layer : str
        A convolution ``<block>.conv<k>`` followed by ``<block>.bn<k>`` and a ReLU (with or
        without a residual sum before it).
    second_moment : float or array of shape (C,)
        :math:`\sigma^2` of the layer's error per tensor or per output channel (the error
        model, ``compressor.compress(w).error_model.second_moment``).
    input_mean : array of shape (groups, in_per_group), optional
        The layer's mean input patch when the compressed layer is bias-corrected
        (``InputMeans.mean(layer)``, eq. L22).
    batch_size : int
    dtype : torch.float64 or torch.float32
        Of the pass (float64, the default, is the reference; float32 is about seven times
        faster on a CPU and agrees to within 1e-4 of the largest shift,
        ``tests/test_curvature.py``).

    Returns
    -------
    ndarray of shape (N, K), float64
        The shift, to add to the logits of the first-order prediction
        (``multilayer_distortion(..., shift=)``).
    """
    import copy

    from distortion.experiments._torch_state import evaluated_on
    from distortion.experiments.sensitivity import _batches

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")
    with evaluated_on(model, "cpu"):
        net = copy.deepcopy(model).to(dtype).eval()
    conv, bn = _rectifier_after(net, layer)
    m2 = np.asarray(second_moment, dtype=np.float64)
    if not np.all(np.isfinite(m2)) or np.any(m2 < 0) or m2.ndim > 1 or \
            (m2.ndim == 1 and m2.size != conv.out_channels):  # fmt: skip
        raise ValueError(f"second_moment of {layer!r} must be finite, >= 0, a scalar or one per "
                         f"output channel ({conv.out_channels}), got shape {m2.shape}")  # fmt: skip
    g = conv.groups
    ones = torch.ones_like(conv.weight)
    mean_kernel = None
    if input_mean is not None:
        mu = np.asarray(input_mean, dtype=np.float64)
        shape = (g, conv.in_channels // g, *conv.kernel_size)
        if mu.shape != (g, int(np.prod(shape[1:]))) or not np.all(np.isfinite(mu)):
            raise ValueError(f"input_mean of {layer!r} must be a finite array of shape "
                             f"{(g, int(np.prod(shape[1:])))}, got {mu.shape}")  # fmt: skip
        mean_kernel = torch.as_tensor(mu.reshape(shape), dtype=dtype)
    with torch.no_grad():
        gamma = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        coef = (gamma**2 * torch.as_tensor(m2, dtype=dtype)).reshape(1, -1, 1, 1)

    def conv_like(x: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
        return F.conv2d(x, w, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                        groups=groups)  # fmt: skip

    state: dict[str, Any] = {}

    def on_conv(m, inp, out):
        state["u"] = fwad.unpack_dual(inp[0]).primal

    def on_bn(m, inp, out):
        state["armed"], state["shape"] = True, out.shape

    def inject(i, xin, y):
        if not state.get("armed"):
            return y
        state["armed"] = False
        a = fwad.unpack_dual(xin).primal
        if a.shape != state["shape"]:
            raise ValueError(
                f"the first ReLU after the batch norm of {layer!r} has an input of shape "
                f"{tuple(a.shape)}, not the batch norm's {tuple(state['shape'])}: no rectifier "
                "follows the layer directly"
            )
        u = state["u"]
        energy = conv_like(u * u, ones, g)  # ||u_p||^2 per output channel's group (eq. L27)
        if mean_kernel is not None:  # ||u_p - u_bar||^2 = ||u_p||^2 - 2 u_bar.u_p + ||u_bar||^2
            cross = conv_like(u, mean_kernel, g)
            sq = (mean_kernel**2).sum(dim=(1, 2, 3)).reshape(1, g, 1, 1)
            energy = energy - 2 * cross.repeat_interleave(conv.out_channels // g, dim=1)
            energy = torch.clamp(energy + sq.repeat_interleave(conv.out_channels // g, dim=1), 0)
        state["hit"] = True
        return fwad.make_dual(fwad.unpack_dual(y).primal, relu_bias(a, coef * energy))

    handles = [conv.register_forward_hook(on_conv), bn.register_forward_hook(on_bn)]
    out = []
    try:
        with torch.no_grad():
            for x, _ in _batches(data, batch_size):
                state.clear()
                with fwad.dual_level(), _ReluMode(inject):
                    z = net(x.to(dtype))
                    tangent = fwad.unpack_dual(z).tangent
                if not state.get("hit"):
                    raise ValueError(
                        f"no ReLU is called after the batch norm of {layer!r}: the rectifier "
                        "shift does not apply to this layer"
                    )
                out.append(np.zeros(tuple(z.shape)) if tangent is None
                           else tangent.detach().numpy().copy())  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return np.concatenate(out).astype(np.float64)
