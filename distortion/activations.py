r"""Activation quantization: affine integer grids with PyTorch's arithmetic, and backend presets.

An :class:`ActivationQuantizer` is a frozen configuration of a ``b``-bit affine grid

.. math::  \hat x = (\operatorname{clip}(\operatorname{round}(x\,\mathrm{fl}(1/\Delta)) + z,
           q_{min}, q_{max}) - z)\,\Delta

(``theory/activations.md``, eq. A1–A2) whose step :math:`\Delta` (the *scale*) and integer zero
point :math:`z` are calibrated on a sample of the layer's inputs (:meth:`calibrate`), then used
on every later input (:func:`fake_quantize`). Its error is redrawn for every sample (the
input changes), so its :class:`~distortion.theory.error_models.ErrorModel` is random: the
rounding term :math:`\Delta^2/12` on the entries inside the grid, nothing on exact zeros, and
the exact clipping term on the entries beyond the outer levels (eq. A5–A7).

Grids (``b`` bits)
------------------
``signed=False``
    Codes :math:`0..2^b-1` (PyTorch ``quint8`` at 8 bits). After a ReLU the range is
    :math:`[0, x_{max}]`, the zero point is 0 and zero is a grid level (its error is exactly 0);
    a range that holds negative values gets the affine zero point
    :math:`z = q_{min} - \operatorname{round}(\ell/\Delta)` as PyTorch's ``MinMaxObserver``.
``signed=True``
    Codes :math:`-2^{b-1}..2^{b-1}-1` (``qint8``; TFLite's int8 activations), affine.
``symmetric=True`` (signed only)
    Zero point 0 and :math:`\Delta = \max(|\ell|, h)/((q_{max}-q_{min})/2)`: PyTorch's
    ``per_tensor_symmetric`` / ``per_channel_symmetric`` rule, i.e. :math:`\alpha/127.5` for
    ``qint8`` [−128, 127]; with ``narrow_range=True`` the code :math:`-2^{b-1}` is dropped
    (TFLite's weights, [−127, 127], :math:`\Delta = \alpha/127`).
``reduce_range=True``
    :math:`q_{min}, q_{max}` halved (integer division), as PyTorch's ``reduce_range`` (x86 and
    fbgemm activations: ``quint8`` [0, 127]).

Every grid holds 0 exactly: the range is widened to contain it, as PyTorch does.

Float32 rule (bit-exactness with PyTorch)
-----------------------------------------
Scales are float32 numbers (stored in float64 arrays) computed in float32 arithmetic exactly
as ``torch.ao.quantization.observer.UniformQuantizationObserverBase._calculate_qparams``:
``lo = min(x_min, 0)``, ``hi = max(x_max, 0)`` (float32), ``scale = (hi - lo) / (qmax - qmin)``
or ``max(-lo, hi) / ((qmax - qmin) / 2)``, floored at ``finfo(float32).eps``, and
``z = clip(qmin - rint(lo / scale), qmin, qmax)`` (float32 division, round half to even).
Fake quantization multiplies by the float32 reciprocal ``1 / scale`` (it does *not* divide
by the scale), rounds half to even and multiplies ``(q - z)`` by the scale, as
``torch.fake_quantize_per_tensor_affine`` and ``torch.fake_quantize_per_channel_affine`` do
on the CPU; dividing instead would change the code of ties and near-ties. Inputs of dtype
float32 (and lower precision) are computed in float32 and match PyTorch bit for bit; float64
inputs are computed with the same formula in float64.

numpy only at import (torch tensors are handled with torch, imported inside the functions).

References
----------
.. [1] PyTorch, ``torch.ao.quantization.observer`` (MinMaxObserver, PerChannelMinMaxObserver,
   HistogramObserver) and ``torch.ao.quantization.qconfig.get_default_qconfig``.
.. [2] TensorFlow Lite 8-bit quantization specification,
   https://www.tensorflow.org/lite/performance/quantization_spec
.. [3] B. Jacob et al., "Quantization and training of neural networks for efficient
   integer-arithmetic-only inference", CVPR 2018 (the affine scheme).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from distortion.theory.error_models import ErrorModel, uniform_error_variance

__all__ = [
    "PRESETS",
    "ActivationQParams",
    "ActivationQuantizer",
    "ActivationStats",
    "BackendPreset",
    "activation_stats",
    "fake_quantize",
    "preset",
]

Granularity = Literal["tensor", "channel"]
Calibration = Literal["minmax", "percentile", "mse"]
_GRANULARITIES = ("tensor", "channel")
_CALIBRATIONS = ("minmax", "percentile", "mse")
_F32 = np.float32
_EPS32 = np.finfo(np.float32).eps
#: Candidate clipping ratios of the "mse" calibration, largest first (ties keep the largest).
MSE_RATIOS = np.linspace(1.0, 0.01, 100)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


# ---------------------------------------------------------------------------------------
# parameters and statistics
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationQParams:
    r"""Scale and zero point of an affine grid, per tensor or per channel.

    Attributes
    ----------
    scale : ndarray of float64, shape () or (C,)
        The step :math:`\Delta`; every value is a float32 number (see the module docstring).
    zero_point : ndarray of int64, shape () or (C,)
        The code of 0.
    qmin, qmax : int
        Smallest and largest code.
    granularity : {"tensor", "channel"}
    channel_axis : int
        Axis of the channels of the quantized tensor (used when ``granularity="channel"``).
    """

    scale: np.ndarray  # () or (C,)
    zero_point: np.ndarray  # () or (C,)
    qmin: int
    qmax: int
    granularity: str = "tensor"
    channel_axis: int = 1

    def __post_init__(self) -> None:
        s = np.asarray(self.scale, dtype=np.float64)
        z = np.asarray(self.zero_point)
        if z.dtype.kind not in "iu" and not np.all(z == np.round(z)):
            raise ValueError("zero_point must hold integers")
        z = z.astype(np.int64)
        _check_choice("granularity", self.granularity, _GRANULARITIES)
        want = 0 if self.granularity == "tensor" else 1
        if s.ndim != want or z.shape != s.shape:
            raise ValueError(
                f"a per-{self.granularity} ActivationQParams needs scale and zero_point of "
                f"{'shape ()' if want == 0 else 'shape (C,)'}, got {s.shape} and {z.shape}"
            )
        if not (np.all(np.isfinite(s)) and np.all(s > 0)):
            raise ValueError("scale must hold finite positive values")
        if not int(self.qmin) < int(self.qmax):
            raise ValueError(f"qmin must be below qmax, got {self.qmin} and {self.qmax}")
        if np.any(z < self.qmin) or np.any(z > self.qmax):
            raise ValueError(f"zero_point must lie in [qmin, qmax] = [{self.qmin}, {self.qmax}]")
        object.__setattr__(self, "scale", s)
        object.__setattr__(self, "zero_point", z)
        object.__setattr__(self, "qmin", int(self.qmin))
        object.__setattr__(self, "qmax", int(self.qmax))

    @property
    def step(self) -> np.ndarray:
        r"""Alias of :attr:`scale` (:math:`\Delta`)."""
        return self.scale

    @property
    def lo(self) -> np.ndarray:
        r"""Lowest level :math:`(q_{min} - z)\Delta` (eq. A1), float64."""
        return (self.qmin - self.zero_point) * self.scale

    @property
    def hi(self) -> np.ndarray:
        r"""Highest level :math:`(q_{max} - z)\Delta` (eq. A1), float64."""
        return (self.qmax - self.zero_point) * self.scale

    @property
    def noise_variance(self) -> np.ndarray:
        r""":math:`\Delta^2/12` (eq. E1) per tensor or channel."""
        return uniform_error_variance(self.scale)

    def to_frame(self):
        """One row per tensor or channel."""
        import pandas as pd

        return pd.DataFrame(
            {
                "channel": np.arange(self.scale.size) if self.scale.ndim else [None],
                "scale": np.atleast_1d(self.scale),
                "zero_point": np.atleast_1d(self.zero_point),
                "lo": np.atleast_1d(self.lo),
                "hi": np.atleast_1d(self.hi),
                "qmin": self.qmin,
                "qmax": self.qmax,
            }
        )


@dataclass(frozen=True)
class ActivationStats:
    r"""What the error model needs from the activations, per tensor or channel (eq. A7).

    Attributes
    ----------
    zero_fraction : ndarray, shape () or (C,)
        :math:`\hat\pi_0`, share of entries exactly 0 (their error is 0).
    clipped_fraction : ndarray, shape () or (C,)
        :math:`\hat\pi_c`, share of entries beyond the outer levels.
    clip_second_moment : ndarray, shape () or (C,)
        :math:`\hat m_c`, mean over *all* entries of :math:`(x - \operatorname{clip}(x))^2`.
    clip_mean : ndarray, shape () or (C,)
        Mean over all entries of :math:`\operatorname{clip}(x) - x`.
    n : int
        Entries per tensor or per channel.
    granularity : {"tensor", "channel"}
    """

    zero_fraction: np.ndarray  # () or (C,)
    clipped_fraction: np.ndarray  # () or (C,)
    clip_second_moment: np.ndarray  # () or (C,)
    clip_mean: np.ndarray  # () or (C,)
    n: int
    granularity: str = "tensor"

    def to_frame(self):
        """One row per tensor or channel."""
        import pandas as pd

        z = np.atleast_1d(self.zero_fraction)
        return pd.DataFrame(
            {
                "channel": np.arange(z.size) if self.granularity == "channel" else [None],
                "zero_fraction": z,
                "clipped_fraction": np.atleast_1d(self.clipped_fraction),
                "clip_second_moment": np.atleast_1d(self.clip_second_moment),
                "clip_mean": np.atleast_1d(self.clip_mean),
                "n": self.n,
            }
        )


# ---------------------------------------------------------------------------------------
# array helpers
# ---------------------------------------------------------------------------------------
def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _as_numpy(x: Any) -> np.ndarray:
    if _is_torch(x):
        if not x.dtype.is_floating_point:
            raise ValueError(f"activations must be floating point, got a tensor of {x.dtype}")
        return x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"activations must hold real numbers, got dtype {arr.dtype}")
    return arr


def _check_finite(arr: np.ndarray, what: str) -> None:
    if arr.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} holds non-finite values (NaN or inf)")


def _channel_rows(arr: np.ndarray, granularity: str, axis: int) -> np.ndarray:
    """View as (groups, entries): one group per tensor, or per channel along ``axis``."""
    if granularity == "tensor":
        return arr.reshape(1, -1)
    if arr.ndim == 0 or not -arr.ndim <= axis < arr.ndim:
        raise ValueError(
            f"channel_axis={axis} is out of range for activations of shape {arr.shape}"
        )
    return np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)


def _param_shape(ndim: int, granularity: str, axis: int) -> tuple[int, ...]:
    if granularity == "tensor":
        return ()
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def _check_channels(qparams: ActivationQParams, shape: tuple[int, ...]) -> None:
    if qparams.granularity != "channel":
        return
    ax = qparams.channel_axis
    if not -len(shape) <= ax < len(shape) or shape[ax] != qparams.scale.size:
        raise ValueError(
            f"per-channel qparams with {qparams.scale.size} channels on axis {ax} do not fit "
            f"a tensor of shape {tuple(shape)}"
        )


# ---------------------------------------------------------------------------------------
# the float32 rule
# ---------------------------------------------------------------------------------------
def _qparams_from_range(lo, hi, qmin: int, qmax: int, symmetric: bool):
    """PyTorch's ``_calculate_qparams`` in float32 (module docstring), vectorized."""
    lo = np.minimum(np.asarray(lo, dtype=_F32), _F32(0))
    hi = np.maximum(np.asarray(hi, dtype=_F32), _F32(0))
    if symmetric:
        amax = np.maximum(-lo, hi)
        scale = amax / _F32((qmax - qmin) / 2)
        scale = np.maximum(scale, _F32(_EPS32))
        zp = np.zeros(scale.shape, dtype=np.int64)
    else:
        scale = (hi - lo) / _F32(qmax - qmin)
        scale = np.maximum(scale, _F32(_EPS32))
        zp = qmin - np.rint(lo / scale).astype(np.int64)
        zp = np.clip(zp, qmin, qmax)
    return scale.astype(_F32), zp


