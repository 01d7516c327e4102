r"""Uniform quantizers as pure functions with a frozen configuration.

The pipeline is ``choose_qparams`` (the step and zero point from the weights) → ``quantize``
(integer codes) → ``dequantize`` (values on the grid); :class:`UniformQuantizer` composes
the three and returns a :class:`QuantizedTensor`. Arithmetic is done in float64 whatever the
input dtype, and numpy arrays and torch tensors give identical results (torch is never
imported here: a tensor is converted with ``.detach().cpu().numpy()`` and converted back
with its own ``new_tensor``). The input is never modified.

Schemes (``b`` bits)
--------------------
symmetric, ``symmetric_range="narrow"`` (the default; TFLite's weight convention)
    Signed levels :math:`k\Delta`, :math:`k = -L..L`, :math:`L = 2^{b-1} - 1`, zero exactly
    representable, :math:`\Delta = \alpha / L` for a clipping bound :math:`\alpha`
    (8 bits: codes [−127, 127], :math:`\Delta = \alpha/127`).
symmetric, ``symmetric_range="full"`` (PyTorch's ``per_{channel,tensor}_symmetric``)
    Codes :math:`k = -2^{b-1}..2^{b-1}-1`, levels :math:`k\Delta`,
    :math:`\Delta = \alpha / ((q_{max} - q_{min})/2) = 2\alpha/(2^b - 1)` (8 bits: [−128, 127],
    :math:`\alpha/127.5`). The grid is not symmetric at its ends: :math:`+\alpha` sits at
    :math:`q_{max} + \tfrac12` and saturates to :math:`q_{max}\Delta = \alpha (2^b-2)/(2^b-1)`
    (its error is :math:`-\Delta/2`: the largest positive weights are *clipped*), while
    :math:`-\alpha` rounds (half to even) to :math:`q_{min}`, one level beyond it. The step and the
    codes follow PyTorch's arithmetic bit for bit (see "PyTorch's arithmetic" below).
    One bit is the sign quantizer :math:`\pm\alpha` with :math:`\alpha = \operatorname{mean}|w|`
    (the value that minimizes the squared error of a sign quantizer); its levels are
    :math:`\pm\alpha`, so its step is :math:`\Delta = 2\alpha` and its codes are :math:`\pm 1`
    (0 counts as positive).
asymmetric
    :math:`2^b` levels :math:`(k - z)\Delta`, :math:`k = 0..2^b - 1`, over
    :math:`[\ell, h] = [\min(w_{min}, 0), \max(w_{max}, 0)]` (the range is widened to hold 0, as
    PyTorch's ``MinMaxObserver`` does, so zero is exactly representable),
    :math:`\Delta = (h - \ell)/(2^b - 1)` and the integer zero point
    :math:`z = \operatorname{clip}(\operatorname{round}(-\ell/\Delta), 0, 2^b - 1)`.

Clipping
--------
``"max"`` takes :math:`\alpha = \max|w|` (symmetric) or :math:`[\ell, h]` above (asymmetric).
``"mse"`` searches the clipping ratio :math:`r \in \{1, 0.99, \dots, 0.01\}` (100 candidates,
bound :math:`r\alpha` or range :math:`[r\ell, rh]`) that minimizes the squared error of
round-to-nearest quantization of that tensor or channel; ties go to the largest :math:`r`, so
the search is deterministic and a tensor already on its grid keeps its step (idempotence).
For the 1-bit sign quantizer the clipping choice does not apply (mean|w| is already optimal).

``clip_ratio`` :math:`r \in (0, 2]` (with ``"max"`` only) multiplies the max-based bound:
:math:`\alpha = r\max|w|` (symmetric) or the range :math:`[r\ell, rh]` (asymmetric), so the
step is :math:`r` times the max-based one. :math:`r < 1` clips the largest weights (their error
is the deterministic :math:`\operatorname{clip}(w) - w`, eq. E5 of ``theory/error_models.md``),
:math:`r > 1` leaves headroom (nothing is clipped, the step is larger). Like the "mse" range,
:math:`r\alpha` is rounded to the values' dtype. Neither ``clip_ratio`` nor
``symmetric_range`` applies to the 1-bit sign quantizer (ignored, like ``clipping``).

PyTorch's arithmetic (``symmetric_range="full"``)
--------------------------------------------------
As ``torch.ao.quantization.PerChannelMinMaxObserver`` / ``MinMaxObserver`` with
``qscheme=per_{channel,tensor}_symmetric`` followed by ``torch.fake_quantize_per_{channel,
tensor}_affine``: in the arithmetic of the weights' dtype (float32 for float32 and lower
precision, float64 for float64 and integer input),
:math:`\Delta = \max(\mathrm{fl}(r\alpha) / ((q_{max} - q_{min})/2),\ \varepsilon)` with
:math:`\varepsilon` = ``finfo(float32).eps`` (PyTorch's floor), and the codes are
:math:`\operatorname{clip}(\operatorname{rint}(w \cdot \mathrm{fl}(1/\Delta)), q_{min}, q_{max})`
— a product by the reciprocal, rounded in that dtype, not a division (the two differ at
near-ties). The values :math:`c\Delta` are then exact in float64 and rounded once to the dtype,
as PyTorch's float32 product. A constant channel keeps the rule above (returned unchanged,
:math:`\Delta = 0`), where PyTorch would use its floor or saturate. Unlike the narrow grid,
the full grid is not idempotent: a weight at :math:`q_{min}\Delta` has a larger magnitude than
:math:`\alpha`, so requantizing finds another step.

Rounding
--------
``"nearest"`` rounds half to even, exactly as ``numpy.round`` and ``torch.round``.
``"stochastic"`` rounds :math:`x` up with probability :math:`x - \lfloor x \rfloor`, so
:math:`E[\hat w] = w` inside the range. ``"dither"`` is subtractive dither: a uniform offset
:math:`u \sim U(-1/2, 1/2)` (in steps) is added before rounding and subtracted after, so the
values are :math:`(c - u)\Delta` — off the grid, but the error is exactly
:math:`U(-\Delta/2, \Delta/2)` and independent of :math:`w` (Schuchman's condition) for
unclipped entries. Both random modes draw from ``numpy.random.default_rng(seed)``.

Degenerate input: an all-zero tensor or channel (and, for the asymmetric scheme and any
constant tensor or channel, since its range is a single point or holds only 0 and one value)
— precisely, any tensor or channel whose entries are all equal — has :math:`\Delta = 0` and is
returned unchanged, with codes 0 and error 0: one value needs no grid.

An entry is *clipped* when it lies outside the clipping range — the outer levels
(:math:`[-\alpha, \alpha]` or :math:`[\ell, h]`; :math:`[q_{min}\Delta, q_{max}\Delta]` for the full
symmetric range; for the 1-bit sign quantizer, outside :math:`[-2\alpha, 2\alpha]`, where its
error would exceed :math:`\Delta/2`), so "max" clipping with ``clip_ratio=1`` clips nothing on
the narrow grid (the full grid clips the positive maximum). A clipped entry saturates at the
outer level: its error :math:`\operatorname{clip}(w) - w` is deterministic (eq. E5).
Every other entry has :math:`|e| \le \Delta/2` under nearest rounding and
:math:`|e| < \Delta` under stochastic rounding; under dither, :math:`|e| \le \Delta/2` holds
inside the range spanned by the levels (for the asymmetric scheme the zero point's rounding
shifts that range by up to :math:`\Delta/2` from :math:`[\ell, h]`, and an edge entry may
saturate).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from distortion.theory.error_models import (
    ErrorModel,
    clipping_error_model,
    stochastic_rounding_second_moment,
    uniform_error_variance,
)

__all__ = [
    "QuantParams",
    "QuantizedTensor",
    "UniformQuantizer",
    "choose_qparams",
    "dequantize",
    "quantize",
]

Scheme = Literal["symmetric", "asymmetric"]
Granularity = Literal["tensor", "channel"]
Clipping = Literal["max", "mse"]
Rounding = Literal["nearest", "stochastic", "dither"]
SymmetricRange = Literal["narrow", "full"]

_SCHEMES = ("symmetric", "asymmetric")
_GRANULARITIES = ("tensor", "channel")
_CLIPPINGS = ("max", "mse")
_ROUNDINGS = ("nearest", "stochastic", "dither")
_SYMMETRIC_RANGES = ("narrow", "full")
#: PyTorch's floor of an observer's scale (``torch.finfo(torch.float32).eps``).
_TORCH_EPS = float(np.finfo(np.float32).eps)
#: Candidate clipping ratios of the "mse" search, largest first (ties keep the largest).
MSE_RATIOS = np.linspace(1.0, 0.01, 100)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_clip_ratio(clip_ratio: Any, clipping: str) -> float:
    real = int | float | np.integer | np.floating
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, real):
        raise ValueError(f"clip_ratio must be a number in (0, 2], got {clip_ratio!r}")
    r = float(clip_ratio)
    if not (np.isfinite(r) and 0.0 < r <= 2.0):
        raise ValueError(
            f"clip_ratio must be in (0, 2] (a factor of the max-based step), got {clip_ratio!r}"
        )
    if r != 1.0 and clipping != "max":
        raise ValueError(
            f"clip_ratio={clip_ratio!r} needs clipping='max' (clipping={clipping!r} chooses its "
            "own range)"
        )
    return r


def _check_range(symmetric_range: Any, scheme: str) -> None:
    _check_choice("symmetric_range", symmetric_range, _SYMMETRIC_RANGES)
    if symmetric_range == "full" and scheme != "symmetric":
        raise ValueError(
            "symmetric_range='full' applies to scheme='symmetric' only (the asymmetric scheme "
            f"already uses all 2**bits codes), got scheme={scheme!r}"
        )


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
    if not 1 <= int(bits) <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits!r}")
    return int(bits)


@dataclass(frozen=True)
class QuantParams:
    r"""Step and zero point of a uniform quantizer, per tensor or per output channel.

    Attributes
    ----------
    step : ndarray of shape () or (C,)
        The quantization step :math:`\Delta` (float64); 0 for a constant tensor or channel.
    zero_point : ndarray of shape () or (C,)
        Integer code of the value 0 (int64); always 0 for the symmetric scheme.
    lo, hi : ndarray of shape () or (C,)
        The clipping range (the outer levels); for the narrow symmetric grid
        ``lo = -hi = -alpha`` and the outer codes :math:`\pm L` dequantize to
        :math:`\pm\alpha` exactly; for the full one ``lo = qmin * step``, ``hi = qmax * step``.
    qmin, qmax : int
        Smallest and largest integer code.
    bits, scheme, granularity, symmetric_range : see :class:`UniformQuantizer`.
    compute_dtype : str
        ``"float64"``, or ``"float32"`` where the full symmetric range follows PyTorch's
        float32 arithmetic (float32 and lower-precision weights).
    """

    step: np.ndarray  # () or (C,)
    zero_point: np.ndarray  # () or (C,)
    lo: np.ndarray  # () or (C,)
    hi: np.ndarray  # () or (C,)
    qmin: int
    qmax: int
    bits: int
    scheme: str
    granularity: str
    symmetric_range: str = "narrow"
    compute_dtype: str = "float64"

    @property
    def torch_arithmetic(self) -> bool:
        """Whether codes follow PyTorch's rule (the full symmetric range; module docstring)."""
        return self.scheme == "symmetric" and self.symmetric_range == "full" and self.bits > 1

    @property
    def noise_variance(self) -> np.ndarray:
        r"""Variance :math:`\Delta^2/12` of nearest-rounding error under H_U (eq. E1)."""
        return uniform_error_variance(self.step)


