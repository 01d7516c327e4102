r"""Moment propagation at first order: the network smoothed by its own noise
(``theory/multilayer.md`` §17, eqs. L30-L36).

The first-order model of every level linearizes the network at its float point: each ReLU
passes a perturbation through the hard gate :math:`1[u > 0]`. At 2-3 bits the noise at a
rectifier's input is no longer small against the distance :math:`|u|` of many units to the
kink: the mean of the logits moves (eq. A16, L28-L29), and that move, not the variance,
is what the first order misses at 3 bits.

Statistical linearization replaces each ReLU by its expectation under a Gaussian input noise
of the standard deviation :math:`s_j(x)` that the compression error puts there (eq. L30),

.. math:: \tilde r(u; s) = E[\max(u + \varepsilon, 0)] = u\,\Phi(u/s) + s\,\varphi(u/s),
          \qquad \partial_u \tilde r = \Phi(u/s).

The network built of these smoothed units, at the float weights, gives :math:`\tilde z(x)`,
the moment-propagated mean of the logits; :func:`smoothed_shift` returns
:math:`\tilde z - z` (eq. L31), which level 3S adds to the float network's first-order model
(``multilayer_distortion(grams, variances, shift=)``, ``compare_all_layers(...,
smoothed_probes=)``, :meth:`~distortion.estimator.AccuracyLossEstimator.smoothed_shift`).

The :math:`s_j(x)` come from forward-mode probes of the error model (:func:`noise_scales`,
eq. L33): first through the hard network, then - ``iterations`` times - through the smoothed
network of the previous estimate, with the rectified noise's residual (eq. L34) and the
product of a layer's weight error with its input's noise (eq. L35) added to each probe.

Measured and not kept as the default (numbers in §17): the smoothed network's own Grams
(:func:`smoothed_grams`, gates :math:`\Phi`, eq. L32) with the covariance the linearization
does not carry (:func:`fresh_covariance`, eq. L36) under-state the logits' variance.

ReLUs are found by intercepting ``torch.relu`` / ``torch.nn.functional.relu`` calls, so any
network whose rectifiers are ReLUs works. Torch is imported here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwad
from torch.overrides import TorchFunctionMode

from distortion.experiments.curvature import _RELUS, _weight_scales

__all__ = [
    "SmoothedGrams",
    "fresh_covariance",
    "noise_scales",
    "residual_variance",
    "smooth_relu",
    "smoothed_grams",
    "smoothed_shift",
]

_CACHE_VERSION = 1  # bump when the shift's computation changes
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _standardized(u: torch.Tensor, s: torch.Tensor):
    """``(s > 0, s or 1, t = u / s, Phi(t), phi(t))``: the Gaussian terms of eq. L30 and L34."""
    pos = s > 0
    safe = torch.where(pos, s, torch.ones_like(s))
    t = u / safe
    return pos, safe, t, 0.5 * torch.erfc(-t / _SQRT2), torch.exp(-0.5 * t * t) * _INV_SQRT_2PI


def smooth_relu(u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    r""":math:`E[\max(u + \varepsilon, 0)]` for :math:`\varepsilon \sim N(0, s^2)` (eq. L30);
    ``max(u, 0)`` where ``s`` is 0. Differentiable in ``u`` with derivative
    :math:`\Phi(u/s)` (autograd and forward mode). The same mean less ``max(u, 0)``, in a
    form accurate where it is tiny, is :func:`~distortion.experiments.curvature.relu_bias`."""
    pos, safe, _, big_phi, phi = _standardized(u, s)
    return torch.where(pos, u * big_phi + safe * phi, torch.relu(u))


def residual_variance(u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    r""":math:`\operatorname{Var}[\max(u + \varepsilon, 0)] - \Phi(u/s)^2 s^2` for
    :math:`\varepsilon \sim N(0, s^2)` (eq. L34): the part of the rectified noise that the
    smoothed gate does not carry, uncorrelated with the input noise; 0 where ``s`` is 0."""
    pos, safe, t, big_phi, phi = _standardized(u, s)
    mean = t * big_phi + phi  # E[max(t + e, 0)], e ~ N(0, 1)
    second = (t * t + 1.0) * big_phi + t * phi
    v = safe * safe * torch.clamp(second - mean * mean - big_phi * big_phi, min=0.0)
    return torch.where(pos, v, torch.zeros_like(u))


class _SmoothMode(TorchFunctionMode):
    """The i-th ReLU call of a forward pass becomes :func:`smooth_relu` with ``scales[i]``
    (its leading rows: the first samples of the batch the scales were estimated on), and
    ``record(i, input)`` sees its input. With ``residual`` (a generator) a draw of the
    residual noise (eq. L34) is added to each output tangent; ``outputs`` collects (output,
    residual variance) pairs. A batch larger than the scales' is an error, or, not
    ``strict``, goes through hard ReLUs (the layer discovery's passes on repeated inputs)."""

    def __init__(
        self, scales: Mapping[int, torch.Tensor], record: Any = None,
        residual: torch.Generator | None = None, outputs: list | None = None,
        strict: bool = True,
    ):  # fmt: skip
        super().__init__()
        self.scales, self.record, self.i = scales, record, 0
        self.residual, self.outputs, self.strict = residual, outputs, strict

    def restart(self) -> None:
        """The next ReLU call is the first of a forward pass."""
        self.i = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _RELUS:
            return func(*args, **kwargs)
        u = args[0]
        if self.record is not None:
            self.record(self.i, u)
        s = self.scales.get(self.i)
        self.i += 1
        if s is None:
            return torch.relu(u)
        if u.shape[1:] != s.shape[1:] or u.shape[0] > s.shape[0]:
            if not self.strict:  # a pass on other inputs (layer discovery): shapes only
                return torch.relu(u)
            raise ValueError(
                f"ReLU call {self.i - 1} has input shape {tuple(u.shape)}, its noise scales "
                f"{tuple(s.shape)}: the forward pass differs from the one they were estimated on"
            )
        s = s[: u.shape[0]].to(u.dtype)
        out = smooth_relu(u, s)
        if self.outputs is not None:
            self.outputs.append((out, residual_variance(u.detach(), s)))
        if self.residual is not None:  # (eq. L34) an independent draw as extra tangent
            p, tan = fwad.unpack_dual(out)
            if tan is not None:
                v = residual_variance(p, s)
                eta = torch.randn(p.shape, generator=self.residual, dtype=p.dtype)
                out = fwad.make_dual(p, tan + torch.sqrt(v) * eta)
        return out


def noise_scales(
    net: torch.nn.Module,
    x: torch.Tensor,
    second_moments: Mapping[str, Any],
    *,
    n_probes: int = 16,
    iterations: int = 1,
    generator: torch.Generator | None = None,
    residual: bool = True,
    bilinear: bool = True,
    inputs: dict | None = None,
    draws: list | None = None,
) -> tuple[dict[int, torch.Tensor], list[float]]:
    r"""Each ReLU input's noise sd :math:`s_j(x)` under the weights' error model (eq. L33).

    ``n_probes`` forward-mode passes push independent uniform weight errors of the given
    second moments (H_U, every listed layer at once) through the linearized network; the
    root mean square of each ReLU input's tangent is :math:`s_j`. The first estimate
    linearizes the hard network; each of ``iterations`` more linearizes the smoothed network
    of the previous estimate.

    Parameters
    ----------
    net : torch.nn.Module
        In eval mode, in the dtype of ``x`` (not modified).
    x : Tensor
        One batch of inputs.
    second_moments : dict of layer name to float or array of shape (C,)
    n_probes : int, default 16
    iterations : int, default 1
        Smoothed re-estimates after the hard one (0: the hard network's :math:`s_j`).
    generator : torch.Generator, optional

    Returns
    -------
    scales : dict of ReLU call index to Tensor (the shape of that ReLU's input)
    changes : list of float
        Per re-estimate, the rms relative change of :math:`s` over the units (convergence).
    """
    _check_probes(n_probes, iterations)
    params, sds = _weight_scales(net, second_moments)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    from distortion.experiments.models import get_layer

    handles = []
    for name in second_moments:
        mod = get_layer(net, name)
        if bilinear:
            handles.append(mod.register_forward_hook(_bilinear_hook))
        if inputs is not None:

            def on_input(m, args, name=name):
                tan = fwad.unpack_dual(args[0]).tangent
                if tan is not None:
                    inputs[name] = inputs.get(name, 0.0) + tan * tan / n_probes

            handles.append(mod.register_forward_pre_hook(on_input))
    try:
        return _probe_scales(
            net, x, params, sds, n_probes, iterations, gen, residual, inputs, draws
        )
    finally:
        for h in handles:
            h.remove()


def _bilinear_hook(module, args, out):
    r"""Adds the draw's second-order term :math:`\delta W\,\delta a` (eq. L35) to the output
    tangent of a layer whose weight and input both carry one."""
    ta = fwad.unpack_dual(args[0]).tangent
    tw = fwad.unpack_dual(module.weight).tangent
    if ta is None or tw is None:
        return out
    if isinstance(module, torch.nn.Linear):
        extra = torch.nn.functional.linear(ta, tw)
    else:
        extra = module._conv_forward(ta, tw, None)
    p, tan = fwad.unpack_dual(out)
    return fwad.make_dual(p, extra if tan is None else tan + extra)


def _probe_scales(net, x, params, sds, n_probes, iterations, gen, residual, inputs, draws):
    from torch.func import functional_call

    root3 = math.sqrt(3.0)
    scales: dict[int, torch.Tensor] = {}
    changes = []
    for it in range(iterations + 1):
        s2: dict[int, torch.Tensor] = {}
        if inputs is not None:
            inputs.clear()
        if draws is not None:
            draws.clear()

        def record(i, u, s2=s2):
            tan = fwad.unpack_dual(u).tangent
            if tan is not None:
                s2[i] = s2.get(i, 0.0) + tan * tan / n_probes

        with torch.no_grad():
            for _ in range(n_probes):
                mode = _SmoothMode(scales, record, residual=gen if residual else None)
                with fwad.dual_level(), mode:
                    dual = {}
                    for k, w in params.items():  # uniform, unit variance, times sigma (H_U)
                        r = 2 * torch.rand(w.shape, generator=gen, dtype=w.dtype) - 1
                        dual[k] = fwad.make_dual(w, sds[k] * root3 * r)
                    zt = fwad.unpack_dual(functional_call(net, dual, (x,))).tangent
                    if draws is not None and zt is not None:
                        draws.append(zt.detach().clone())
        new = {i: torch.sqrt(v) for i, v in s2.items()}
        if it:
            num = sum(float(torch.sum((new[i] - scales.get(i, 0.0)) ** 2)) for i in new)
            den = sum(float(torch.sum(new[i] ** 2)) for i in new)
            changes.append(math.sqrt(num / den) if den > 0 else 0.0)
        scales = new
    return scales, changes


def fresh_covariance(
    model: torch.nn.Module,
    x: torch.Tensor,
    scales: Mapping[int, torch.Tensor],
    input_variances: Mapping[str, torch.Tensor],
    second_moments: Mapping[str, Any],
) -> np.ndarray:
    r"""The logits' covariance from the noise the smoothed linearization does not carry
    (eq. L36), per sample.

    Two sources, each independent of the weights' first-order error and taken independent
    from unit to unit: at each ReLU the rectified noise's residual variance (eq. L34), and at
    each perturbed layer's output the second-order term :math:`\delta W\,\delta a`, of
    variance :math:`\sigma_c^2 \sum_{\text{patch}} s_{\text{in}}^2` (eq. L35). Each is carried
    to the logits by the smoothed network's gradients (K backward passes).

    Returns
    -------
    ndarray of shape (N, K, K), float64
    """
    from distortion.experiments.models import get_layer

    points: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []
    for name, var_in in input_variances.items():
        mod = get_layer(model, name)
        w = mod.weight
        v = np.asarray(second_moments[name], dtype=np.float64)
        m2 = torch.as_tensor(v, dtype=w.dtype)
        m2 = m2.reshape((-1,) + (1,) * (w.ndim - 1)) if v.ndim else m2
        ones = (m2 * torch.ones_like(w)).detach()
        if isinstance(mod, torch.nn.Linear):
            v_out = torch.nn.functional.linear(var_in.to(w.dtype), ones)
        else:
            v_out = mod._conv_forward(var_in.to(w.dtype), ones, None)

        def on_output(m, args, out, v_out=v_out):
            points.append((out, v_out.detach()))

        handles.append(mod.register_forward_hook(on_output))
    relus: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.enable_grad(), _SmoothMode(scales, outputs=relus):
            z = model(x.detach().clone().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    points = [(o, v) for o, v in points + relus if o.requires_grad and torch.any(v > 0)]
    n, k = z.shape
    cov = torch.zeros((n, k, k), dtype=torch.float64)
    if not points:
        return cov.numpy()
    grads = [
        torch.autograd.grad(z[:, c].sum(), [o for o, _ in points], retain_graph=c < k - 1,
                            allow_unused=True)
        for c in range(k)
    ]  # fmt: skip
    for j, (o, v) in enumerate(points):
        g = torch.stack([
            torch.zeros_like(o) if grads[c][j] is None else grads[c][j] for c in range(k)
        ]).reshape(k, n, -1).to(torch.float64)  # fmt: skip
        cov += torch.einsum("knu,jnu->nkj", g * v.reshape(1, n, -1).to(torch.float64), g)
    return cov.numpy()


@dataclasses.dataclass(frozen=True)
class SmoothedGrams:
    """The smoothed network's Grams with the float network's logits, and the logit shift
    (a candidate measured in ``theory/multilayer.md`` §17, not the default level 3S).

    Attributes
    ----------
    grams : GradientGrams
        Jacobians, Grams and realizations of the smoothed network (eq. L32); ``logits`` are
        the float network's, so that its decisions stay the reference of a flip.
    shift : ndarray of shape (N, K)
        :math:`\\tilde z(x) - z(x)` (eq. L31), for ``multilayer_distortion(..., shift=)``.
    fresh : ndarray of shape (N, K, K)
        The logit covariance the linearization does not carry (eq. L36), for
        ``multilayer_distortion(..., activation_covariance=)``.
    draws : ndarray of shape (N, n_probes, K)
        The last re-estimate's probes of the logit noise (first order, residuals and
        eq. L35 included): their covariance is the probes' own estimate of the variance.
    changes : ndarray of shape (n_chunks, iterations)
        The rms relative change of the noise scales at each re-estimate (eq. L33).
    seconds : float
        Wall time of the whole computation (probes and Grams).
    """

    grams: Any
    shift: np.ndarray
    fresh: np.ndarray
    draws: np.ndarray
    changes: np.ndarray
    seconds: float

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "n_samples": [self.shift.shape[0]],
                "shift_rms": [float(np.sqrt(np.mean(self.shift**2)))],
                "last_change": [float(self.changes[:, -1].max()) if self.changes.size else 0.0],
                "seconds": [self.seconds],
            }
        )