def _fake_quantize_numpy(x: np.ndarray, qparams: ActivationQParams) -> np.ndarray:
    dt = np.float64 if x.dtype == np.float64 else _F32
    shape = _param_shape(x.ndim, qparams.granularity, qparams.channel_axis)
    s32 = qparams.scale.astype(_F32)
    inv = (_F32(1) / s32).astype(dt).reshape(shape)  # the float32 reciprocal, as torch
    s = s32.astype(dt).reshape(shape)
    zp = qparams.zero_point.astype(dt).reshape(shape)
    xs = x.astype(dt, copy=False)
    q = np.clip(np.rint(xs * inv) + zp, qparams.qmin, qparams.qmax)  # (eq. A2)
    out = (q - zp) * s
    return out.astype(x.dtype if x.dtype.kind == "f" else np.float64, copy=False)


def _fake_quantize_torch(x: Any, qparams: ActivationQParams) -> Any:
    import torch

    if not x.dtype.is_floating_point:
        raise ValueError(f"activations must be floating point, got a tensor of {x.dtype}")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = _param_shape(x.dim(), qparams.granularity, qparams.channel_axis)
    s32 = qparams.scale.astype(_F32)
    inv_np = (_F32(1) / s32).astype(np.float64)
    kw = {"dtype": dt, "device": x.device}
    inv = torch.as_tensor(inv_np, **kw).reshape(shape)
    s = torch.as_tensor(s32.astype(np.float64), **kw).reshape(shape)
    zp = torch.as_tensor(qparams.zero_point.astype(np.float64), **kw).reshape(shape)
    xs = x.detach().to(dt)
    q = torch.clamp(torch.round(xs * inv) + zp, qparams.qmin, qparams.qmax)  # (eq. A2)
    return ((q - zp) * s).to(x.dtype)