@dataclass(frozen=True)
class QuantizedTensor:
    r"""Result of :meth:`UniformQuantizer.quantize`.

    Attributes
    ----------
    values : array or tensor, shape of the input
        Dequantized values, of the input's type, dtype and device.
    codes : ndarray of int64, shape of the input
        Integer codes.
    step : ndarray of shape () or (C,)
        Step :math:`\Delta` per tensor or per output channel (axis 0).
    zero_point : ndarray of shape () or (C,)
        Zero point (codes of 0); 0 for the symmetric scheme.
    error : ndarray of float64, shape of the input
        ``values - w``, computed in float64 (exact for float32 input).
    clipped : ndarray of bool, shape of the input
        Entries outside the clipping range (see the module docstring).
    quantizer : UniformQuantizer
        The configuration that produced this result.
    error_model : ErrorModel
        The model of the error that levels 1 and 3 use
        (:mod:`distortion.theory.error_models`): :math:`\Delta^2/12` per tensor or channel
        for nearest rounding (H_U) and dither (eq. E1), the exact
        :math:`\Delta^2\,\overline{p(1-p)}` for stochastic rounding (eq. E2).
    """

    values: Any  # shape of w
    codes: np.ndarray  # shape of w
    step: np.ndarray  # () or (C,)
    zero_point: np.ndarray  # () or (C,)
    error: np.ndarray  # shape of w
    clipped: np.ndarray = field(repr=False)  # shape of w
    quantizer: UniformQuantizer = field(repr=False, default=None)
    error_model: ErrorModel = field(repr=False, default=None)

    @property
    def clipped_fraction(self) -> float:
        """Fraction of entries outside the clipping range."""
        return float(np.mean(self.clipped))

    @property
    def noise_variance(self) -> np.ndarray:
        r"""The error model's :math:`E[e^2]` per tensor or channel (Δ²/12 under H_U for
        nearest rounding and dither; its own for stochastic rounding)."""
        if self.error_model is None:
            return uniform_error_variance(self.step)
        return self.error_model.second_moment

    def to_frame(self):
        """One row per tensor or channel: step, zero point, clipped fraction, error moments."""
        import pandas as pd

        err = (
            self.error.reshape(self.step.size, -1) if self.step.ndim else self.error.reshape(1, -1)
        )
        clip = self.clipped.reshape(err.shape)
        return pd.DataFrame(
            {
                "channel": np.arange(err.shape[0]) if self.step.ndim else [None],
                "step": np.atleast_1d(self.step),
                "zero_point": np.atleast_1d(self.zero_point),
                "clipped_fraction": clip.mean(axis=1),
                "error_mean": err.mean(axis=1),
                "error_var": err.var(axis=1),
                "uniform_var": np.atleast_1d(uniform_error_variance(self.step)),
                "model_second_moment": np.atleast_1d(self.noise_variance),
            }
        )