def _check_probes(n_probes: Any, iterations: Any) -> None:
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 2:
        raise ValueError(f"n_probes must be an integer >= 2, got {n_probes!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")


def _check_chunking(chunk: Any, probe_dtype: Any) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    if probe_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"probe_dtype must be torch.float32 or float64, got {probe_dtype!r}")


def _chunks(
    model, data, second_moments, chunk, n_probes, iterations, seed, probe_dtype, extras=True
):
    """Per chunk of images: (the chunk, its inputs, the float logits, the noise scales, the
    perturbed layers' input variances, the probes' logit draws, the scales' changes); the
    variances and draws (for eq. L36 and the probe covariance) are empty without
    ``extras``."""
    import copy

    from distortion.experiments._torch_state import evaluated_on
    from distortion.experiments.sensitivity import _batches, _check_kind

    _check_kind(data)
    with evaluated_on(model, "cpu"):
        net = copy.deepcopy(model).to(probe_dtype).eval()
    gen = torch.Generator().manual_seed(int(seed) * 7 + 17)
    dtype = next(model.parameters()).dtype
    with evaluated_on(model, "cpu"):
        for x, y in _batches(data, chunk):
            x = x.to(dtype)
            part = x if y is None else (x, y)
            try:
                with torch.no_grad():
                    z = model(x).to(torch.float64).numpy()
            except RuntimeError as err:  # a shape the network does not take
                raise ValueError(
                    f"the model does not accept inputs of shape {tuple(x.shape)}: pass the "
                    f"samples it was built for ({err})"
                ) from None
            if not np.all(np.isfinite(z)):
                raise ValueError(
                    "the float network's logits are not finite on these samples: check the "
                    "inputs and the weights for NaN or inf"
                )
            in_var: dict[str, torch.Tensor] = {}
            draws: list[torch.Tensor] = []
            scales, changes = noise_scales(
                net, x.to(probe_dtype), second_moments, n_probes=n_probes,
                iterations=iterations, generator=gen, inputs=in_var if extras else None,
                draws=draws if extras else None,
            )  # fmt: skip
            yield part, x, z, scales, in_var, draws, changes