def fake_quantize(x: Any, qparams: ActivationQParams) -> Any:
    r"""Quantize and dequantize ``x`` on the grid of ``qparams`` (eq. A2).

    Parameters
    ----------
    x : ndarray or torch.Tensor
        Activations; with per-channel ``qparams`` the channels are on ``qparams.channel_axis``.
    qparams : ActivationQParams

    Returns
    -------
    ndarray or torch.Tensor
        Same type, shape, dtype (float64 for integer arrays) and device as ``x``; ``x`` is
        never modified. Float32 input gives exactly ``torch.fake_quantize_per_tensor_affine``
        / ``torch.fake_quantize_per_channel_affine`` with the same scale and zero point.

    Notes
    -----
    .. math:: \hat x = (\operatorname{clip}(\operatorname{rint}(x \cdot \mathrm{fl}(1/\Delta))
              + z, q_{min}, q_{max}) - z)\,\Delta
    """
    if not isinstance(qparams, ActivationQParams):
        raise ValueError(f"qparams must be an ActivationQParams, got {type(qparams).__name__}")
    if _is_torch(x):
        _check_channels(qparams, tuple(x.shape))
        return _fake_quantize_torch(x, qparams)
    arr = _as_numpy(x)
    _check_channels(qparams, arr.shape)
    return _fake_quantize_numpy(arr, qparams)


