r"""Activation Grams: how quantized activations move the logits, per sample and per point.

A *point* is a tensor of the forward pass that a deployment rounds to an affine grid: the
input of a convolution or linear layer (``where="input"``, the toolkit's W+A simulation,
:func:`~distortion.experiments.activations.quantize_activations`), or the output of a module
(``where="output"``: the observers of a torch.ao FX model, see :func:`int8_reference`).
For each point :math:`p` and sample :math:`x`, with :math:`g_{k,e} = \partial z_k/\partial t_e`
the gradient of logit :math:`k` at entry :math:`e` of the point's tensor :math:`t` (K backward
passes, no per-sample weight gradient), the grid's error model gives (``theory/activations.md``
eq. A9-A11)

.. math:: C_p(x) = \sum_{e \in I_p(x)} \frac{\Delta_{c(e)}^2}{12}\, g_{\cdot e} g_{\cdot e}^\top,
          \qquad s_p(x) = \sum_{e \in B_p(x)} g_{\cdot e}\,(\operatorname{clip}(t_e) - t_e),

:math:`I_p(x)` the entries that are neither exactly 0 (0 is a level of every grid: no error)
nor beyond the outer levels, :math:`B_p(x)` those beyond (their error is the deterministic
clipping error, propagated to first order as a known shift). Since the grid is fixed by the
calibration, one :class:`ActivationGrams` holds one configuration; several configurations of
the same points share the backward passes (:func:`activation_grams` with several).

:func:`int8_reference` builds, from a float model, what torch.ao's FX post-training static
quantization deploys: the fused float graph with one named point per observer call (the
points whose input is already on their grid, such as an identity shortcut, dropped), their
scales and zero points, the weight quantizer of the backend, and the converted int8 model.

torch is imported inside the functions.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from distortion.activations import ActivationQParams, fake_quantize
from distortion.theory.error_models import uniform_error_variance

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from distortion.quantize import UniformQuantizer

__all__ = [
    "ActivationGrams",
    "Int8Reference",
    "activation_grams",
    "check_disjoint",
    "int8_reference",
    "QuantizedMeasurement",
    "WeightActivationSplit",
    "measure_quantized",
    "weight_activation_split",
]

Where = Literal["input", "output"]
_CACHE_VERSION = 3  # 3: meta['point_sizes']


# ---------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationGrams:
    r"""Per-sample logit covariance and clipping shift of quantized activations.

    Attributes
    ----------
    point_names : tuple of str, length P
        The points, in forward order.
    logits : array of shape (N, K)
        Float logits.
    covariances : array of shape (N, P, K(K+1)/2), float32
        :math:`C_p(x_i)` (eq. A10), upper triangles packed row by row
        (``numpy.triu_indices(K)``).
    shifts : array of shape (N, P, K), float32
        :math:`s_p(x_i)`, the first-order logit shift of the clipped entries (eq. A10).
    labels : array of shape (N,) or None
    actual_shifts : array of shape (N, P, K), float32, or None
        :math:`\sum_e g_{\cdot e}(x_i)\,(Q(t_e) - t_e)`: the actual rounding and clipping
        error of the float network's activations, linearized (level 2 for activations,
        eq. A14).
    zero_share, clipped_share : array of shape (P,)
        Share of the evaluation entries of each point that are exactly 0 (no error) and
        beyond the outer levels (clipped), :math:`\hat\pi_0` and :math:`\hat\pi_c` of eq. A7.
    config : str
        Name of the configuration (e.g. ``"A8 per tensor"``).
    key : str
        Cache key (weights, data, points, grids).
    meta : dict
        Provenance (``where``, timings, backward passes).
    """

    point_names: tuple[str, ...]
    logits: np.ndarray = field(repr=False)  # (N, K)
    covariances: np.ndarray = field(repr=False)  # (N, P, K(K+1)/2)
    shifts: np.ndarray = field(repr=False)  # (N, P, K)
    labels: np.ndarray | None = field(default=None, repr=False)  # (N,)
    actual_shifts: np.ndarray | None = field(default=None, repr=False)  # (N, P, K)
    zero_share: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # (P,)
    clipped_share: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # (P,)
    config: str = ""
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.point_names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"point_names must be non-empty and unique, got {names}")
        z = np.asarray(self.logits, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] < 2:
            raise ValueError(f"logits must have shape (N, K) with K >= 2, got {z.shape}")
        n, k = z.shape
        p = len(names)
        cov = np.asarray(self.covariances, dtype=np.float32)
        if cov.shape != (n, p, k * (k + 1) // 2):
            raise ValueError(
                f"covariances must have shape {(n, p, k * (k + 1) // 2)}, got {cov.shape}"
            )
        sh = np.asarray(self.shifts, dtype=np.float32)
        if sh.shape != (n, p, k):
            raise ValueError(f"shifts must have shape {(n, p, k)}, got {sh.shape}")
        if not (np.all(np.isfinite(cov)) and np.all(np.isfinite(sh))):
            raise ValueError("covariances and shifts must be finite; found NaN or inf")
        if self.actual_shifts is not None:
            a2 = np.asarray(self.actual_shifts, dtype=np.float32)
            if a2.shape != (n, p, k) or not np.all(np.isfinite(a2)):
                raise ValueError(f"actual_shifts must be finite of shape {(n, p, k)}")
            object.__setattr__(self, "actual_shifts", a2)
        for name in ("zero_share", "clipped_share"):
            a = np.asarray(getattr(self, name), dtype=np.float64)
            if a.size == 0:
                a = np.zeros(p)
            if a.shape != (p,):
                raise ValueError(f"{name} must have shape ({p},), got {a.shape}")
            object.__setattr__(self, name, a)
        if self.labels is not None:
            y = np.asarray(self.labels)
            if y.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {y.shape}")
            object.__setattr__(self, "labels", y.astype(np.int64))
        object.__setattr__(self, "point_names", names)
        object.__setattr__(self, "logits", z)
        object.__setattr__(self, "covariances", cov)
        object.__setattr__(self, "shifts", sh)
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def n_samples(self) -> int:
        return self.logits.shape[0]

    @property
    def n_classes(self) -> int:
        return self.logits.shape[1]

    def _points(self, points: Sequence[str] | None) -> np.ndarray:
        if points is None:
            return np.arange(len(self.point_names))
        if isinstance(points, str):
            points = [points]
        idx = []
        for p in points:
            if p not in self.point_names:
                raise ValueError(
                    f"unknown point {p!r}; the points are {', '.join(self.point_names[:5])}"
                    f"{', ...' if len(self.point_names) > 5 else ''}"
                )
            idx.append(self.point_names.index(p))
        return np.asarray(idx, dtype=np.int64)

    def covariance(self, points: Sequence[str] | None = None) -> np.ndarray:
        r""":math:`C_a(x_i) = \sum_p C_p(x_i)` over ``points`` (default all), (N, K, K), eq. A11."""
        if points is None:  # every point: summed once (a prediction from the cache reads it)
            return self._total_covariance.copy()
        return self._unpack(self.covariances[:, self._points(points)])

    def _unpack(self, packed_points: np.ndarray) -> np.ndarray:
        k = self.n_classes
        packed = np.add.reduce(packed_points, axis=1, dtype=np.float64)
        iu = np.triu_indices(k)
        out = np.empty((self.n_samples, k, k))
        out[:, iu[0], iu[1]] = packed
        out[:, iu[1], iu[0]] = packed
        return out

    @cached_property
    def _total_covariance(self) -> np.ndarray:
        return self._unpack(self.covariances)

    @cached_property
    def _total_shift(self) -> np.ndarray:
        return np.add.reduce(self.shifts, axis=1, dtype=np.float64)

    def shift(self, points: Sequence[str] | None = None) -> np.ndarray:
        r""":math:`\sum_p s_p(x_i)` over ``points`` (default all), shape (N, K), eq. A10."""
        if points is None:
            return self._total_shift.copy()
        return np.add.reduce(self.shifts[:, self._points(points)], axis=1, dtype=np.float64)

    def actual_shift(self, points: Sequence[str] | None = None) -> np.ndarray:
        r"""The actual activation error of the float network, linearized (eq. A14), summed
        over ``points`` (default all), shape (N, K): level 2 for activations."""
        if self.actual_shifts is None:
            raise ValueError("these activation Grams hold no actual shifts; recompute them")
        return self.actual_shifts[:, self._points(points)].astype(np.float64).sum(axis=1)

    @property
    def point_sizes(self) -> np.ndarray:
        """Entries of each point per sample, shape (P,) (the size of an activation)."""
        sizes = self.meta.get("point_sizes")
        if sizes is None or len(sizes) != len(self.point_names):
            raise ValueError("these activation Grams do not record their points' sizes: "
                             "recompute them (activation_grams)")  # fmt: skip
        return np.asarray(sizes, dtype=np.float64)

    def mixed(self, choice: Mapping[str, ActivationGrams]) -> ActivationGrams:
        """These Grams with the points named in ``choice`` taken from other Grams of the same
        points and samples (another grid at those points: mixed activation bits)."""
        cov, sh = self.covariances.copy(), self.shifts.copy()
        act = None if self.actual_shifts is None else self.actual_shifts.copy()
        zs, cs = self.zero_share.copy(), self.clipped_share.copy()
        for name, other in choice.items():
            if other.point_names != self.point_names or other.logits.shape != self.logits.shape:
                raise ValueError(f"the Grams chosen for point {name!r} have other points or "
                                 "samples; compute every grid in one activation_grams call")
            i = self._points([name])[0]
            cov[:, i], sh[:, i] = other.covariances[:, i], other.shifts[:, i]
            if act is not None and other.actual_shifts is not None:
                act[:, i] = other.actual_shifts[:, i]
            zs[i], cs[i] = other.zero_share[i], other.clipped_share[i]
        return ActivationGrams(
            point_names=self.point_names, logits=self.logits, covariances=cov, shifts=sh,
            labels=self.labels, actual_shifts=act, zero_share=zs, clipped_share=cs,
            config=f"{self.config} (mixed)", key=f"{self.key}:mixed", meta=self.meta,
        )  # fmt: skip

    def variance_share(self) -> np.ndarray:
        """Share of each point in the total logit noise energy (trace of C_p summed over
        samples), shape (P,)."""
        k = self.n_classes
        diag = [i * k - i * (i - 1) // 2 for i in range(k)]  # packed index of (i, i)
        tr = self.covariances[:, :, diag].astype(np.float64).sum(axis=(0, 2))
        tot = tr.sum()
        return tr / tot if tot > 0 else tr

    def to_frame(self) -> pd.DataFrame:
        """One row per point: zero and clipped shares, share of the noise energy, mean
        norm of the clipping shift."""
        return pd.DataFrame(
            {
                "config": self.config,
                "point": list(self.point_names),
                "zero_share": self.zero_share,
                "clipped_share": self.clipped_share,
                "noise_share": self.variance_share(),
                "shift_norm": np.linalg.norm(self.shifts.astype(np.float64), axis=2).mean(0),
                "n_samples": self.n_samples,
            }
        )


# ---------------------------------------------------------------------------------------
# computation
# ---------------------------------------------------------------------------------------
def _check_configs(configs: Any) -> dict[str, dict[str, ActivationQParams]]:
    from distortion.experiments.activations import ActivationCalibration

    if not isinstance(configs, Mapping) or not configs:
        raise ValueError(
            "configs must be a non-empty dict of configuration name to a dict of point name "
            "to ActivationQParams (or an ActivationCalibration)"
        )
    out: dict[str, dict[str, ActivationQParams]] = {}
    points: tuple[str, ...] | None = None
    for cname, qps in configs.items():
        if isinstance(qps, ActivationCalibration):
            qps = qps.qparams
        if not isinstance(qps, Mapping) or not qps:
            raise ValueError(f"configuration {cname!r} must map point names to ActivationQParams")
        for pname, qp in qps.items():
            if not isinstance(qp, ActivationQParams):
                raise ValueError(
                    f"configuration {cname!r}, point {pname!r}: expected ActivationQParams, got "
                    f"{type(qp).__name__}"
                )
        names = tuple(qps)
        if points is not None and set(names) != set(points):
            raise ValueError(
                "every configuration must quantize the same points; "
                f"{cname!r} differs from the first"
            )
        points = names if points is None else points
        out[str(cname)] = dict(qps)
    return out


def _hooked(model: nn.Module, name: str, where: str) -> nn.Module:
    """The module of a point: a convolution or linear layer for ``where="input"``, any
    submodule for ``"output"``; a clear ValueError otherwise."""
    from distortion.experiments.activations import _named_layer

    if where == "input":
        return _named_layer(model, name)
    try:
        return model.get_submodule(name)
    except (AttributeError, ValueError) as exc:
        raise ValueError(
            f"the model has no submodule {name!r} whose output could be hooked ({exc})"
        ) from None


def _qp_payload(qp: ActivationQParams) -> list:
    return [
        qp.scale.tolist(), qp.zero_point.tolist(), qp.qmin, qp.qmax, qp.granularity,
        qp.channel_axis,
    ]  # fmt: skip


def _key(model: nn.Module, data_fp: str, where: str, configs: dict, outputs: str) -> str:
    from distortion.experiments import _cache
    from distortion.experiments.sensitivity import _model_hash

    payload = {
        "cache": "activation-grams",
        "version": _CACHE_VERSION,
        "weights": _model_hash(model),
        "outputs": outputs,
        "data": data_fp,
        "where": where,
        "configs": {c: {p: _qp_payload(q) for p, q in qps.items()} for c, qps in configs.items()},
        "dtype": str(next(model.parameters()).dtype),
    }
    return _cache.content_key(payload)


def _entry_terms(t: Any, g: Any, qp: ActivationQParams, dtype: Any):
    """Weighted Gram (B, K, K), clipping shift (B, K), zero and clipped counts of one point.

    ``t`` (B, ...) the float tensor at the point, ``g`` (B, K, ...) the logit gradients."""
    import torch

    b, k = g.shape[:2]
    lo = torch.as_tensor(qp.lo, dtype=t.dtype, device=t.device)
    hi = torch.as_tensor(qp.hi, dtype=t.dtype, device=t.device)
    var = torch.as_tensor(
        uniform_error_variance(qp.scale), dtype=t.dtype, device=t.device
    )  # Delta^2/12 (eq. E1)
    if qp.granularity == "channel":
        shape = [1] * t.ndim
        shape[qp.channel_axis] = -1
        lo, hi, var = lo.reshape(shape), hi.reshape(shape), var.reshape(shape)
    clipped = (t < lo) | (t > hi)  # B of eq. A4
    inside = (t != 0) & ~clipped  # I of eq. A4
    w = (inside.to(t.dtype) * var).reshape(b, 1, -1)
    gf = g.reshape(b, k, -1).to(dtype)
    gram = torch.bmm(gf * w.to(dtype), gf.transpose(1, 2))  # (eq. A10)
    err = (torch.clamp(t, lo, hi) - t).reshape(b, -1, 1).to(dtype)
    shift = torch.bmm(gf, err).squeeze(2)  # (eq. A10)
    actual = (fake_quantize(t, qp) - t).reshape(b, -1, 1).to(dtype)
    level2 = torch.bmm(gf, actual).squeeze(2)  # the actual error, linearized (eq. A14)
    return gram, shift, level2, int((t == 0).sum()), int(clipped.sum()), t.numel()


def activation_grams(
    model: nn.Module,
    data: Any,
    configs: Mapping[str, Any],
    *,
    where: Where = "input",
    batch_size: int | None = None,
    device: str = "cpu",
    cache: bool = True,
    cache_dir: Any = None,
    memory_mb: int = 512,
    progress: bool = True,
) -> dict[str, ActivationGrams]:
    r"""Activation Grams of one or several grid configurations of the same points.

    Parameters
    ----------
    model : torch.nn.Module
        The float network (run in eval mode, left as it was).
    data : ImageDataset, DataLoader, Dataset, (x, y) or tensor
        The evaluation samples (as :func:`~distortion.experiments.sensitivity.gradient_grams`;
        pass the same samples in the same order to combine with weight Grams).
    configs : dict of str to (dict of str to ActivationQParams, or ActivationCalibration)
        Each configuration maps every point (a module name) to its grid; all configurations
        quantize the same points.
    where : {"input", "output"}
        The point is the first input of the named module (a layer's input, as
        :func:`~distortion.experiments.activations.quantize_activations`) or its output
        (the observer points of :func:`int8_reference`).
    batch_size : int, optional
        Default from ``memory_mb`` (K gradients of every point's tensor per sample).
    device, cache, cache_dir, progress
        As :func:`~distortion.experiments.sensitivity.gradient_grams`.

    Returns
    -------
    dict of str to ActivationGrams
        One per configuration, in the order given.

    Notes
    -----
    K backward passes per batch give :math:`g_{k,e}` at every point at once; the
    per-configuration work is a masked Gram per point (eq. A10). A module called several
    times per forward pass is one point per call, named ``name``, ``name#1``, ...
    """
    import torch
    from tqdm.auto import tqdm

    from distortion.experiments import _cache, _paths
    from distortion.experiments._torch_state import evaluated_on
    from distortion.experiments.sensitivity import _batches, _data_info, _output_fingerprint

    if where not in ("input", "output"):
        raise ValueError(f"where must be 'input' or 'output', got {where!r}")
    cfgs = _check_configs(configs)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    points = list(next(iter(cfgs.values())))
    modules = {p: _hooked(model, p, where) for p in points}  # clear error for a bad name
    n_total, labels, data_fp = _data_info(data)
    if n_total == 0:
        raise ValueError("data holds no samples")
    with evaluated_on(model, device) as dev:
        first_x, _ = next(iter(_batches(data, 2)))
        outputs = _output_fingerprint(model, first_x, dev)
        key = _key(model, data_fp, where, cfgs, outputs)
        path = _paths.cache_dir(cache_dir) / "activation_grams" / f"agrams-{key[:24]}.npz"
        if cache:
            got = _cache.load_cached(path, _load, key=key, key_of=lambda d: d["key"])
            if got is not None:
                return _unpack(got, labels)
        res = _compute(
            model, data, cfgs, points, modules, where, batch_size, dev, memory_mb, progress,
            n_total, tqdm, torch, _batches,
        )  # fmt: skip
    res["key"] = key
    if cache:
        try:
            _save(res, path)
        except OSError as exc:
            import warnings

            warnings.warn(
                f"could not write the activation-gram cache {str(path)!r}: {exc}",
                _cache.CacheWarning,
                stacklevel=2,
            )
    return _unpack(res, labels)


def _compute(
    model, data, cfgs, points, modules, where, batch_size, dev, memory_mb, progress,
    n_total, tqdm, torch, batches,
) -> dict[str, Any]:  # fmt: skip
    dtype = next(model.parameters()).dtype
    captured: list[tuple[str, Any]] = []

    def grab(name: str, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(
                f"the {where} of {name!r} is not a floating-point tensor; it cannot be "
                "quantized as an activation"
            )
        t2 = t.clone() if t.requires_grad else t.detach().clone().requires_grad_(True)
        calls = sum(1 for n, _ in captured if n.split("#")[0] == name)
        captured.append((name if calls == 0 else f"{name}#{calls}", t2))
        return t2

    def pre_hook(name):
        def hook(module, args):
            if not args:
                raise ValueError(f"layer {name!r} takes no positional input to quantize")
            return (grab(name, args[0]), *args[1:])

        return hook

    def post_hook(name):
        def hook(module, args, output):
            return grab(name, output)

        return hook

    handles = []
    for p, m in modules.items():
        if where == "input":
            handles.append(m.register_forward_pre_hook(pre_hook(p)))
        else:
            handles.append(m.register_forward_hook(post_hook(p)))
    t0 = time.perf_counter()
    out_z, out_cov, out_shift = [], {c: [] for c in cfgs}, {c: [] for c in cfgs}
    out_actual: dict[str, list] = {c: [] for c in cfgs}
    zeros = {c: 0.0 for c in cfgs}
    clipped = {c: 0.0 for c in cfgs}
    counts: Any = 0.0
    names: list[str] | None = None
    k = 0
    try:
        if batch_size is None:  # K gradients of every point's tensor per sample, float32
            captured.clear()
            x1 = next(iter(batches(data, 1)))[0]
            x1 = x1.to(device=dev, dtype=dtype) if x1.is_floating_point() else x1.to(dev)
            with torch.no_grad():
                k1 = int(model(x1).shape[1])
            per = 4.0 * k1 * sum(t.numel() for _, t in captured) * 3.0
            batch_size = int(max(1, min(256, memory_mb * 2**20 // max(per, 1.0))))
        bar = tqdm(total=n_total, desc="activation grams", disable=None if progress else True,
                   leave=False)  # fmt: skip
        for x, _ in batches(data, batch_size):
            captured.clear()
            x = x.to(device=dev, dtype=dtype) if x.is_floating_point() else x.to(dev)
            with torch.enable_grad():
                z = model(x)
                if not isinstance(z, torch.Tensor) or z.ndim != 2:
                    raise ValueError("the model must return logits of shape (B, K)")
                k = int(z.shape[1])
                these = [n for n, _ in captured]
                if names is None:
                    names = these
                    base = {n.split("#")[0] for n in names}
                    missing = [p for p in points if p not in base]
                    if missing:
                        raise ValueError(
                            f"point(s) {', '.join(map(repr, missing))} are never called in the "
                            "forward pass; choose modules the model uses"
                        )
                elif these != names:
                    raise ValueError("the points are called in a different order per batch")
                tens = [t for _, t in captured]
                grads: list[list[Any]] = [[] for _ in tens]
                for c in range(k):  # K backward passes give g at every point (eq. A9)
                    gs = torch.autograd.grad(
                        z[:, c].sum(), tens, retain_graph=c < k - 1, allow_unused=True
                    )
                    for i, g in enumerate(gs):
                        grads[i].append(torch.zeros_like(tens[i]) if g is None else g.detach())
            b = x.shape[0]
            iu = torch.triu_indices(k, k)
            gstack = [torch.stack(gl, dim=1) for gl in grads]  # (B, K, ...)
            del grads
            counts = counts + np.array([t.numel() for t in tens], dtype=np.float64)
            for cname, qps in cfgs.items():
                cov = torch.empty((b, len(names), k * (k + 1) // 2), dtype=torch.float32)
                shf = torch.empty((b, len(names), k), dtype=torch.float32)
                act = torch.empty((b, len(names), k), dtype=torch.float32)
                zc = np.zeros(len(names))
                cc = np.zeros(len(names))
                for i, (pname, t) in enumerate(captured):
                    gram, sh, l2, nz, ncl, _ = _entry_terms(
                        t.detach(), gstack[i], qps[pname.split("#")[0]], torch.float64
                    )
                    cov[:, i] = gram[:, iu[0], iu[1]].to(torch.float32).cpu()
                    shf[:, i] = sh.to(torch.float32).cpu()
                    act[:, i] = l2.to(torch.float32).cpu()
                    zc[i], cc[i] = nz, ncl
                out_cov[cname].append(cov.numpy())
                out_shift[cname].append(shf.numpy())
                out_actual[cname].append(act.numpy())
                zeros[cname] = zeros[cname] + zc
                clipped[cname] = clipped[cname] + cc
            out_z.append(z.detach().to(torch.float64).cpu().numpy())
            del gstack, tens
            captured.clear()
            bar.update(b)
        bar.close()
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    tot = np.maximum(counts, 1)
    return {
        "points": list(names),
        "logits": np.concatenate(out_z),
        "configs": {
            c: {
                "covariances": np.concatenate(out_cov[c]),
                "shifts": np.concatenate(out_shift[c]),
                "actual_shifts": np.concatenate(out_actual[c]),
                "zero_share": zeros[c] / tot,
                "clipped_share": clipped[c] / tot,
            }
            for c in cfgs
        },
        "meta": {
            "where": where,
            "seconds": time.perf_counter() - t0,
            "backward_passes": int(k),
            "batch_size": int(batch_size),
            "point_sizes": (np.asarray(counts) / max(sum(len(a) for a in out_z), 1)).tolist(),
        },
    }


# ---------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------
_ARRAYS = ("covariances", "shifts", "actual_shifts", "zero_share", "clipped_share")


def _save(res: dict[str, Any], path: Any) -> None:
    import json

    from distortion.experiments import _cache

    arrays = {"logits": res["logits"]}
    header = {"key": res["key"], "points": res["points"], "meta": res["meta"], "configs": []}
    for i, (c, d) in enumerate(res["configs"].items()):
        header["configs"].append(c)
        for name, a in d.items():
            arrays[f"c{i}_{name}"] = np.asarray(a)
    arrays["header"] = np.array(json.dumps(_cache.jsonable(header)))
    _cache.atomic_savez(path, **arrays)


def _load(path: Any) -> dict[str, Any]:
    import json

    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        configs = {
            c: {n: z[f"c{i}_{n}"] for n in _ARRAYS}
            for i, c in enumerate(header["configs"])
        }
        return {
            "key": header["key"], "points": header["points"], "meta": header["meta"],
            "logits": z["logits"], "configs": configs,
        }  # fmt: skip


def _unpack(res: dict[str, Any], labels: np.ndarray | None) -> dict[str, ActivationGrams]:
    return {
        c: ActivationGrams(
            point_names=tuple(res["points"]), logits=res["logits"],
            covariances=d["covariances"], shifts=d["shifts"], labels=labels,
            actual_shifts=d["actual_shifts"],
            zero_share=d["zero_share"], clipped_share=d["clipped_share"], config=c,
            key=f"{res['key']}:{c}", meta=dict(res["meta"]),
        )  # fmt: skip
        for c, d in res["configs"].items()
    }


# ---------------------------------------------------------------------------------------
# the real int8 model of torch.ao (FX) and its points
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Reference:
    r"""What torch.ao FX post-training static quantization deploys, seen from the float side.

    Attributes
    ----------
    backend : str
    fused : torch.fx.GraphModule
        The float model after fusion (batch norm folded into the convolutions, as the int8
        model computes), with one identity module ``point_<i>`` per observer call: the
        points (``where="output"``) of :func:`activation_grams`. Its layers are the ones
        whose fused weights the int8 model quantizes.
    qparams : dict of str to ActivationQParams
        The grid of every point that rounds (the observers' own scales and zero points).
    exact_points : tuple of str
        Points whose input is already on their grid (identity shortcuts, zero padding of a
        quantized tensor): they add no error and are left out of ``qparams``.
    weight_quantizer : UniformQuantizer
        The backend's weight grid (x86/fbgemm: 8 bits per channel, [-128, 127],
        max/127.5; qnnpack: per tensor).
    layers : tuple of str
        The convolutions and linear layers of ``fused`` whose weights are quantized.
    int8 : torch.fx.GraphModule
        The converted int8 model (float32 in and out, CPU).
    n_calibration : int
    sources : dict of str to str
        What each point rounds: the producing module (``"layer1.0.conv2"``, a fused
        conv-BN), function (``"add"``, ``"relu"``, ``"adaptive_avg_pool2d"``) or ``"input"``.
    """

    backend: str
    fused: Any = field(repr=False)
    qparams: dict[str, ActivationQParams] = field(repr=False)
    exact_points: tuple[str, ...]
    weight_quantizer: Any
    layers: tuple[str, ...]
    int8: Any = field(repr=False)
    n_calibration: int = 0
    sources: dict[str, str] = field(default_factory=dict, repr=False)

    def to_frame(self) -> pd.DataFrame:
        rows = [
            {"point": p, "source": self.sources.get(p, ""), "scale": float(q.scale),
             "zero_point": int(q.zero_point), "qmin": q.qmin, "qmax": q.qmax,
             "exact": False}  # fmt: skip
            for p, q in self.qparams.items()
        ]
        rows += [
            {"point": p, "source": self.sources.get(p, ""), "exact": True}
            for p in self.exact_points
        ]
        return pd.DataFrame(rows)


def _point_module():
    from torch import nn

    class Point(nn.Module):
        """Identity: a quantization point of an int8 model (see :class:`Int8Reference`)."""

        def forward(self, x):
            return x

    return Point()


def _observer_qparams(obs: Any) -> ActivationQParams:
    import torch

    scale, zp = obs.calculate_qparams()
    per_channel = scale.numel() > 1 or obs.qscheme in (
        torch.per_channel_affine, torch.per_channel_symmetric,
    )  # fmt: skip
    return ActivationQParams(
        scale=scale.double().numpy() if per_channel else np.float64(scale.item()),
        zero_point=zp.numpy().astype(np.int64) if per_channel else np.int64(zp.item()),
        qmin=int(obs.quant_min), qmax=int(obs.quant_max),
        granularity="channel" if per_channel else "tensor",
        channel_axis=int(getattr(obs, "ch_axis", 1)) if per_channel else 1,
    )  # fmt: skip


def int8_reference(
    model: nn.Module,
    calibration_data: Any,
    backend: str = "x86",
    *,
    batch_size: int = 256,
) -> Int8Reference:
    r"""The real int8 model of ``backend`` and, on the float side, its quantization points.

    ``prepare_fx`` with the backend's default qconfig mapping, calibration on every image of
    ``calibration_data`` (the observers' statistics), then: the observers' scales and zero
    points are read, every observer call of the graph becomes an identity ``point_<i>`` of a
    float copy (so the points are the tensors the int8 model rounds: the image, every
    fused conv-BN(-ReLU) output, every residual sum after its ReLU, the pooled features, the
    logits), and ``convert_fx`` gives the int8 model. A point whose input is already on its
    grid (checked on the calibration images with the toolkit's bit-exact fake quantization)
    is kept as an exact point (no error).

    Parameters
    ----------
    model : torch.nn.Module
        Float model (not modified).
    calibration_data : torch.Tensor, (x, y) pair or dataset
    backend : {"x86", "fbgemm", "qnnpack", "onednn"}
        Must be a quantized engine of this machine's torch.
    batch_size : int

    Returns
    -------
    Int8Reference
    """
    import torch
    from torch.ao.quantization.quantize_fx import convert_fx

    from distortion.experiments.activations import _batch, _n_items, prepare_calibrated
    from distortion.quantize import UniformQuantizer

    prepared = prepare_calibrated(model, calibration_data, backend, (), batch_size)
    n = _n_items(calibration_data)
    fused = copy.deepcopy(prepared)
    qparams: dict[str, ActivationQParams] = {}
    sources: dict[str, str] = {}
    order: list[str] = []
    for node in list(fused.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("activation_post_process"):
            obs = fused.get_submodule(node.target)
            name = f"point_{len(order)}"
            qparams[name] = _observer_qparams(obs)
            src = node.args[0] if node.args else None
            sources[name] = str(getattr(src, "target", src)) if src is not None else ""
            if getattr(src, "op", "") in ("call_function", "call_method"):
                sources[name] = getattr(src.target, "__name__", str(src.target))
            if getattr(src, "op", "") == "placeholder":
                sources[name] = "input"
            fused.add_submodule(name, _point_module())
            node.target = name
            order.append(name)
    fused.graph.eliminate_dead_code()
    fused.recompile()
    fused.delete_all_unused_submodules()
    fused.eval()
    # points whose input already lies on their grid add nothing (eq. A4: no entry in I or B)
    on_grid = dict.fromkeys(order, True)

    def check(name):
        def hook(module, args, output):
            q = fake_quantize(output, qparams[name])
            on_grid[name] = on_grid[name] and bool(torch.equal(q, output))
            return q

        return hook

    hs = [fused.get_submodule(p).register_forward_hook(check(p)) for p in order]
    try:
        with torch.inference_mode():
            fused(_batch(calibration_data, np.arange(min(n, batch_size))).to(torch.float32))
    finally:
        for h in hs:
            h.remove()
    exact = tuple(p for p in order if on_grid[p])
    for p in exact:
        del qparams[p]
    per_tensor = backend == "qnnpack"
    wq = UniformQuantizer(
        8, granularity="tensor" if per_tensor else "channel", symmetric_range="full"
    )
    layers = tuple(
        name for name, m in fused.named_modules()
        if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d | torch.nn.Linear)
    )  # fmt: skip
    int8 = convert_fx(prepared)
    return Int8Reference(
        backend=backend, fused=fused, qparams=qparams, exact_points=exact,
        weight_quantizer=wq, layers=layers, int8=int8, n_calibration=n, sources=sources,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedMeasurement:
    r"""Flips and accuracy loss of a quantized model (weights and/or activations) on paired
    images, against the float model.

    Attributes
    ----------
    config : str
    n_samples, flips : int
    flip_rate : float
    flip_ci : tuple of float
        Clopper–Pearson interval of the flip rate (for these images).
    accuracy_float, accuracy_quantized, accuracy_loss : float
    loss_ci : tuple of float
        Exact paired (McNemar) interval of the accuracy loss.
    """

    config: str
    n_samples: int
    flips: int
    flip_rate: float
    flip_ci: tuple[float, float]
    accuracy_float: float
    accuracy_quantized: float
    accuracy_loss: float
    loss_ci: tuple[float, float]

    def to_frame(self) -> pd.DataFrame:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["flip_low"], d["flip_high"] = d.pop("flip_ci")
        d["loss_low"], d["loss_high"] = d.pop("loss_ci")
        return pd.DataFrame([d])


def _summary(config: str, zf: np.ndarray, zq: np.ndarray, labels: np.ndarray, c: float):
    from distortion.experiments.measure import binomial_interval, paired_accuracy_loss

    pf, pq = zf.argmax(1), zq.argmax(1)
    n = len(pf)
    flips = int(np.sum(pf != pq))
    ci = binomial_interval(flips, n, confidence_level=c)
    pl = paired_accuracy_loss(pf == labels, pq == labels, confidence_level=c)
    lci = pl.confidence_interval(confidence_level=c)
    return QuantizedMeasurement(
        config=config, n_samples=n, flips=flips, flip_rate=flips / n,
        flip_ci=(float(ci.low), float(ci.high)),
        accuracy_float=float(np.mean(pf == labels)),
        accuracy_quantized=float(np.mean(pq == labels)),
        accuracy_loss=float(pl.accuracy_loss), loss_ci=(float(lci.low), float(lci.high)),
    )  # fmt: skip


def measure_quantized(
    model: nn.Module,
    data: Any,
    *,
    weights: UniformQuantizer | None = None,
    layers: str | Sequence[str] = "all",
    activations: Mapping[str, ActivationQParams] | None = None,
    where: Where = "input",
    int8_model: Any = None,
    config: str = "",
    batch_size: int = 250,
    confidence_level: float = 0.95,
    progress: bool = True,
    activation_error: Literal["round", "dither"] = "round",
    seed: int = 0,
) -> QuantizedMeasurement:
    r"""Measure a model with quantized weights, activations or both, or a real int8 model.

    Parameters
    ----------
    model : torch.nn.Module
        The float model (not modified); its logits are the reference.
    data : ImageDataset, DataLoader, Dataset or (x, y)
        Labelled evaluation samples.
    weights : UniformQuantizer, optional
        Quantize the weights of ``layers`` (a copy of the model).
    activations : dict of point name to ActivationQParams, optional
        Fake-quantize these points (``where="input"``: layer inputs; ``"output"``: module
        outputs, e.g. :attr:`Int8Reference.qparams` on :attr:`Int8Reference.fused`).
    int8_model : torch.nn.Module, optional
        A real quantized model run instead (``weights`` and ``activations`` must be None).
    config : str
        Label of the result.
    activation_error : {"round", "dither"}
        ``"round"``: the activations are rounded (the deployment). ``"dither"``: the error
        model of eq. A5 itself run through the real, nonlinear network (level 3N for the
        activations): exact zeros stay, entries beyond the outer levels are clipped, every
        other entry gets a fresh :math:`U(-\Delta/2, \Delta/2)` error (seeded by ``seed``).
        Against the measurement it tests the error model; against the first-order
        prediction, the linearization.
    seed : int
        Seed of the dither.

    Returns
    -------
    QuantizedMeasurement
    """
    import torch

    from distortion.experiments.measure import _level, quantize_model
    from distortion.experiments.sensitivity import _batches, _data_info

    c = _level(confidence_level, None)
    if where not in ("input", "output"):
        raise ValueError(f"where must be 'input' or 'output', got {where!r}")
    if int8_model is not None and (weights is not None or activations is not None):
        raise ValueError("pass either int8_model, or weights and/or activations, not both")
    _, labels, _ = _data_info(data, fingerprint=False)
    if labels is None:
        raise ValueError("measure_quantized needs labels: pass (x, y) or a labelled dataset")

    def run(m: Any) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for x, _ in _batches(data, batch_size):
                out.append(m(x.to(torch.float32)).to(torch.float64).numpy())
        return np.concatenate(out)

    from distortion.experiments._torch_state import evaluated_on

    # the caller's model goes back to its modes (and devices) afterwards
    with evaluated_on(model, "cpu"):
        zf = run(model)
        if int8_model is not None:
            return _summary(config or "int8", zf, run(int8_model), labels, c)
        qmodel = model
        if weights is not None:
            x0, _ = next(iter(_batches(data, 1)))
            qmodel, _ = quantize_model(model, weights, layers, input_shape=(1, *x0.shape[1:]))
            qmodel.eval()
        handles = []
        if activation_error not in ("round", "dither"):
            raise ValueError(f"activation_error must be 'round' or 'dither', got "
                             f"{activation_error!r}")  # fmt: skip
        gen = torch.Generator().manual_seed(int(seed))

        def err(t: Any, qp: ActivationQParams) -> Any:
            if activation_error == "round":
                return fake_quantize(t, qp)
            return _dithered(t, qp, gen)

        if activations:
            for name, qp in activations.items():
                mod = _hooked(qmodel, name, where)
                if where == "input":
                    handles.append(mod.register_forward_pre_hook(
                        lambda m, a, qp=qp: (err(a[0], qp), *a[1:])
                    ))  # fmt: skip
                else:
                    handles.append(mod.register_forward_hook(lambda m, a, o, qp=qp: err(o, qp)))
        try:
            zq = run(qmodel)
        finally:
            for h in handles:
                h.remove()
        return _summary(config, zf, zq, labels, c)


def _a5_noise(t: Any, qp: ActivationQParams, gen: Any) -> tuple[Any, Any, Any]:
    """One draw of the noise part of eq. A5 on ``t``: a fresh U(-step/2, step/2) on the
    entries that are neither exact zeros nor beyond the outer levels, 0 elsewhere; with the
    outer levels (broadcast like ``t``)."""
    import torch

    shape = [1] * t.dim()
    if qp.granularity == "channel":
        shape[qp.channel_axis] = -1

    def as_t(a: Any) -> Any:
        return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=t.dtype).reshape(shape)

    lo, hi, step = as_t(qp.lo), as_t(qp.hi), as_t(qp.step)
    inside = (t > lo) & (t < hi) & (t != 0)
    u = torch.rand(t.shape, generator=gen, dtype=t.dtype) - 0.5
    return torch.where(inside, u * step, torch.zeros_like(t)), lo, hi


def _dithered(t: Any, qp: ActivationQParams, gen: Any) -> Any:
    """The error model of eq. A5 applied to ``t``: zeros kept, clipped beyond the outer
    levels, a fresh uniform error of one step on every other entry."""
    import torch

    noise, lo, hi = _a5_noise(t, qp, gen)
    return torch.clamp(t, lo, hi) + noise


# ---------------------------------------------------------------------------------------
# where the flips come from: weights or activations, layer by layer
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightActivationSplit:
    r"""Predicted flip rate with everything quantized, with the weights only, with the
    activations only, and with one weight layer or one activation point alone.

    Attributes
    ----------
    flip_rate, flip_low, flip_high : float
        Weights and activations together (level 3L, eq. A12-A13) and the band.
    weights_flip_rate, activations_flip_rate : float
        The weights alone, the activations alone.
    parts : pandas.DataFrame
        One row per weight layer (``kind="weights"``) and activation point
        (``kind="activations"``): ``name``, ``flip_rate`` with that part alone, its
        ``share`` of the sum of the parts' flip rates, and ``noise_share`` (its share of
        the trace of the total logit covariance, summed over samples).
    """

    flip_rate: float
    flip_low: float
    flip_high: float
    weights_flip_rate: float
    activations_flip_rate: float
    parts: pd.DataFrame = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        return self.parts.copy()

    def to_dict(self) -> dict[str, Any]:
        from distortion.experiments import _cache

        return _cache.jsonable(
            {
                "flip_rate": self.flip_rate, "flip_band": [self.flip_low, self.flip_high],
                "weights_flip_rate": self.weights_flip_rate,
                "activations_flip_rate": self.activations_flip_rate,
                "parts": self.parts.to_dict(orient="records"),
            }
        )  # fmt: skip


def weight_activation_split(
    grams: Any,
    variances: Sequence[Any],
    activations: ActivationGrams,
    *,
    coverage: float = 0.95,
    seed: int = 0,
) -> WeightActivationSplit:
    r"""Split the predicted flips of a W+A configuration into weights and activations.

    Parameters
    ----------
    grams : GradientGrams
        Weight Grams of the same samples as ``activations``.
    variances : sequence
        :math:`\sigma_\ell^2` of each weight layer (as
        :func:`~distortion.theory.multilayer.multilayer_distortion`; 0 keeps it in float).
    activations : ActivationGrams

    Returns
    -------
    WeightActivationSplit

    Notes
    -----
    Each part alone is eq. L7 with only its covariance (and, for an activation point, its
    clipping shift); the parts' flip rates do not add up to the total (the flip
    probability is not additive in the covariance), so the table also gives each part's
    share of the logit noise energy, which does add up (eq. A12).
    """
    from distortion.theory.multilayer import _check_variances, multilayer_distortion

    v = _check_variances(grams, variances)
    z = grams.logits
    if activations.logits.shape != z.shape or not np.allclose(
        activations.logits, z, rtol=1e-4, atol=1e-4
    ):
        raise ValueError(
            "the activation Grams and the weight Grams must be computed on the same samples "
            "in the same order"
        )
    zero = [0.0] * grams.n_layers
    band = grams.projections is not None
    total = multilayer_distortion(
        grams, v, activation_covariance=activations.covariance(), shift=activations.shift(),
        coverage=coverage, seed=seed, band=band,
    )  # fmt: skip
    w_only = multilayer_distortion(grams, v, band=False, seed=seed)
    a_only = multilayer_distortion(
        grams, zero, activation_covariance=activations.covariance(), shift=activations.shift(),
        band=False, seed=seed,
    )  # fmt: skip
    from distortion.theory.multilayer import noise_covariance

    rows = []
    trace_w = []
    for i, name in enumerate(grams.layer_names):
        if np.all(np.asarray(v[i]) == 0):
            continue
        vi = [v[j] if j == i else 0.0 for j in range(grams.n_layers)]
        r = multilayer_distortion(grams, vi, band=False, seed=seed)
        tr = float(np.trace(noise_covariance(grams, vi), axis1=1, axis2=2).sum())
        rows.append({"kind": "weights", "name": name, "flip_rate": r.flip_rate, "trace": tr})
        trace_w.append(tr)
    k = activations.n_classes
    diag = [i * k - i * (i - 1) // 2 for i in range(k)]
    for i, name in enumerate(activations.point_names):
        cov = activations.covariance([name])
        r = multilayer_distortion(
            grams, zero, activation_covariance=cov, shift=activations.shift([name]),
            band=False, seed=seed,
        )  # fmt: skip
        tr = float(activations.covariances[:, i, diag].astype(np.float64).sum())
        rows.append({"kind": "activations", "name": name, "flip_rate": r.flip_rate, "trace": tr})
    parts = pd.DataFrame(rows)
    if len(parts):
        s = parts["flip_rate"].sum()
        parts["share"] = parts["flip_rate"] / s if s > 0 else 0.0
        t = parts["trace"].sum()
        parts["noise_share"] = parts["trace"] / t if t > 0 else 0.0
        parts = parts.drop(columns="trace")
    fb = total.flip_band() if band else None
    return WeightActivationSplit(
        flip_rate=total.flip_rate,
        flip_low=float(fb.low) if fb is not None else float("nan"),
        flip_high=float(fb.high) if fb is not None else float("nan"),
        weights_flip_rate=w_only.flip_rate,
        activations_flip_rate=a_only.flip_rate,
        parts=parts,
    )


def check_disjoint(calibration: Any, evaluation: Any, *, batch_size: int = 500) -> None:
    """Raise a ValueError when an image of ``calibration`` is also in ``evaluation``.

    Images are compared by content (sha256 of each preprocessed image), so two subsets of one
    dataset, or the same images loaded twice, are caught. Pass the calibration set given to
    :func:`int8_reference` or :func:`~distortion.experiments.activations.calibrate_activations`
    and the images the result will be measured on.
    """
    import hashlib

    from distortion.experiments.sensitivity import _batches

    def digests(data: Any) -> list[str]:
        out = []
        for x, _ in _batches(data, batch_size):
            a = x.detach().to("cpu").numpy()
            out.extend(hashlib.sha256(np.ascontiguousarray(r).tobytes()).hexdigest() for r in a)
        return out

    cal = digests(calibration)
    if not cal:
        raise ValueError("the calibration set is empty: pass at least one image")
    ev = set(digests(evaluation))
    both = [i for i, d in enumerate(cal) if d in ev]
    if both:
        raise ValueError(
            f"{len(both)} of the {len(cal)} calibration images are also evaluation images "
            f"(calibration positions {both[:5]}{'...' if len(both) > 5 else ''}); calibrate on "
            "images you do not measure on (e.g. the fit half of the split)"
        )