def _to_numpy(w: Any) -> tuple[np.ndarray, Any]:
    """Return (float64 copy of w as numpy, the original object for converting back)."""
    if hasattr(w, "detach") and hasattr(w, "dtype") and type(w).__module__.startswith("torch"):
        if not w.dtype.is_floating_point:
            raise ValueError(f"w must hold floating-point values, got a tensor of {w.dtype}")
        arr = w.detach().cpu().numpy()
        return np.array(arr, dtype=np.float64), w
    arr = np.asarray(w)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"w must hold real numbers, got an array of dtype {arr.dtype}")
    return np.array(arr, dtype=np.float64), arr


def _from_numpy(values: np.ndarray, like: Any) -> Any:
    if hasattr(like, "new_tensor"):
        return like.new_tensor(values)  # same dtype and device, no grad, a copy
    dtype = like.dtype if like.dtype.kind == "f" else np.float64
    return values.astype(dtype)


def _validate(w64: np.ndarray, granularity: str) -> None:
    if w64.size == 0:
        raise ValueError("w is empty: there is nothing to quantize")
    if not np.all(np.isfinite(w64)):
        bad = int(np.size(w64) - np.count_nonzero(np.isfinite(w64)))
        raise ValueError(
            f"w holds {bad} non-finite value(s) (NaN or inf): quantize finite weights only"
        )
    if granularity == "channel" and w64.ndim == 0:
        raise ValueError(
            "granularity='channel' needs w with at least one axis (channels on axis 0)"
        )