def activation_stats(x: Any, qparams: ActivationQParams) -> ActivationStats:
    r"""Zero share, clipped share and clipping moments of ``x`` on the grid (eq. A7).

    Parameters
    ----------
    x : ndarray or torch.Tensor
        Calibration activations (channels on ``qparams.channel_axis`` if per channel).
    qparams : ActivationQParams

    Returns
    -------
    ActivationStats
    """
    arr = np.asarray(_as_numpy(x), dtype=np.float64)
    _check_finite(arr, "the activations")
    _check_channels(qparams, arr.shape)
    rows = _channel_rows(arr, qparams.granularity, qparams.channel_axis)
    lo = np.reshape(qparams.lo, (-1, 1))
    hi = np.reshape(qparams.hi, (-1, 1))
    clipped = np.clip(rows, lo, hi)
    d = clipped - rows  # e on the entries beyond the outer levels, 0 elsewhere
    out = (
        np.mean(rows == 0.0, axis=1),
        np.mean((rows < lo) | (rows > hi), axis=1),
        np.mean(d**2, axis=1),
        np.mean(d, axis=1),
    )
    if qparams.granularity == "tensor":
        out = tuple(np.reshape(a, ()) for a in out)
    return ActivationStats(*out, n=int(rows.shape[1]), granularity=qparams.granularity)


