r"""Error models of a compression: the one place where a perturbation gets its variance.

A compressor (``distortion.compression.Compressor``) returns, with the compressed tensor
:math:`\hat W`, an :class:`ErrorModel` of the perturbation :math:`E = \hat W - W`: its mean
and second moment per tensor or per output channel, and whether :math:`E` is random per
realization (rounding under H_U, dither, stochastic rounding) or deterministic (pruning,
truncation, codebooks fitted to the weights). Every prediction level reads the variance of
the error from here and nowhere else (``theory/error_models.md``):

* nearest rounding under H_U and subtractive dither: :math:`E[e^2] = \Delta^2/12`
  (eq. E1);
* stochastic rounding of :math:`w` with :math:`p = w/\Delta - \lfloor w/\Delta \rfloor`:
  :math:`E[e^2 \mid w] = \Delta^2 p(1-p)` exactly (eq. E2), whose mean over a uniform
  :math:`p` is :math:`\Delta^2/6` (eq. E3);
* ``"empirical"``: the actual mean square :math:`\overline{e^2}` of one realization
  (eq. E4), which accounts for clipping and the occupancy of the zero bin;
* clipping split (:func:`clipping_error_model`): the clipped entries' error
  :math:`\operatorname{clip}(w) - w` is known exactly from the weights (eq. E5) and kept as
  the model's ``deterministic`` part, a known shift of the logits (eq. E7); rounding noise
  acts on the other entries only, :math:`(1 - \pi_c)\Delta^2/12` per channel (eq. E6).

numpy only; no torch, no pandas at import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "ERROR_RULES",
    "UNIFORM_SECOND_MOMENT",
    "ErrorModel",
    "clipping_error_model",
    "empirical_second_moment",
    "stochastic_rounding_second_moment",
    "uniform_error_variance",
]

ErrorRule = Literal["uniform", "empirical"]
#: How a rounding quantizer's error second moment is modelled: from the step alone
#: ("uniform": eq. E1 for nearest/dither, E2 for stochastic) or from the actual error (E4).
ERROR_RULES = ("uniform", "empirical")

#: :math:`E[u^2]` of :math:`u \sim U(-1/2, 1/2)` (eq. E1).
UNIFORM_SECOND_MOMENT = 1.0 / 12.0


def uniform_error_variance(step: Any) -> np.ndarray:
    r"""Variance :math:`\Delta^2/12` of an error uniform on :math:`(-\Delta/2, \Delta/2)`.

    This is the uniform-error hypothesis H_U (eq. E1): nearest rounding of a weight whose
    position in its quantization cell is uniform, or subtractive dither (exact). A zero step
    (a constant channel, returned unchanged) has zero variance.

    Parameters
    ----------
    step : float or array_like
        :math:`\Delta`, per tensor or per channel (non-negative, finite).

    Returns
    -------
    ndarray of the shape of ``step`` (float64)
    """
    s = np.asarray(step, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(
            f"step must hold finite non-negative values (0 for a constant channel), got {step!r}"
        )
    return UNIFORM_SECOND_MOMENT * s**2  # (eq. E1)


def stochastic_rounding_second_moment(
    w: np.ndarray, step: Any, *, channel_axis: int | None = None
) -> np.ndarray:
    r"""Exact :math:`E[e^2]` of stochastic rounding, averaged per tensor or channel.

    Stochastic rounding of :math:`x = w/\Delta` goes up with probability
    :math:`p = x - \lfloor x\rfloor`, so the error is :math:`\Delta(1-p)` with probability
    :math:`p` and :math:`-\Delta p` otherwise: :math:`E[e] = 0` and
    :math:`E[e^2] = \Delta^2 p(1-p)` (eq. E2). Over a uniform :math:`p` its mean is
    :math:`\Delta^2/6` (eq. E3), twice the H_U variance.

    Parameters
    ----------
    w : ndarray
        The weights (unclipped entries; the caller handles clipping).
    step : float or ndarray of shape (C,)
    channel_axis : int or None
        None: one value for the whole tensor; 0: one per output channel (``step`` (C,)).

    Returns
    -------
    ndarray of shape () or (C,)
    """
    w = np.asarray(w, dtype=np.float64)
    s = np.asarray(step, dtype=np.float64)
    if channel_axis is None:
        rows, srow = w.reshape(1, -1), np.reshape(s, (1, 1))
    else:
        rows = w.reshape(w.shape[0], -1)
        srow = s.reshape(-1, 1)
    safe = np.where(srow > 0, srow, 1.0)
    x = rows / safe
    p = x - np.floor(x)
    m2 = np.mean(srow**2 * p * (1.0 - p), axis=1)  # (eq. E2)
    return m2[0] if channel_axis is None else m2


def empirical_second_moment(error: np.ndarray, *, channel_axis: int | None = None) -> np.ndarray:
    r"""Mean square :math:`\overline{e^2}` of an actual error, per tensor or channel (eq. E4)."""
    e = np.asarray(error, dtype=np.float64)
    if channel_axis is None:
        return np.asarray(np.mean(e**2))
    return np.mean(e.reshape(e.shape[0], -1) ** 2, axis=1)


def _group_mean(a: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """Mean per tensor (shape ()) or per output channel on axis 0 (shape (C,))."""
    if channel_axis is None:
        return np.asarray(np.mean(a))
    return np.mean(a.reshape(a.shape[0], -1), axis=1)


def clipping_error_model(
    w: Any,
    step: Any,
    clipped: Any,
    lo: Any,
    hi: Any,
    *,
    rounding: str = "nearest",
    granularity: str = "tensor",
) -> ErrorModel:
    r"""Split the error of a uniform quantizer into its clipping part and rounding noise.

    An entry beyond the outer levels :math:`[\ell, h]` saturates there, so its error is
    known from the weight alone (eq. E5),

    .. math:: d = \operatorname{clip}(w, \ell, h) - w \qquad (w \notin [\ell, h]),

    and enters the prediction as a deterministic shift of the logits (eq. E7). The other
    entries carry rounding noise; per tensor or output channel :math:`c` with a share
    :math:`\pi_c` of clipped entries (eq. E6)

    .. math:: \sigma_c^2 = (1 - \pi_c)\,\frac{\Delta_c^2}{12} \quad\text{(nearest, H_U)},
              \qquad
              \sigma_c^2 = \frac1{n_c}\sum_{i \notin B_c} \Delta_c^2 p_i(1-p_i)
              \quad\text{(stochastic)},

    while subtractive dither adds its offset :math:`U(-\Delta/2, \Delta/2)` to every entry,
    clipped or not: :math:`\sigma_c^2 = \Delta_c^2/12`.

    Parameters
    ----------
    w : ndarray of shape (C, ...)
        The weights (float64).
    step : ndarray of shape () or (C,)
        :math:`\Delta` per tensor or channel.
    clipped : ndarray of bool, shape of ``w``
        The entries outside :math:`[\ell, h]`.
    lo, hi : ndarray broadcastable to the shape of ``w``
        The outer levels :math:`\ell \le 0 \le h` (per entry).
    rounding : {"nearest", "stochastic", "dither"}
    granularity : {"tensor", "channel"}

    Returns
    -------
    ErrorModel
        ``deterministic`` :math:`D` (shape of ``w``, 0 off the clipped entries),
        ``second_moment`` the :math:`\sigma_c^2` of the noise, ``mean`` 0, ``random`` True,
        ``rule`` ``"clipping"``.
    """
    w = np.asarray(w, dtype=np.float64)
    mask = np.asarray(clipped, dtype=bool)
    if mask.shape != w.shape:
        raise ValueError(f"clipped must have the shape of w {w.shape}, got {mask.shape}")
    if rounding not in ("nearest", "stochastic", "dither"):
        raise ValueError(f"rounding must be 'nearest', 'stochastic' or 'dither', got {rounding!r}")
    if granularity not in ("tensor", "channel"):
        raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), w.shape)
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), w.shape)
    d = np.where(mask, np.clip(w, lo, hi) - w, 0.0)  # (eq. E5)
    axis = 0 if granularity == "channel" else None
    s = np.asarray(step, dtype=np.float64)
    if rounding == "dither":
        m2 = uniform_error_variance(s)  # the offset is added to every entry (eq. E6)
    elif rounding == "nearest":
        m2 = uniform_error_variance(s) * (1.0 - _group_mean(mask, axis))  # (eq. E6)
    else:
        se = s if axis is None else s.reshape((-1,) + (1,) * (w.ndim - 1))
        safe = np.where(se > 0, se, 1.0)
        p = w / safe - np.floor(w / safe)
        m2 = _group_mean(np.where(mask, 0.0, se**2 * p * (1.0 - p)), axis)  # (eq. E2, E6)
    return ErrorModel(
        np.asarray(m2, dtype=np.float64), 0.0, granularity=granularity, random=True,
        rule="clipping", deterministic=d,
    )  # fmt: skip


@dataclass(frozen=True)
class ErrorModel:
    r"""Second moment and mean of a compression's perturbation :math:`E = \hat W - W`.

    Attributes
    ----------
    second_moment : ndarray of shape () or (C,)
        :math:`E[e^2]` per entry, per tensor (shape ()) or per output channel (C,). This is
        the :math:`\sigma^2` the first-order model uses (theory/multilayer.md, eq. L4): with
        a zero mean it is the variance.
    mean : ndarray of shape () or (C,)
        :math:`E[e]` per entry (0 for unbiased rounding).
    granularity : {"tensor", "channel"}
    random : bool
        Whether :math:`E` is redrawn per realization (rounding under H_U, dither,
        stochastic) — the band of one realization then applies — or deterministic (pruning,
        truncation, codebooks fitted to the weights).
    rule : str
        What produced it (``"uniform"``, ``"stochastic"``, ``"empirical"``, ``"clipping"``,
        ...).
    deterministic : ndarray of the weight's shape, or None
        A part :math:`D` of the perturbation known exactly from the weights (data-free),
        e.g. the error of the clipped entries (eq. E5): :math:`E = D + N`, and
        ``second_moment`` / ``mean`` then describe the remainder :math:`N` only. A
        prediction propagates :math:`D` through the Jacobian as a known shift of the logits
        (eq. E7) and :math:`N` as noise. None: no known part (:math:`D = 0`).
    """

    second_moment: np.ndarray  # () or (C,)
    mean: np.ndarray = field(default_factory=lambda: np.asarray(0.0))  # () or (C,)
    granularity: str = "tensor"
    random: bool = True
    rule: str = "uniform"
    deterministic: np.ndarray | None = field(default=None, repr=False)  # shape of w

    def __post_init__(self) -> None:
        m2 = np.asarray(self.second_moment, dtype=np.float64)
        mu = np.broadcast_to(np.asarray(self.mean, dtype=np.float64), m2.shape).copy()
        if not (np.all(np.isfinite(m2)) and np.all(np.isfinite(mu))):
            raise ValueError("an error model needs finite second moments and means")
        if np.any(m2 < 0):
            raise ValueError("the second moment of an error cannot be negative")
        if self.granularity not in ("tensor", "channel"):
            raise ValueError(f"granularity must be 'tensor' or 'channel', got {self.granularity!r}")
        if self.granularity == "tensor" and m2.ndim != 0:
            raise ValueError("a per-tensor error model has a scalar second moment")
        if self.granularity == "channel" and m2.ndim != 1:
            raise ValueError("a per-channel error model has one second moment per channel (C,)")
        object.__setattr__(self, "second_moment", m2)
        object.__setattr__(self, "mean", mu)
        if self.deterministic is not None:
            d = np.array(self.deterministic, dtype=np.float64)
            if not np.all(np.isfinite(d)):
                raise ValueError("the deterministic part of an error must be finite")
            if self.granularity == "channel" and (d.ndim == 0 or d.shape[0] != m2.shape[0]):
                raise ValueError(
                    f"a per-channel deterministic part needs {m2.shape[0]} channels on axis 0, "
                    f"got shape {d.shape}"
                )
            d.setflags(write=False)
            object.__setattr__(self, "deterministic", d)

    @property
    def variance(self) -> np.ndarray:
        r""":math:`E[e^2] - E[e]^2` per tensor or channel."""
        return np.maximum(self.second_moment - self.mean**2, 0.0)

    @property
    def deterministic_second_moment(self) -> np.ndarray:
        r""":math:`\frac1{n_c}\sum_i d_i^2` of the deterministic part, () or (C,) (0: none)."""
        if self.deterministic is None:
            return np.zeros(self.second_moment.shape)
        axis = 0 if self.granularity == "channel" else None
        return _group_mean(self.deterministic**2, axis)

    @property
    def total_second_moment(self) -> np.ndarray:
        r""":math:`E[e^2]` of the whole perturbation :math:`D + N` per tensor or channel (eq. E6).

        With the clipping split this is :math:`(1-\pi_c)\Delta_c^2/12 + \overline{d^2}_c`, the
        analogue of eq. A5 for weights; the noise and the shift are uncorrelated (the noise
        has mean 0 and acts on other entries).
        """
        return self.second_moment + self.deterministic_second_moment

    def to_frame(self):
        """One row per tensor or channel."""
        import pandas as pd

        m2 = np.atleast_1d(self.second_moment)
        return pd.DataFrame(
            {
                "channel": np.arange(m2.size) if self.granularity == "channel" else [None],
                "second_moment": m2,
                "mean": np.atleast_1d(self.mean),
                "random": self.random,
                "rule": self.rule,
                "deterministic_second_moment": np.atleast_1d(self.deterministic_second_moment),
            }
        )
