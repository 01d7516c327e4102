r"""Residual expansion (REx): quantize the weights, then the residual, and so on.

:math:`Q_1 = q(W)`, :math:`R_1 = W - Q_1`, :math:`Q_t = q(R_{t-1})`, :math:`R_t = R_{t-1}
- Q_t`; the compressed weight is :math:`\sum_{t\le K} Q_t` and its error is :math:`-R_K`
(theory/compression.md, eq. C14). Each term is a symmetric uniform quantization by
:class:`distortion.quantize.UniformQuantizer` with round-to-nearest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from distortion.compressors._common import check_choice, check_int, finish, prepare
from distortion.quantize import QuantizedTensor, UniformQuantizer
from distortion.theory.error_models import ErrorModel, uniform_error_variance

__all__ = ["ResidualExpansion", "ResidualTerms"]


@dataclass(frozen=True)
class ResidualTerms:
    """The quantized terms of a residual expansion, first to last.

    Attributes
    ----------
    terms : tuple of QuantizedTensor
        Term ``t`` quantizes the residual left by the terms before it (float64 values).
    """

    terms: tuple[QuantizedTensor, ...] = field(repr=False)

    @property
    def steps(self) -> np.ndarray:
        """The step of each term, shape (order,) or (order, C)."""
        return np.stack([t.step for t in self.terms])


@dataclass(frozen=True)
class ResidualExpansion:
    r"""Residual expansion of order K with b-bit symmetric uniform terms (REx).

    Parameters
    ----------
    bits : int
        Bit-width of each term, 1..16.
    order : int
        Number of terms K >= 1 (order 1 is plain symmetric uniform quantization).
    granularity : {"tensor", "channel"}
        One step per term for the tensor, or per output channel and term.

    Notes
    -----
    Nearest rounding leaves :math:`|R_t| \le \Delta_t/2`, so each term's step is at most
    :math:`\Delta_t/(2L)` of the previous one (eq. C15). The error is :math:`-R_K`, the
    rounding error of the last term; its model is H_U on that term,
    :math:`\Delta_K^2/12` per tensor or channel (eq. C16, with E1), ``random=True``.

    References
    ----------
    .. [1] E. Yvinec, A. Dapogny, M. Cord, K. Bailly, "REx: Data-Free Residual
       Quantization Error Expansion", NeurIPS 2023.
    """

    bits: int
    order: int
    granularity: Literal["tensor", "channel"] = "tensor"

    def __post_init__(self) -> None:
        check_int("order", self.order, 1)
        check_choice("granularity", self.granularity, ("tensor", "channel"))
        self.term_quantizer  # noqa: B018 - validates bits

    @property
    def term_quantizer(self) -> UniformQuantizer:
        """The quantizer of every term (symmetric, max clipping, nearest rounding)."""
        return UniformQuantizer(self.bits, scheme="symmetric", granularity=self.granularity)

    def compress(self, w: Any, *, seed: int | None = None):
        """Expand ``w`` (numpy array or torch tensor; channels on axis 0).

        Returns
        -------
        Compressed
            ``detail`` is a :class:`ResidualTerms`.
        """
        from distortion.compression import Compressed

        w64, like = prepare(w, min_ndim=1 if self.granularity == "channel" else 0, what="quantize")
        q = self.term_quantizer
        residual, total, terms = w64, np.zeros_like(w64), []
        for _ in range(self.order):
            qt = q.quantize(residual)
            terms.append(qt)
            total = total + qt.values
            residual = residual - qt.values
        values, error = finish(total, w64, like)
        m2 = uniform_error_variance(terms[-1].step)  # H_U on the last term (eqs. C16, E1)
        model = ErrorModel(m2, 0.0, granularity=self.granularity, random=True, rule="uniform")
        return Compressed(values, error, model, self, ResidualTerms(tuple(terms)))