# ---------------------------------------------------------------------------------------
# the quantizer
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationQuantizer:
    r"""A ``b``-bit affine quantizer of activations (or weights), as a frozen configuration.

    Parameters
    ----------
    bits : int
        Bit-width, 2..16.
    signed : bool
        Codes :math:`-2^{b-1}..2^{b-1}-1` (True) or :math:`0..2^b-1` (False, the grid for
        the input of a layer after a ReLU).
    symmetric : bool
        Zero point 0 and the symmetric scale rule (signed grids only).
    narrow_range : bool
        Drop the lowest code :math:`-2^{b-1}` (signed grids only; TFLite's weights).
    reduce_range : bool
        Halve :math:`q_{min}` and :math:`q_{max}` (PyTorch's ``reduce_range``).
    granularity : {"tensor", "channel"}
        One scale and zero point, or one per channel along ``channel_axis``.
    calibration : {"minmax", "percentile", "mse"}
        The range from the extremes of the calibration sample (``MinMaxObserver``), from its
        ``percentile`` and ``100 - percentile`` percentiles (of :math:`|x|` when symmetric),
        or the ratio :math:`r \in` :data:`MSE_RATIOS` of the minmax range minimizing the
        squared error of the calibration sample (eq. A8; ties keep the largest :math:`r`).
    percentile : float
        In (50, 100], for ``calibration="percentile"``.
    channel_axis : int
        Channel axis of the activations (1 for (N, C, ...) inputs; 0 for weights).

    Notes
    -----
    The grid, the float32 rule and the error model are in the module docstring and
    ``theory/activations.md`` (eq. A1–A8).

    Examples
    --------
    >>> import numpy as np
    >>> q = ActivationQuantizer(8)
    >>> qp = q.calibrate(np.array([0.0, 0.5, 2.55]))
    >>> float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax
    (0.009999999776482582, 0, 0, 255)
    """

    bits: int
    signed: bool = False
    symmetric: bool = False
    narrow_range: bool = False
    reduce_range: bool = False
    granularity: Granularity = "tensor"
    calibration: Calibration = "minmax"
    percentile: float = 99.99
    channel_axis: int = 1

    def __post_init__(self) -> None:
        b = self.bits
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or not 2 <= int(b) <= 16:
            raise ValueError(f"bits must be an integer in 2..16, got {b!r}")
        object.__setattr__(self, "bits", int(b))
        _check_choice("granularity", self.granularity, _GRANULARITIES)
        _check_choice("calibration", self.calibration, _CALIBRATIONS)
        if self.symmetric and not self.signed:
            raise ValueError(
                "symmetric=True needs signed=True (an unsigned symmetric grid wastes half its "
                "codes; PyTorch gives it a zero point of 128)"
            )
        if self.narrow_range and not self.signed:
            raise ValueError("narrow_range=True needs signed=True")
        p = self.percentile
        if not (isinstance(p, int | float) and 50.0 < float(p) <= 100.0):
            raise ValueError(f"percentile must be in (50, 100], got {p!r}")
        if isinstance(self.channel_axis, bool) or not isinstance(self.channel_axis, int):
            raise ValueError(f"channel_axis must be an integer, got {self.channel_axis!r}")

    # -- the grid -------------------------------------------------------------------------
    def qrange(self) -> tuple[int, int]:
        """(qmin, qmax) of the grid (see the class docstring)."""
        if self.signed:
            qmin, qmax = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
            if self.narrow_range:
                qmin += 1
        else:
            qmin, qmax = 0, 2**self.bits - 1
        if self.reduce_range:
            qmin, qmax = qmin // 2, qmax // 2
        return qmin, qmax

    @property
    def qmin(self) -> int:
        """Smallest code."""
        return self.qrange()[0]

    @property
    def qmax(self) -> int:
        """Largest code."""
        return self.qrange()[1]

    def with_bits(self, bits: int) -> ActivationQuantizer:
        """The same configuration at another bit-width."""
        from dataclasses import replace

        return replace(self, bits=bits)

    # -- calibration ----------------------------------------------------------------------
    def qparams_from_range(self, lo: Any, hi: Any) -> ActivationQParams:
        """Scale and zero point for the range [lo, hi] (float32 rule), () or (C,)."""
        scale, zp = _qparams_from_range(lo, hi, self.qmin, self.qmax, self.symmetric)
        return ActivationQParams(
            scale.astype(np.float64), zp, self.qmin, self.qmax, self.granularity,
            self.channel_axis,
        )  # fmt: skip

    def calibrate(self, samples: Any) -> ActivationQParams:
        r"""Scale and zero point from calibration activations.

        Parameters
        ----------
        samples : ndarray or torch.Tensor
            Calibration activations, e.g. of shape (N, C, H, W) with the channels on
            ``channel_axis`` (per-channel calibration).

        Returns
        -------
        ActivationQParams
        """
        arr = _as_numpy(samples)
        _check_finite(arr, "the calibration sample")
        rows = _channel_rows(arr, self.granularity, self.channel_axis)
        # the observer's statistics are taken in float32 (rounding is monotone)
        mn = rows.min(axis=1).astype(_F32)
        mx = rows.max(axis=1).astype(_F32)
        if self.calibration == "minmax":
            lo, hi = mn, mx
        elif self.calibration == "percentile":
            r64 = rows.astype(np.float64)
            if self.symmetric:
                hi = np.percentile(np.abs(r64), self.percentile, axis=1)
                lo = -hi
            else:
                hi = np.percentile(r64, self.percentile, axis=1)
                lo = np.percentile(r64, 100.0 - self.percentile, axis=1)
        else:
            lo, hi = self._mse_range(arr, mn, mx)
        if self.granularity == "tensor":
            lo, hi = np.reshape(lo, ()), np.reshape(hi, ())
        return self.qparams_from_range(lo, hi)

    def _mse_range(self, arr: np.ndarray, mn: np.ndarray, mx: np.ndarray):
        """The range ratio of MSE_RATIOS minimizing the calibration squared error (eq. A8)."""
        lo0 = np.minimum(mn.astype(np.float64), 0.0)
        hi0 = np.maximum(mx.astype(np.float64), 0.0)
        x64 = np.asarray(arr, dtype=np.float64)
        sse = np.empty((lo0.size, MSE_RATIOS.size))
        for j, r in enumerate(MSE_RATIOS):
            lo, hi = lo0 * r, hi0 * r
            if self.granularity == "tensor":
                lo, hi = np.reshape(lo, ()), np.reshape(hi, ())
            qp = self.qparams_from_range(lo, hi)
            e = _fake_quantize_numpy(arr, qp).astype(np.float64) - x64
            sse[:, j] = np.sum(_channel_rows(e, self.granularity, self.channel_axis) ** 2, axis=1)
        best = np.argmin(sse, axis=1)  # the first minimum: the largest ratio
        return lo0 * MSE_RATIOS[best], hi0 * MSE_RATIOS[best]

    # -- quantization and its error model --------------------------------------------------
    def fake_quantize(self, x: Any, qparams: ActivationQParams) -> Any:
        """:func:`fake_quantize` (the grid is the one of ``qparams``)."""
        return fake_quantize(x, qparams)

    def stats(self, samples: Any, qparams: ActivationQParams) -> ActivationStats:
        """:func:`activation_stats` of ``samples`` on the grid of ``qparams``."""
        return activation_stats(samples, qparams)

    def error_model(self, x_or_stats: Any, qparams: ActivationQParams) -> ErrorModel:
        r"""The error model of quantizing inputs like ``x_or_stats`` on ``qparams`` (eq. A5–A6).

        Parameters
        ----------
        x_or_stats : ndarray, torch.Tensor or ActivationStats
            Calibration activations (their statistics are computed), or their
            :class:`ActivationStats`.
        qparams : ActivationQParams

        Returns
        -------
        ErrorModel
            ``random=True`` (redrawn for every sample), ``rule="activation"``, per tensor or
            per channel as ``qparams``.

        Notes
        -----
        .. math:: \sigma^2 = (1 - \hat\pi_0 - \hat\pi_c)\,\frac{\Delta^2}{12} + \hat m_c,
                  \qquad \mu = \overline{\operatorname{clip}(x) - x}

        with :math:`\Delta^2/12` from
        :func:`~distortion.theory.error_models.uniform_error_variance` (eq. E1).
        """
        st = (
            x_or_stats
            if isinstance(x_or_stats, ActivationStats)
            else activation_stats(x_or_stats, qparams)
        )
        if st.granularity != qparams.granularity or np.shape(st.zero_fraction) != np.shape(
            qparams.scale
        ):
            raise ValueError("the statistics and the qparams have different granularities")
        inside = np.clip(1.0 - st.zero_fraction - st.clipped_fraction, 0.0, 1.0)
        m2 = inside * uniform_error_variance(qparams.scale) + st.clip_second_moment  # (eq. A5)
        return ErrorModel(
            m2, st.clip_mean, granularity=qparams.granularity, random=True, rule="activation"
        )  # (eq. A6)

    def compress(
        self, x: Any, *, seed: int | None = None, qparams: ActivationQParams | None = None
    ):
        """The compressor protocol (:mod:`distortion.compression`) on activations ``x``.

        ``qparams`` default to a calibration on ``x`` itself; ``seed`` is unused (rounding to
        nearest is deterministic given ``x``; the inputs are what is random).

        Returns
        -------
        Compressed
            ``values`` (type of ``x``), ``error`` (float64), ``error_model`` (eq. A5–A6, with
            the statistics of ``x``) and, as ``detail``, the :class:`ActivationQParams`.
        """
        from distortion.compression import Compressed

        qp = self.calibrate(x) if qparams is None else qparams
        values = fake_quantize(x, qp)
        error = np.asarray(_as_numpy(values), np.float64) - np.asarray(_as_numpy(x), np.float64)
        return Compressed(values, error, self.error_model(x, qp), self, qp)

    # -- torch ----------------------------------------------------------------------------
    def torch_observer(self):
        """The torch.ao observer of the same grid (``calibration="minmax"`` only).

        ``MinMaxObserver`` or ``PerChannelMinMaxObserver`` (``ch_axis=channel_axis``) with
        the dtype, qscheme and explicit ``quant_min``/``quant_max`` of this grid
        (``reduce_range`` is applied to the explicit range, not passed on).
        """
        import torch
        from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

        if self.calibration != "minmax":
            raise ValueError(
                f"only calibration='minmax' has a torch observer, got {self.calibration!r}"
            )
        if self.bits <= 8:
            dtype = torch.qint8 if self.signed else torch.quint8
        else:
            dtype = torch.int16 if self.signed else torch.uint16
        kw = {"dtype": dtype, "quant_min": self.qmin, "quant_max": self.qmax}
        if self.granularity == "tensor":
            qs = torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine
            return MinMaxObserver(qscheme=qs, **kw)
        qs = torch.per_channel_symmetric if self.symmetric else torch.per_channel_affine
        return PerChannelMinMaxObserver(ch_axis=self.channel_axis, qscheme=qs, **kw)

    def to_frame(self):
        """The configuration as a one-row DataFrame."""
        import pandas as pd

        return pd.DataFrame([{**self.__dict__, "qmin": self.qmin, "qmax": self.qmax}])