def smoothed_shift(
    model: torch.nn.Module,
    data: Any,
    second_moments: Mapping[str, Any],
    *,
    n_probes: int = 16,
    iterations: int = 2,
    chunk: int = 50,
    seed: int = 0,
    probe_dtype: torch.dtype = torch.float32,
    cache_dir: Any = None,
    cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    r"""The logits' moment-propagated mean shift under the weights' error model (eq. L31).

    :math:`\tilde z(x) - z(x)`: the network whose ReLUs are :func:`smooth_relu` at the noise
    scales of :func:`noise_scales` (every rectifier's mean move, carried through the
    smoothed units downstream), minus the float network. For
    ``multilayer_distortion(grams, variances, shift=)`` with the float network's Grams
    (level 3L + L31).

    Parameters
    ----------
    model : torch.nn.Module
        The float network (not modified).
    data : ImageDataset, (x, y), DataLoader or Dataset
    second_moments : dict of layer name to float or array of shape (C,)
        The error model of every perturbed layer (``compressor.compress(w).second_moment``).
    n_probes, iterations
        As in :func:`noise_scales`.
    chunk : int
        Images per chunk (their noise scales are held in memory at once).
    seed : int
        Seeds the probes.
    probe_dtype : torch.float32 or torch.float64
    cache_dir : path, optional
        Cache root (default ``$DISTORTION_CACHE`` or ``~/.cache/distortion``); the shift is
        stored under ``smoothed_shift/`` with a key of the weights, the images, the second
        moments and every setting above.
    cache : bool, default True
        Read and write that cache (False: always compute).

    Returns
    -------
    shift : ndarray of shape (N, K)
    changes : ndarray of shape (n_chunks, iterations)
        The rms relative change of the noise scales at each re-estimate (eq. L33).
    """
    from distortion.experiments import _cache, _paths
    from distortion.experiments.sensitivity import _data_info, _model_hash

    _check_chunking(chunk, probe_dtype)
    _check_probes(n_probes, iterations)
    if not isinstance(second_moments, Mapping) or not second_moments:
        raise ValueError(
            "second_moments must be a non-empty dict of layer name to the error's second "
            f"moment (compressor.compress(w).second_moment), got {type(second_moments).__name__}"
        )
    m2 = {str(k): np.asarray(v, dtype=np.float64) for k, v in second_moments.items()}
    key = _cache.content_key({
        "cache": "smoothed-shift", "version": _CACHE_VERSION, "weights": _model_hash(model),
        "data": _data_info(data)[2], "second_moments": m2, "n_probes": n_probes,
        "iterations": iterations, "chunk": chunk, "seed": int(seed), "dtype": str(probe_dtype),
    })  # fmt: skip
    path = _paths.cache_dir(cache_dir) / "smoothed_shift" / f"shift-{key[:24]}.npz"
    if cache:
        found = _cache.load_npz(path, key=key)
        if found is not None:
            return found["shift"], found["changes"]
    shifts, changes = [], []
    for _, x, z, scales, _, _, ch in _chunks(
        model, data, second_moments, chunk, n_probes, iterations, seed, probe_dtype, extras=False
    ):
        with torch.no_grad(), _SmoothMode(scales):
            shifts.append(model(x).to(torch.float64).numpy() - z)
        changes.append(ch)
    shift = np.concatenate(shifts)
    changes = np.asarray(changes, dtype=np.float64).reshape(len(changes), iterations)
    if cache:
        _cache.atomic_savez(path, key=np.array(key), shift=shift, changes=changes)
    return shift, changes


def smoothed_grams(
    model: torch.nn.Module,
    data: Any,
    second_moments: Mapping[str, Any],
    *,
    granularity: str = "tensor",
    n_realizations: int = 40,
    n_probes: int = 16,
    iterations: int = 2,
    chunk: int = 50,
    seed: int = 0,
    probe_dtype: torch.dtype = torch.float32,
) -> SmoothedGrams:
    r"""Level 3L linearized at the noise-smoothed network (eqs. L30–L33).

    Per chunk of ``chunk`` images: the noise scales :math:`s_j(x)` by
    :func:`noise_scales`, then :func:`~distortion.experiments.sensitivity.gradient_grams`
    of the network whose ReLUs are :func:`smooth_relu` at those scales (same layers, seed
    and error realizations as the float network's Grams). Not cached: the result depends on
    the error model, so one call per bit width and granularity.

    Parameters
    ----------
    model : torch.nn.Module
        The float network (not modified).
    data : ImageDataset, (x, y), DataLoader or Dataset
    second_moments : dict of layer name to float or array of shape (C,)
        The error model of every analysed layer (``compressor.compress(w).second_moment``).
    granularity : {"tensor", "channel"}
        As in ``gradient_grams`` ("channel" for per-channel second moments).
    n_realizations, seed
        As in ``gradient_grams`` (the band's realizations); ``seed`` also seeds the probes.
    n_probes, iterations
        As in :func:`noise_scales`.
    chunk : int
        Images per chunk (their scales are held in memory at once).
    probe_dtype : torch.float32 or torch.float64
        Precision of the probes.

    Returns
    -------
    SmoothedGrams
    """
    from distortion.experiments.distributed import merge_grams
    from distortion.experiments.sensitivity import gradient_grams

    _check_chunking(chunk, probe_dtype)
    t0 = time.perf_counter()
    parts, hard, changes, fresh, probe_draws = [], [], [], [], []
    for part, x, z, scales, in_var, zt, ch in _chunks(
        model, data, second_moments, chunk, n_probes, iterations, seed, probe_dtype
    ):
        changes.append(ch)
        hard.append(z)
        probe_draws.append(torch.stack(zt, 1).to(torch.float64).numpy())
        fresh.append(fresh_covariance(model, x, scales, in_var, second_moments))
        mode = _SmoothMode(scales, strict=False)
        # every forward pass of the model (layer discovery, fingerprint, the Grams'
        # batch) starts again at the first ReLU
        reset = model.register_forward_pre_hook(lambda *_, mode=mode: mode.restart())
        try:
            with mode:
                g = gradient_grams(
                    model, part, layers=list(second_moments), granularity=granularity,
                    n_realizations=n_realizations, batch_size=len(part), seed=seed,
                    cache=False, progress=False,
                )  # fmt: skip
        finally:
            reset.remove()
        parts.append(g)
    merged = merge_grams(parts)
    z = np.concatenate(hard)
    shift = merged.logits - z
    merged = dataclasses.replace(merged, logits=z)
    return SmoothedGrams(
        grams=merged, shift=shift, fresh=np.concatenate(fresh),
        draws=np.concatenate(probe_draws), changes=np.asarray(changes, dtype=np.float64).reshape(
            len(changes), iterations), seconds=time.perf_counter() - t0,
    )  # fmt: skip