def _rows(w64: np.ndarray, granularity: str) -> np.ndarray:
    """View w as (groups, entries): one group per tensor or per output channel."""
    return w64.reshape(1, -1) if granularity == "tensor" else w64.reshape(w64.shape[0], -1)


def _grid(lo: np.ndarray, hi: np.ndarray, bits: int, scheme: str, symmetric_range: str = "narrow"):
    """Step, zero point, qmin, qmax for ranges [lo, hi] (symmetric: hi = alpha, lo = -alpha)."""
    if scheme == "symmetric" and symmetric_range == "full":
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        step = hi / ((qmax - qmin) / 2.0)
        zp = np.zeros(hi.shape, dtype=np.int64)
    elif scheme == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax
        step = hi / qmax
        zp = np.zeros(hi.shape, dtype=np.int64)
    else:
        qmin, qmax = 0, 2**bits - 1
        step = (hi - lo) / qmax
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(step > 0, np.round(-lo / np.where(step > 0, step, 1.0)), 0.0)
        zp = np.clip(zp, qmin, qmax).astype(np.int64)
    return step, zp, qmin, qmax


def _nearest_sq_error(rows: np.ndarray, step, zp, qmin, qmax) -> np.ndarray:
    """Squared error per row of nearest rounding on grids (step, zp); rows (G, n), step (G, R)."""
    safe = np.where(step > 0, step, 1.0)
    codes = np.clip(np.round(rows[:, None, :] / safe[..., None]) + zp[..., None], qmin, qmax)
    vals = (codes - zp[..., None]) * step[..., None]
    return np.sum((vals - rows[:, None, :]) ** 2, axis=-1)


def choose_qparams(
    w: Any,
    bits: int,
    *,
    scheme: Scheme = "symmetric",
    granularity: Granularity = "tensor",
    clipping: Clipping = "max",
    symmetric_range: SymmetricRange = "narrow",
    clip_ratio: float = 1.0,
) -> QuantParams:
    r"""Choose the step and zero point of a uniform quantizer for ``w``.

    Parameters
    ----------
    w : array_like or torch.Tensor
        Weights; with ``granularity="channel"`` the output channels are on axis 0.
    bits : int
        Bit-width, 1..16.
    scheme, granularity, clipping, symmetric_range, clip_ratio
        See :class:`UniformQuantizer`.

    Returns
    -------
    QuantParams
    """
    bits = _check_bits(bits)
    _check_choice("scheme", scheme, _SCHEMES)
    _check_choice("granularity", granularity, _GRANULARITIES)
    _check_choice("clipping", clipping, _CLIPPINGS)
    _check_range(symmetric_range, scheme)
    ratio = _check_clip_ratio(clip_ratio, clipping)
    w64, _ = _to_numpy(w)
    _validate(w64, granularity)
    rows = _rows(w64, granularity)
    return _choose_rows(
        rows, bits, scheme, granularity, clipping, _dtype_of(w), symmetric_range, ratio
    )


