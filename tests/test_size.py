"""The storage rule of compressed tensors (theory/compression.md eqs. C18-C23), counted by
hand on a small tensor."""

from __future__ import annotations

import numpy as np
import pytest

from distortion.compressors import (
    Compose,
    KMeansQuantizer,
    LowRank,
    MagnitudePruner,
    NonUniformQuantizer,
    ResidualExpansion,
)
from distortion.compressors.size import CompressedSize, compressed_size
from distortion.quantize import UniformQuantizer

W = np.random.default_rng(0).normal(size=(8, 3, 3, 3))  # n = 216, C = 8, K = 27
N, C, K = 216, 8, 27


@pytest.mark.parametrize(("compressor", "params", "bits"), [
    (MagnitudePruner(0.5), 108, 108 * 32 + N),  # C18: kept weights and a one-bit mask
    (MagnitudePruner(0.25, pattern="filter"), 6 * K, 6 * K * 32 + C),  # 6 filters kept
    (MagnitudePruner(None, pattern="n:m", n=2, m=4), None, None),  # 27 % 4 != 0: not here
    (LowRank(rank=2), 2 * (C + K), 2 * (C + K) * 32),  # C19
    (UniformQuantizer(4), N, N * 4 + 32),  # C20: one step
    (UniformQuantizer(4, granularity="channel"), N, N * 4 + C * 32),
    (UniformQuantizer(4, scheme="asymmetric"), N, N * 4 + 2 * 32),  # a step and a zero point
    (KMeansQuantizer(16), N, N * 4 + 16 * 32),  # C21: the fitted levels
    (KMeansQuantizer(5), N, N * 3 + 5 * 32),  # ceil(log2 5) = 3 bits an index
    (NonUniformQuantizer(4, grid="nf4", granularity="channel"), N, N * 4 + C * 32),  # a scale
    (NonUniformQuantizer(4, grid="power"), N, N * 4 + 32 + 32),  # a scale and the exponent
    (ResidualExpansion(3, order=2), N, 2 * (N * 3 + 32)),  # C22
    (Compose(MagnitudePruner(0.5), UniformQuantizer(4)), 108, 108 * 4 + 32 + N),  # C23
    (Compose(MagnitudePruner(0.5), KMeansQuantizer(4)), 108, 108 * 2 + 4 * 32 + N),
    (Compose(UniformQuantizer(8), UniformQuantizer(4)), N, N * 4 + 32),  # nothing pruned
])  # fmt: skip
def test_sizes_by_hand(compressor, params, bits):
    if params is None:
        with pytest.raises(ValueError):
            compressor.compress(W)
        return
    size = compressed_size(compressor.compress(W))
    assert size == CompressedSize(params, bits, N)
    assert size.to_frame().iloc[0].to_dict() == {"parameters": params, "bits": bits, "entries": N}


def test_float_bits_and_bad_input():
    c = LowRank(rank=1).compress(W)
    assert compressed_size(c, float_bits=16).bits == (C + K) * 16
    with pytest.raises(ValueError, match="float_bits"):
        compressed_size(c, float_bits=0)
    with pytest.raises(ValueError, match="Compressed"):
        compressed_size(W)