# ---------------------------------------------------------------------------------------
# backend presets
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackendPreset:
    r"""The quantization convention of a real backend.

    Attributes
    ----------
    name : str
    activation : ActivationQuantizer
        The activation grid (per tensor; the calibration that best mirrors the backend's
        observer: ``"mse"`` for PyTorch's ``HistogramObserver``, which minimizes the L2
        quantization error over a histogram, ``"minmax"`` for TFLite).
    weight : ActivationQuantizer
        The weight grid (``channel_axis=0``, ``calibration="minmax"``): its
        :meth:`~ActivationQuantizer.calibrate` on a weight gives the backend's scales.
    torch_engine : str or None
        ``torch.backends.quantized.engine`` of the backend (None for TFLite).
    activation_observer, weight_observer : str
        The backend's own observers, as text.
    notes : str
    """

    name: str
    activation: ActivationQuantizer
    weight: ActivationQuantizer
    torch_engine: str | None
    activation_observer: str
    weight_observer: str
    notes: str = field(default="", repr=False)

    def torch_qconfig(self):
        """``torch.ao.quantization.get_default_qconfig(torch_engine)`` (PyTorch presets)."""
        if self.torch_engine is None:
            raise ValueError(f"preset {self.name!r} is not a PyTorch backend")
        from torch.ao.quantization import get_default_qconfig

        return get_default_qconfig(self.torch_engine)