def _dtype_of(w: Any) -> np.dtype:
    """numpy dtype of the values returned for ``w`` (float64 for integer input)."""
    if hasattr(w, "detach") and hasattr(w, "dtype"):
        return np.dtype(str(w.dtype).replace("torch.", ""))
    dt = np.asarray(w).dtype
    return dt if dt.kind == "f" else np.dtype(np.float64)


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """The arithmetic of PyTorch's rule for weights of ``dtype`` (float32 up to 4 bytes)."""
    single = dtype.kind == "f" and dtype.itemsize <= 4
    return np.dtype(np.float32) if single else np.dtype(np.float64)


def _choose_rows(
    rows, bits, scheme, granularity, clipping, dtype, symmetric_range="narrow", clip_ratio=1.0
) -> QuantParams:
    constant = rows.max(axis=1) == rows.min(axis=1)
    full = scheme == "symmetric" and symmetric_range == "full" and bits > 1
    cdt = _compute_dtype(np.dtype(dtype)) if full else np.dtype(np.float64)
    if bits == 1 and scheme == "symmetric":
        a = np.abs(rows)
        amax = a.max(axis=1)
        # mean|w|; exactly max|w| when all |w| are equal (a sign-quantized tensor stays put)
        alpha = np.where(a.min(axis=1) == amax, amax, a.mean(axis=1))
        step = 2.0 * alpha
        zp = np.zeros(rows.shape[0], dtype=np.int64)
        lo, hi = -alpha, alpha
        qmin, qmax = -1, 1
    else:
        if scheme == "symmetric":
            hi = np.abs(rows).max(axis=1)
            lo = -hi
        else:
            lo = np.minimum(rows.min(axis=1), 0.0)
            hi = np.maximum(rows.max(axis=1), 0.0)
        rng_ = "full" if full else "narrow"
        if clipping == "mse":
            r = MSE_RATIOS[None, :]
            step_c, zp_c, qmin, qmax = _grid(lo[:, None] * r, hi[:, None] * r, bits, scheme, rng_)
            sse = _nearest_sq_error(rows, step_c, zp_c, qmin, qmax)
            best = np.argmin(sse, axis=1)  # first minimum = largest ratio
            ratio = MSE_RATIOS[best]
        else:
            ratio = np.full(rows.shape[0], float(clip_ratio))
        if clipping == "mse" or clip_ratio != 1.0:
            # The range is rounded to the values' dtype so that the outer levels are
            # representable: quantizing the dequantized values again finds the same range.
            lo = (lo * ratio).astype(dtype).astype(np.float64)
            hi = (hi * ratio).astype(dtype).astype(np.float64)
        if full:
            # PyTorch's observer rule, in the weights' arithmetic (module docstring)
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            alpha = hi.astype(cdt)
            step = np.maximum(alpha / cdt.type((qmax - qmin) / 2.0), cdt.type(_TORCH_EPS))
            step = step.astype(np.float64)
            zp = np.zeros(hi.shape, dtype=np.int64)
            lo, hi = qmin * step, qmax * step  # the outer levels
        else:
            step, zp, qmin, qmax = _grid(lo, hi, bits, scheme)
    step = np.where(constant, 0.0, step)
    zp = np.where(constant, 0, zp).astype(np.int64)
    if granularity == "tensor":
        step, zp, lo, hi = (np.reshape(a, ()) for a in (step, zp, lo, hi))
    return QuantParams(
        step, zp, lo, hi, int(qmin), int(qmax), bits, scheme, granularity,
        "full" if full else "narrow", str(cdt),
    )  # fmt: skip


