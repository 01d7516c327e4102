r"""Compressors beyond uniform rounding: pruning, low rank, codebooks, residual expansion.

Every class here implements the compressor protocol of :mod:`distortion.compression`,
``compress(w, *, seed=None) -> Compressed``, with the error model of its perturbation
(derived in ``theory/compression.md``, eqs. C1–C17):

* :class:`MagnitudePruner` — unstructured, N:M and filter pruning, per layer or global;
* :class:`LowRank` — truncated SVD to a rank or an energy fraction;
* :class:`KMeansQuantizer` — 1-D k-means weight sharing (Lloyd, or exact by DP);
* :class:`NonUniformQuantizer` — power companding, powers of two, NF4;
* :class:`ResidualExpansion` — REx: uniform terms on the successive residuals;
* :class:`Compose` — several in order, pruned entries held at 0;
* :func:`compressed_size` — what a compressed tensor stores, in parameters and bits (the
  rule of size budgets, eqs. C18–C23).

numpy only at import; torch tensors in give torch tensors out (same dtype and device), and
the input is never modified.
"""

from distortion.compressors.codebook import (
    NF4_TABLE,
    POWER_EXPONENTS,
    CodebookTensor,
    KMeansQuantizer,
    NonUniformQuantizer,
    kmeans_1d,
    log2_levels,
    nf4_levels,
)
from distortion.compressors.compose import Compose, ComposedTensor
from distortion.compressors.lowrank import LowRank, LowRankFactors
from distortion.compressors.pruning import MagnitudePruner, PrunedTensor
from distortion.compressors.residual import ResidualExpansion, ResidualTerms
from distortion.compressors.size import CompressedSize, compressed_size

__all__ = [
    "NF4_TABLE",
    "POWER_EXPONENTS",
    "CodebookTensor",
    "CompressedSize",
    "Compose",
    "ComposedTensor",
    "KMeansQuantizer",
    "LowRank",
    "LowRankFactors",
    "MagnitudePruner",
    "NonUniformQuantizer",
    "PrunedTensor",
    "ResidualExpansion",
    "ResidualTerms",
    "compressed_size",
    "kmeans_1d",
    "log2_levels",
    "nf4_levels",
]