_W_PER_CHANNEL = ActivationQuantizer(8, signed=True, symmetric=True, granularity="channel",
                                     channel_axis=0)  # fmt: skip
_W_PER_TENSOR = ActivationQuantizer(8, signed=True, symmetric=True, channel_axis=0)
_HIST = "HistogramObserver(dtype=quint8, qscheme=per_tensor_affine, reduce_range={})"
_PC = "PerChannelMinMaxObserver(dtype=qint8, qscheme=per_channel_symmetric, ch_axis=0)"

#: The backend presets by name (see :func:`preset`).
PRESETS: dict[str, BackendPreset] = {
    "pytorch-x86": BackendPreset(
        "pytorch-x86",
        ActivationQuantizer(8, reduce_range=True, calibration="mse"),
        _W_PER_CHANNEL,
        "x86",
        _HIST.format(True),
        _PC,
        "get_default_qconfig('x86'): quint8 activations [0, 127] (reduce_range, for the "
        "16-bit accumulation of VPMADDUBSW); qint8 per-channel symmetric weights [-128, 127], "
        "scale max|w|/127.5.",
    ),
    "pytorch-fbgemm": BackendPreset(
        "pytorch-fbgemm",
        ActivationQuantizer(8, reduce_range=True, calibration="mse"),
        _W_PER_CHANNEL,
        "fbgemm",
        _HIST.format(True),
        _PC,
        "get_default_qconfig('fbgemm'): as x86.",
    ),
    "pytorch-qnnpack": BackendPreset(
        "pytorch-qnnpack",
        ActivationQuantizer(8, calibration="mse"),
        _W_PER_TENSOR,
        "qnnpack",
        _HIST.format(False),
        "MinMaxObserver(dtype=qint8, qscheme=per_tensor_symmetric)",
        "get_default_qconfig('qnnpack'): quint8 activations [0, 255]; qint8 per-tensor "
        "symmetric weights [-128, 127], scale max|w|/127.5.",
    ),
    "tflite-int8": BackendPreset(
        "tflite-int8",
        ActivationQuantizer(8, signed=True, calibration="minmax"),
        ActivationQuantizer(
            8, signed=True, symmetric=True, narrow_range=True, granularity="channel", channel_axis=0
        ),  # fmt: skip
        None,
        "min/max of the representative dataset; int8 [-128, 127] asymmetric per tensor",
        "per-axis symmetric int8 [-127, 127], zero point 0, scale max|w|/127",
        "TFLite 8-bit quantization spec [2]. Scales follow the float32 rule of this module; "
        "TFLite's own converter may differ from it in the last ulp.",
    ),
}


def preset(name: str) -> BackendPreset:
    """The :class:`BackendPreset` called ``name``.

    Raises
    ------
    ValueError
        For an unknown name, or a PyTorch backend whose engine is not in
        ``torch.backends.quantized.supported_engines`` here (or when torch is missing);
        the message lists the presets available on this machine.
    """
    engines = _supported_engines()
    available = [
        k for k, p in PRESETS.items() if p.torch_engine is None or p.torch_engine in engines
    ]
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(available)}")
    p = PRESETS[name]
    if p.torch_engine is not None and p.torch_engine not in engines:
        raise ValueError(
            f"preset {name!r} needs the torch quantized engine {p.torch_engine!r}, which this "
            f"machine lacks (supported engines: {', '.join(engines) or 'none, torch missing'}); "
            f"available presets: {', '.join(available)}"
        )
    return p


def _supported_engines() -> list[str]:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return []
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]