def _per_entry(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Broadcast a per-tensor or per-channel parameter to the shape of w."""
    if param.ndim == 0:
        return np.broadcast_to(param, shape)
    return np.broadcast_to(param.reshape((-1,) + (1,) * (len(shape) - 1)), shape)


def quantize(
    w: Any,
    qparams: QuantParams,
    *,
    rounding: Rounding = "nearest",
    seed: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Integer codes of ``w`` on the grid of ``qparams``.

    Returns
    -------
    codes : ndarray of int64, shape of w
    dither : ndarray of float64 or None
        The subtractive-dither offsets (in steps) for ``rounding="dither"``, else None; pass it to
        :func:`dequantize`.

    Notes
    -----
    With :math:`x = w/\Delta` the codes are
    :math:`c = \operatorname{clip}(\rho(x) + z, q_{min}, q_{max})` with :math:`\rho` the rounding:
    half-to-even, stochastic (:math:`\lfloor x\rfloor + [u < x - \lfloor x\rfloor]`), or
    subtractive dither (:math:`\operatorname{round}(x + u)`, :math:`u \sim U(-1/2, 1/2)`).
    The 1-bit symmetric quantizer returns :math:`\operatorname{sign}(w)` (+1 at 0).
    """
    _check_choice("rounding", rounding, _ROUNDINGS)
    w64, _ = _to_numpy(w)
    _validate(w64, qparams.granularity)
    return _codes(w64, qparams, rounding, seed)


def _scaled(w64: np.ndarray, qparams: QuantParams, step: np.ndarray) -> np.ndarray:
    r""":math:`x = w/\Delta` (float64), or PyTorch's
    :math:`\mathrm{fl}(w\,\mathrm{fl}(1/\Delta))`."""
    safe = np.where(step > 0, step, 1.0)
    if not qparams.torch_arithmetic:
        return w64 / safe
    cdt = np.dtype(qparams.compute_dtype)
    inv = cdt.type(1) / safe.astype(cdt)  # the reciprocal, as torch.fake_quantize_*_affine
    return (w64.astype(cdt) * inv).astype(np.float64)


def _codes(w64, qparams, rounding, seed):
    step = _per_entry(qparams.step, w64.shape)
    zp = _per_entry(qparams.zero_point, w64.shape)
    if qparams.bits == 1 and qparams.scheme == "symmetric":
        codes = np.where(w64 >= 0, 1, -1).astype(np.int64)
        return np.where(step > 0, codes, 0).astype(np.int64), None
    x = _scaled(w64, qparams, step)
    dither = None
    if rounding == "nearest":
        r = np.round(x)
    else:
        rng = np.random.default_rng(seed)
        if rounding == "stochastic":
            # Values already on the grid (up to rounding error of the division) stay put.
            near = np.round(x)
            on_grid = np.abs(x - near) <= 64 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(x))
            fl = np.floor(x)
            u = rng.random(x.shape)
            r = np.where(on_grid, near, fl + (u < (x - fl)))
        else:
            dither = rng.random(x.shape) - 0.5
            r = np.round(x + dither)
    codes = np.clip(r + zp, qparams.qmin, qparams.qmax)
    codes = np.where(step > 0, codes, 0).astype(np.int64)
    if dither is not None:
        dither = np.where(step > 0, dither, 0.0)
    return codes, dither


def dequantize(
    codes: np.ndarray,
    qparams: QuantParams,
    *,
    dither: np.ndarray | None = None,
) -> np.ndarray:
    r"""Values :math:`(c - z - u)\Delta` of the codes (float64), ``u`` the dither or 0."""
    codes = np.asarray(codes)
    step = _per_entry(qparams.step, codes.shape)
    zp = _per_entry(qparams.zero_point, codes.shape)
    if qparams.bits == 1 and qparams.scheme == "symmetric":
        return codes * (step / 2.0)  # levels ±alpha, alpha = step / 2
    shift = zp if dither is None else zp + dither
    values = (codes - shift) * step
    if qparams.scheme == "symmetric" and dither is None and qparams.symmetric_range == "narrow":
        # The outer levels are the clipping bounds exactly (L * (alpha / L) may miss alpha by
        # an ulp), which makes quantization idempotent.
        hi = _per_entry(qparams.hi, codes.shape)
        values = np.where(codes == qparams.qmax, hi, np.where(codes == qparams.qmin, -hi, values))
    return values


