r"""Result types shared by every stage: intervals, bands and the one shape of a prediction.

The vocabulary (``theory/GLOSSARY.md``):

flip rate
    The fraction of decisions (argmax of the logits) that compression changes.
accuracy loss
    Accuracy of the float network minus that of the compressed one (a fraction; positive
    when compression hurts).
level
    What a prediction assumes: ``"1"`` Gaussian features and the error model,
    ``"2"`` Gaussian features and the actual error, ``"3"`` empirical features and the
    error model (last layer); ``"2L"`` the network linearized in its weights and moved by
    the actual error, ``"3L"`` the same linearization with the error model (all layers);
    ``"4"`` measured.
band
    A prediction interval for the value of *one realization* of the compression error
    (:class:`Band`): what a single deterministic compression is judged against.
stderr
    The standard error of an estimate (Monte-Carlo integration, or sampling over images):
    ``<quantity>_stderr``.
confidence interval
    An interval for an estimated quantity at a confidence level
    (:class:`ConfidenceInterval`, ``confidence_interval(confidence_level=0.95)``).
realization
    One draw of the compression error (one rounding with one seed).
error model
    The second moment and mean of the perturbation :math:`E = \hat W - W` per tensor or
    output channel (:class:`distortion.theory.error_models.ErrorModel`).

numpy only at import time (pandas is imported by ``to_frame``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Band",
    "ConfidenceInterval",
    "Prediction",
    "check_confidence_level",
    "deprecated_alias",
    "resolution_tolerance",
]


def check_confidence_level(confidence_level: Any, name: str = "confidence_level") -> float:
    """``confidence_level`` as a float in (0, 1), or a ValueError that says so."""
    if isinstance(confidence_level, bool) or not isinstance(
        confidence_level, int | float | np.floating | np.integer
    ):
        raise ValueError(f"{name} must be a number in (0, 1), got {confidence_level!r}")
    c = float(confidence_level)
    if not 0.0 < c < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {confidence_level!r}")
    return c


def resolution_tolerance(n: int) -> float:
    """Half the resolution :math:`1/n` of a rate measured on ``n`` images.

    Two rates measured on the same ``n`` images differ by multiples of :math:`1/n`, so a band
    edge and a measured value closer than half of it are equal up to round-off (a measured
    loss of -0.0002 against an edge of -0.00019999999999997797 is *in* the band).
    """
    if n <= 0:
        raise ValueError(f"n must be a positive number of images, got {n!r}")
    return 0.5 / n


class Band(NamedTuple):
    """Prediction interval for the value of one realization: ``(low, high)``.

    NaN ends mean "no band" (not enough realizations, or no labels).
    """

    low: float
    high: float

    def contains(self, value: float, *, tol: float = 0.0) -> bool:
        """Whether ``value`` lies in ``[low - tol, high + tol]`` (False for a NaN band)."""
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return False
        return bool(self.low - tol <= value <= self.high + tol)


@dataclass(frozen=True)
class ConfidenceInterval:
    """A confidence interval of an estimate.

    It unpacks and indexes as the pair ``(low, high)``, as the tuples it replaces did.

    Attributes
    ----------
    low, high : float
    confidence_level : float
        Nominal coverage, in (0, 1).
    method : str
        How it was computed (``"clopper-pearson"``, ``"normal"``, ``"t"``, ...).
    """

    low: float
    high: float
    confidence_level: float = 0.95
    method: str = ""

    def __post_init__(self) -> None:
        check_confidence_level(self.confidence_level)

    def __iter__(self):
        return iter((self.low, self.high))

    def __getitem__(self, i: int) -> float:
        return (self.low, self.high)[i]

    def __len__(self) -> int:
        return 2

    def contains(self, value: float, *, tol: float = 0.0) -> bool:
        """Whether ``value`` lies in ``[low - tol, high + tol]`` (False when NaN)."""
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return False
        return bool(self.low - tol <= value <= self.high + tol)

    @property
    def width(self) -> float:
        return self.high - self.low


def normal_interval(
    estimate: float, stderr: float, confidence_level: float = 0.95
) -> ConfidenceInterval:
    """``estimate ± z stderr`` (NaN ends when the standard error is not finite)."""
    from scipy import stats

    c = check_confidence_level(confidence_level)
    if not np.isfinite(stderr):
        return ConfidenceInterval(float("nan"), float("nan"), c, "normal")
    h = float(stats.norm.ppf(0.5 + c / 2)) * float(stderr)
    return ConfidenceInterval(float(estimate) - h, float(estimate) + h, c, "normal")


_NAN_BAND = Band(float("nan"), float("nan"))


@dataclass(frozen=True)
class Prediction:
    r"""A predicted flip rate and accuracy loss — the same fields at every level.

    Attributes
    ----------
    level : str
        ``"1"``, ``"2"``, ``"3"`` (last layer), ``"2L"``, ``"3L"`` (all layers) or a baseline
        name (``"sakr"``); see the module docstring.
    flip_rate, flip_rate_stderr : float
        Expected flip rate and the standard error of its computation (0 when exact, NaN
        when unknown).
    flip_rate_band : Band
        Prediction interval of the flip rate of one realization (NaN when none).
    accuracy_loss, accuracy_loss_stderr : float
        Expected accuracy loss (NaN without labels) and its standard error.
    accuracy_loss_band : Band
    accuracy_float, accuracy_compressed : float
    n_samples : int
        Images (or draws) the prediction rests on.
    coverage : float
        Nominal coverage of the bands.
    method : str
        How it was integrated (``"orthant"``, ``"montecarlo"``, ``"radial"``, ...).
    """

    level: str
    flip_rate: float
    flip_rate_stderr: float = float("nan")
    flip_rate_band: Band = _NAN_BAND
    accuracy_loss: float = float("nan")
    accuracy_loss_stderr: float = float("nan")
    accuracy_loss_band: Band = _NAN_BAND
    accuracy_float: float = float("nan")
    accuracy_compressed: float = float("nan")
    n_samples: int = 0
    coverage: float = 0.95
    method: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "flip_rate_band", Band(*map(float, self.flip_rate_band)))
        object.__setattr__(self, "accuracy_loss_band", Band(*map(float, self.accuracy_loss_band)))

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """The fields as a flat dict; band ends become ``<quantity>_low`` / ``_high``."""
        fb, lb = self.flip_rate_band, self.accuracy_loss_band
        d = {
            "flip_rate": self.flip_rate,
            "flip_rate_stderr": self.flip_rate_stderr,
            "flip_rate_low": fb.low,
            "flip_rate_high": fb.high,
            "accuracy_loss": self.accuracy_loss,
            "accuracy_loss_stderr": self.accuracy_loss_stderr,
            "accuracy_loss_low": lb.low,
            "accuracy_loss_high": lb.high,
        }
        out = {f"{prefix}{k}": float(v) for k, v in d.items()}
        if not prefix:
            out = {
                "level": self.level,
                **out,
                "accuracy_float": self.accuracy_float,
                "accuracy_compressed": self.accuracy_compressed,
                "n_samples": self.n_samples,
                "coverage": self.coverage,
                "method": self.method,
            }
        return out

    def to_frame(self):
        """One-row DataFrame of :meth:`as_dict`."""
        import pandas as pd

        return pd.DataFrame([self.as_dict()])


def deprecated_alias(new_name: str, old_name: str, value: Any) -> Any:
    """Warn that ``old_name`` is deprecated in favour of ``new_name`` and return ``value``."""
    warnings.warn(
        f"{old_name} is deprecated and will be removed in the next release; use {new_name}",
        DeprecationWarning,
        stacklevel=3,
    )
    return value
