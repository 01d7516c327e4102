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
  (eq. E4), which accounts for clipping and the occupancy of the zero bin.

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
        What produced it (``"uniform"``, ``"stochastic"``, ``"empirical"``, ...).
    """

    second_moment: np.ndarray  # () or (C,)
    mean: np.ndarray = field(default_factory=lambda: np.asarray(0.0))  # () or (C,)
    granularity: str = "tensor"
    random: bool = True
    rule: str = "uniform"

    def __post_init__(self) -> None:
        m2 = np.asarray(self.second_moment, dtype=np.float64)
        mu = np.broadcast_to(np.asarray(self.mean, dtype=np.float64), m2.shape).copy()
        if not (np.all(np.isfinite(m2)) and np.all(np.isfinite(mu))):
            raise ValueError("an error model needs finite second moments and means")
        if np.any(m2 < 0):
            raise ValueError("the second moment of an error cannot be negative")
        if self.granularity not in ("tensor", "channel"):
            raise ValueError(
                f"granularity must be 'tensor' or 'channel', got {self.granularity!r}"
            )
        if self.granularity == "tensor" and m2.ndim != 0:
            raise ValueError("a per-tensor error model has a scalar second moment")
        if self.granularity == "channel" and m2.ndim != 1:
            raise ValueError("a per-channel error model has one second moment per channel (C,)")
        object.__setattr__(self, "second_moment", m2)
        object.__setattr__(self, "mean", mu)

    @property
    def variance(self) -> np.ndarray:
        r""":math:`E[e^2] - E[e]^2` per tensor or channel."""
        return np.maximum(self.second_moment - self.mean**2, 0.0)

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
            }
        )