@dataclass(frozen=True, repr=False)
class UniformQuantizer:
    r"""A b-bit uniform quantizer of weights, as a frozen configuration.

    Parameters
    ----------
    bits : int
        Bit-width, 1..16.
    scheme : {"symmetric", "asymmetric"}
        Signed levels around 0, or :math:`2^b` levels over the range with a zero point.
    granularity : {"tensor", "channel"}
        One step for the whole tensor, or one per output channel (axis 0).
    clipping : {"max", "mse"}
        Range from the extreme values, or the range that minimizes the squared error.
    rounding : {"nearest", "stochastic", "dither"}
        Round half to even, stochastic rounding, or subtractive dither.
    symmetric_range : {"narrow", "full"}
        Codes of the symmetric scheme: ``"narrow"`` :math:`-(2^{b-1}-1)..2^{b-1}-1` with
        :math:`\Delta = \alpha/(2^{b-1}-1)` (TFLite's weights, the default); ``"full"``
        :math:`-2^{b-1}..2^{b-1}-1` with :math:`\Delta = 2\alpha/(2^b-1)` and PyTorch's
        arithmetic (``per_channel_symmetric`` observers, bit for bit). Only
        ``"narrow"`` is allowed with the asymmetric scheme (which needs neither).
    clip_ratio : float
        :math:`r \in (0, 2]`: the bound is :math:`r` times the max-based one (with
        ``clipping="max"`` only): :math:`r < 1` clips the largest weights, :math:`r > 1`
        leaves headroom.

    Notes
    -----
    The module docstring gives the grids. Under the uniform-error hypothesis H_U the error of
    each entry is :math:`U(-\Delta/2, \Delta/2)` with variance :math:`\sigma_q^2` of
    eq. E1 (``theory/error_models.md``); :meth:`compress` returns it as the error model,
    with the exact eq. E2 for stochastic rounding. :meth:`error_model` with
    ``rule="clipping"`` splits off the deterministic error of the clipped entries
    (eq. E5–E7).

    Examples
    --------
    >>> import numpy as np
    >>> q = UniformQuantizer(4, granularity="channel")
    >>> res = q.quantize(np.array([[0.5, -1.0, 0.25], [2.0, 1.0, -0.1]]))
    >>> res.step
    array([0.14285714, 0.28571429])
    """

    bits: int
    scheme: Scheme = "symmetric"
    granularity: Granularity = "tensor"
    clipping: Clipping = "max"
    rounding: Rounding = "nearest"
    symmetric_range: SymmetricRange = "narrow"
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_choice("scheme", self.scheme, _SCHEMES)
        _check_choice("granularity", self.granularity, _GRANULARITIES)
        _check_choice("clipping", self.clipping, _CLIPPINGS)
        _check_choice("rounding", self.rounding, _ROUNDINGS)
        _check_range(self.symmetric_range, self.scheme)
        object.__setattr__(self, "clip_ratio", _check_clip_ratio(self.clip_ratio, self.clipping))

    def __repr__(self) -> str:
        # symmetric_range and clip_ratio only when not the defaults: the repr of today's
        # quantizers (part of cache keys) stays what it was
        parts = [f"bits={self.bits!r}", f"scheme={self.scheme!r}",
                 f"granularity={self.granularity!r}", f"clipping={self.clipping!r}",
                 f"rounding={self.rounding!r}"]  # fmt: skip
        if self.symmetric_range != "narrow":
            parts.append(f"symmetric_range={self.symmetric_range!r}")
        if self.clip_ratio != 1.0:
            parts.append(f"clip_ratio={self.clip_ratio!r}")
        return f"UniformQuantizer({', '.join(parts)})"

    def with_bits(self, bits: int) -> UniformQuantizer:
        """The same quantizer at another bit-width."""
        return replace(self, bits=bits)

    def labels(self) -> dict[str, str]:
        """The ``scheme`` and ``clipping`` labels of comparison tables: the full symmetric
        range and a clip ratio are part of them (``"symmetric-full"``, ``"max*0.97"``); the
        defaults read as the plain settings."""
        scheme = self.scheme if self.symmetric_range == "narrow" else f"{self.scheme}-full"
        clip = self.clipping if self.clip_ratio == 1.0 else f"{self.clipping}*{self.clip_ratio:g}"
        return {"scheme": scheme, "clipping": clip}

    def qparams(self, w: Any) -> QuantParams:
        """Step and zero point for ``w`` (see :func:`choose_qparams`)."""
        return choose_qparams(
            w, self.bits, scheme=self.scheme, granularity=self.granularity,
            clipping=self.clipping, symmetric_range=self.symmetric_range,
            clip_ratio=self.clip_ratio,
        )  # fmt: skip

    def _qparams64(self, w64: np.ndarray, dtype: np.dtype) -> QuantParams:
        return _choose_rows(
            _rows(w64, self.granularity), self.bits, self.scheme, self.granularity,
            self.clipping, dtype, self.symmetric_range, self.clip_ratio,
        )  # fmt: skip

    def quantize(self, w: Any, *, seed: int | np.random.Generator | None = None) -> QuantizedTensor:
        """Quantize ``w`` (numpy array or torch tensor); ``w`` itself is never modified.

        Parameters
        ----------
        w : array_like or torch.Tensor of shape (C, ...)
            Weights; channels on axis 0 for ``granularity="channel"``.
        seed : int, Generator or None
            Seed of the stochastic and dither rounding (ignored by ``"nearest"``).

        Returns
        -------
        QuantizedTensor
        """
        w64, like = _to_numpy(w)
        _validate(w64, self.granularity)
        qp = self._qparams64(w64, _dtype_of(w))
        codes, dither = _codes(w64, qp, self.rounding, seed)
        values64 = dequantize(codes, qp, dither=dither)
        step = _per_entry(qp.step, w64.shape)
        values64 = np.where(step > 0, values64, w64)
        values = _from_numpy(values64, like)
        error = _as_float64(values) - w64
        clipped = self._clipped(w64, qp, step)
        model = self._error_model(w64, qp)
        return QuantizedTensor(values, codes, qp.step, qp.zero_point, error, clipped, self, model)

    def _error_model(self, w64: np.ndarray, qp: QuantParams, rule: str = "uniform") -> ErrorModel:
        """The error model of this quantizer on ``w`` (the one rule: error_models.py)."""
        if rule == "clipping":
            step = _per_entry(qp.step, w64.shape)
            if self.scheme == "asymmetric":
                # the outer levels (q - z) * step, which the zero point's rounding moves by up
                # to step / 2 from [lo, hi]: an entry saturates beyond them (eq. E5)
                zp = _per_entry(qp.zero_point, w64.shape)
                lo, hi = (qp.qmin - zp) * step, (qp.qmax - zp) * step
                tol = 8 * np.finfo(np.float64).eps * np.maximum(np.abs(lo), np.abs(hi))
                clipped = (step > 0) & ((w64 > hi + tol) | (w64 < lo - tol))
            else:
                clipped = self._clipped(w64, qp, step)
                lo, hi = _per_entry(qp.lo, w64.shape), _per_entry(qp.hi, w64.shape)
            return clipping_error_model(  # (eq. E5-E6)
                w64, qp.step, clipped, lo, hi, rounding=self.rounding,
                granularity=self.granularity,
            )  # fmt: skip
        if self.rounding == "stochastic":
            axis = 0 if self.granularity == "channel" else None
            m2 = stochastic_rounding_second_moment(w64, qp.step, channel_axis=axis)  # (eq. E2)
            rule = "stochastic"
        else:
            m2 = uniform_error_variance(qp.step)  # (eq. E1): H_U for nearest, exact for dither
            rule = "uniform" if self.rounding == "nearest" else "dither"
        return ErrorModel(m2, 0.0, granularity=self.granularity, random=True, rule=rule)

    def compress(self, w: Any, *, seed: int | np.random.Generator | None = None):
        """The compressor protocol (:mod:`distortion.compression`): quantize ``w``.

        Returns
        -------
        Compressed
            ``values``, ``error``, ``error_model`` and, as ``detail``, the
            :class:`QuantizedTensor`.
        """
        from distortion.compression import Compressed

        qt = self.quantize(w, seed=seed)
        return Compressed(qt.values, qt.error, qt.error_model, self, qt)

    def error_model(
        self, w: Any, *, rule: Literal["uniform", "clipping"] = "uniform"
    ) -> ErrorModel:
        r"""The error model of quantizing ``w`` (no realization needed, data-free).

        Parameters
        ----------
        w : array_like or torch.Tensor
        rule : {"uniform", "clipping"}
            ``"uniform"``: the rounding model of every entry (eq. E1, E2), what
            :meth:`compress` returns. ``"clipping"``: the split of eq. E5–E7 — the clipped
            entries' exact error :math:`\operatorname{clip}(w) - w` as the model's
            ``deterministic`` part (shape of ``w``), rounding noise on the other entries only
            (``second_moment`` per tensor or channel, averaged over all its entries).

        Returns
        -------
        ErrorModel
        """
        if rule not in ("uniform", "clipping"):
            raise ValueError(f"rule must be 'uniform' or 'clipping', got {rule!r}")
        w64, _ = _to_numpy(w)
        _validate(w64, self.granularity)
        return self._error_model(w64, self._qparams64(w64, _dtype_of(w)), rule)

    def _clipped(self, w64: np.ndarray, qp: QuantParams, step: np.ndarray) -> np.ndarray:
        lo, hi = _per_entry(qp.lo, w64.shape), _per_entry(qp.hi, w64.shape)
        if self.bits == 1 and self.scheme == "symmetric":
            lo, hi = 2.0 * lo, 2.0 * hi  # levels ±alpha: beyond ±2 alpha the error exceeds step / 2
        tol = 8 * np.finfo(np.float64).eps * np.maximum(np.abs(lo), np.abs(hi))
        return (step > 0) & ((w64 > hi + tol) | (w64 < lo - tol))

    def to_frame(self):
        """The configuration as a one-row DataFrame."""
        import pandas as pd

        return pd.DataFrame([self.__dict__])


def _as_float64(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        return np.array(values.detach().cpu().numpy(), dtype=np.float64)
    return np.asarray(values, dtype=np.float64)
