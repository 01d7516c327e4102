r"""The compressor protocol: a compressed tensor and the error model of its perturbation.

Every compression — uniform rounding today, pruning, low-rank truncation, codebooks and
activation quantizers next — is a *compressor*: an object with

``compress(w, *, seed=None) -> Compressed``

that returns the compressed tensor :math:`\hat W` (same type, dtype and device as ``w``,
which is never modified), the actual perturbation :math:`E = \hat W - W` in float64, and
its :class:`~distortion.theory.error_models.ErrorModel` (mean and second moment per tensor
or per output channel, random or deterministic). The prediction levels consume one of the
three (ARCHITECTURE.md, "Phase 2"):

* levels 1 and 3 (and 3L) — the error model alone: "noise with this second moment";
* level 2 (and 2L) — the actual perturbation, through the Jacobian;
* level 4 — the compressed network, measured.

Everything that needs an error variance asks :meth:`Compressed.error_model` (or
:func:`error_second_moment`), never a formula of its own; the rules live in
:mod:`distortion.theory.error_models`.

numpy only (torch tensors pass through the compressors untouched).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from distortion.theory.error_models import ERROR_RULES, ErrorModel

__all__ = ["Compressed", "Compressor", "error_second_moment", "realization_seed"]


@runtime_checkable
class Compressor(Protocol):
    """What every compressor implements (see the module docstring)."""

    def compress(self, w: Any, *, seed: int | None = None) -> Compressed:  # pragma: no cover
        ...


@dataclass(frozen=True)
class Compressed:
    r"""A compressed tensor with its actual perturbation and its error model.

    Attributes
    ----------
    values : array or tensor, shape of the input
        :math:`\hat W`, of the input's type, dtype and device.
    error : ndarray of float64, shape of the input
        :math:`E = \hat W - W`.
    error_model : ErrorModel
        The model of :math:`E` that levels 1 and 3 use.
    compressor : Compressor
        The configuration that produced it.
    detail : object
        The compressor's own result (e.g. a :class:`~distortion.quantize.QuantizedTensor`).
    """

    values: Any  # shape of w
    error: np.ndarray = field(repr=False)  # shape of w
    error_model: ErrorModel
    compressor: Any = field(repr=False, default=None)
    detail: Any = field(repr=False, default=None)

    @property
    def second_moment(self) -> np.ndarray:
        r""":math:`E[e^2]` of the error model, () per tensor or (C,) per channel."""
        return self.error_model.second_moment

    def to_frame(self):
        """The error model, one row per tensor or channel, with the actual mean square."""
        from distortion.theory.error_models import empirical_second_moment

        df = self.error_model.to_frame()
        axis = 0 if self.error_model.granularity == "channel" else None
        df["actual_second_moment"] = np.atleast_1d(
            empirical_second_moment(self.error, channel_axis=axis)
        )
        return df


def error_second_moment(compressed: Compressed, rule: str = "uniform") -> np.ndarray:
    r"""The :math:`\sigma^2` a prediction uses for one compressed layer.

    Parameters
    ----------
    compressed : Compressed
    rule : {"uniform", "empirical"}
        ``"uniform"``: the compressor's error model (for rounding, H_U: :math:`\Delta^2/12`
        for nearest and dither, the exact :math:`\Delta^2 p(1-p)` for stochastic rounding);
        ``"empirical"``: the actual mean square of this realization.

    Returns
    -------
    ndarray of shape () or (C,)
    """
    from distortion.theory.error_models import empirical_second_moment

    if rule not in ERROR_RULES:
        raise ValueError(f"rule must be one of {ERROR_RULES}, got {rule!r}")
    if not isinstance(compressed, Compressed):
        raise ValueError(f"compressed must be a Compressed, got {type(compressed).__name__}")
    if rule == "uniform":
        return compressed.error_model.second_moment
    axis = 0 if compressed.error_model.granularity == "channel" else None
    return empirical_second_moment(compressed.error, channel_axis=axis)


def realization_seed(seed: int | None, *parts: int) -> int | None:
    """A seed for one realization, derived from the run's ``seed`` and integer ``parts``.

    The same (seed, parts) give the same value on every platform, different parts give
    independent streams (numpy's ``SeedSequence``), and ``None`` stays ``None``.
    """
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    ss = np.random.SeedSequence([int(seed), *(int(p) for p in parts)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])
