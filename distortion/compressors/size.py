r"""Storage size of a compressed tensor: the one rule that size budgets ask
(``theory/compression.md`` §9, eqs. C18–C23).

Two measures, both counted from the compressor's own result (``Compressed.detail``):

* ``parameters`` — the numbers a compressed layer keeps (kept weights of a pruned tensor,
  :math:`r(C_{out} + K)` factor entries of a rank-r one, every code of a quantized one): the
  unit of a *global sparsity* or *parameter* budget;
* ``bits`` — its storage in bits, with ``float_bits`` per stored real number (side
  information included: steps, codebooks, pruning masks): the unit of a *model size* budget.

numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CompressedSize", "compressed_size"]


@dataclass(frozen=True)
class CompressedSize:
    """Storage of one compressed tensor.

    Attributes
    ----------
    parameters : int
        Stored numbers (eq. C18-C22).
    bits : int
        Storage in bits, side information included.
    entries : int
        Entries of the dense tensor (``parameters / entries`` is the kept fraction).
    """

    parameters: int
    bits: int
    entries: int

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"parameters": self.parameters, "bits": self.bits,
                              "entries": self.entries}])  # fmt: skip


def _check_float_bits(float_bits: Any) -> int:
    if isinstance(float_bits, bool) or not isinstance(float_bits, int | np.integer) \
            or not 1 <= float_bits <= 64:  # fmt: skip
        raise ValueError(f"float_bits must be an integer in 1..64, got {float_bits!r}")
    return int(float_bits)


def _code_bits(levels: int) -> int:
    """Bits of one index into ``levels`` levels (at least 1)."""
    return max(1, math.ceil(math.log2(levels))) if levels > 1 else 1


def _side_and_code(detail: Any, f: int, compressor: Any = None) -> tuple[int, int] | None:
    """(bits per code, side-information bits) of a quantized tensor, None when ``detail`` is
    not one (eqs. C20-C22)."""
    from distortion.compressors.codebook import CodebookTensor, NonUniformQuantizer
    from distortion.compressors.residual import ResidualTerms
    from distortion.quantize import QuantizedTensor

    if isinstance(detail, QuantizedTensor):  # eq. C20: b bits a code, a step (and zero) a group
        q = detail.quantizer
        groups = int(np.asarray(detail.step).size)
        side = groups * f * (1 if q.scheme == "symmetric" else 2)
        return int(q.bits), side
    if isinstance(detail, CodebookTensor):  # eq. C21: an index a code, and the codebooks
        book = np.asarray(detail.codebook)
        if isinstance(compressor, NonUniformQuantizer):  # a fixed grid: a scale per group
            side = (int(book.shape[0]) if book.ndim == 2 else 1) * f
            if detail.exponent is not None:  # and the power grid's exponent
                side += int(np.asarray(detail.exponent).size) * f
        else:  # fitted levels (k-means): every level is stored
            side = int(book.size) * f
        return _code_bits(int(book.shape[-1])), side
    if isinstance(detail, ResidualTerms):  # eq. C22: the terms' codes and steps, summed
        per = [_side_and_code(t, f) for t in detail.terms]
        return sum(p[0] for p in per), sum(p[1] for p in per)
    return None


def compressed_size(compressed: Any, *, float_bits: int = 32) -> CompressedSize:
    r"""Parameters and bits of a compressed tensor (``theory/compression.md`` eqs. C18–C23).

    Parameters
    ----------
    compressed : Compressed
        A compressor's result; its ``detail`` says what is stored.
    float_bits : int, default 32
        Bits of one stored real number (kept weights, factors, steps, codebook levels).

    Returns
    -------
    CompressedSize

    Notes
    -----
    * dense (no detail, or an unknown one): :math:`n` parameters, :math:`nf` bits;
    * pruning (C18): the :math:`k` kept weights and a one-bit mask, :math:`kf + n` bits
      (filter pruning: :math:`k` weights, no mask: the kept filters are listed, one bit each);
    * rank r of a :math:`C_{out}\times K` matrix (C19): :math:`r(C_{out}+K)` numbers;
    * uniform rounding (C20): :math:`n` codes of b bits and one step (and zero point) per
      group; codebooks (C21): :math:`n` indices of :math:`\lceil\log_2 Q\rceil` bits and
      :math:`Q` levels per group (k-means), or one scale per group (and the power grid's
      exponent) for a fixed grid; residual expansion (C22): the sum over its terms;
    * composition (C23): the last stage's codes on the entries that are not pruned, its side
      information, and the mask when something was pruned.
    """
    from distortion.compressors.compose import ComposedTensor
    from distortion.compressors.lowrank import LowRankFactors
    from distortion.compressors.pruning import PrunedTensor

    f = _check_float_bits(float_bits)
    err = getattr(compressed, "error", None)
    if err is None:
        raise ValueError("compressed must be a Compressed (a compressor's result), got "
                         f"{type(compressed).__name__}")  # fmt: skip
    n = int(np.asarray(err).size)
    detail = getattr(compressed, "detail", None)
    if isinstance(detail, PrunedTensor):
        kept = np.asarray(detail.kept, dtype=bool)
        k = int(kept.sum())
        if getattr(compressed.compressor, "pattern", None) == "filter":  # a bit per filter
            return CompressedSize(k, k * f + int(kept.shape[0]), n)
        return CompressedSize(k, k * f + n, n)
    if isinstance(detail, LowRankFactors):
        p = int(detail.left.size + detail.right.size)
        return CompressedSize(p, p * f, n)
    if isinstance(detail, ComposedTensor):
        pruned = np.asarray(detail.pruned, dtype=bool)
        k = n - int(pruned.sum())
        last = detail.stages[-1]
        sc = _side_and_code(last.detail, f, last.compressor)
        mask = n if pruned.any() else 0
        if sc is None:  # the last stage stores reals: its own size on the kept entries
            inner = compressed_size(last, float_bits=f)
            params = min(inner.parameters, k) if pruned.any() else inner.parameters
            return CompressedSize(params, params * f + mask, n)
        code, side = sc
        return CompressedSize(k, k * code + side + mask, n)
    sc = _side_and_code(detail, f, getattr(compressed, "compressor", None))
    if sc is not None:
        code, side = sc
        return CompressedSize(n, n * code + side, n)
    return CompressedSize(n, n * f, n)
