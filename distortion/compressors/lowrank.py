r"""Low-rank truncation: the best rank-r approximation of a weight matrix (truncated SVD).

A weight of shape (C_out, C_in, k, k) is the matrix (C_out, C_in·k·k); its truncated SVD
:math:`\hat W = U_r \Sigma_r V_r^\top` is the closest rank-r matrix in Frobenius norm
(Eckart–Young), with :math:`\lVert E\rVert_F^2 = \sum_{i>r}\sigma_i^2`
(theory/compression.md, eq. C5).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distortion.compressors._common import (
    blas_single_thread,
    check_int,
    exact_error_model,
    finish,
    prepare,
)

__all__ = ["LowRank", "LowRankFactors"]


@dataclass(frozen=True)
class LowRankFactors:
    r"""The factors of a truncated SVD, :math:`\hat W = \text{left}\cdot\text{right}`.

    Attributes
    ----------
    left : ndarray of shape (C_out, r)
        :math:`U_r\Sigma_r`.
    right : ndarray of shape (r, K)
        :math:`V_r^\top`, ``K`` the flattened input size.
    singular_values : ndarray of shape (min(C_out, K),)
        All the singular values of the matrix, descending.
    rank : int
    """

    left: np.ndarray = field(repr=False)  # (C_out, r)
    right: np.ndarray = field(repr=False)  # (r, K)
    singular_values: np.ndarray = field(repr=False)  # (min(C_out, K),)
    rank: int

    @property
    def discarded_energy(self) -> float:
        r""":math:`\sum_{i>r}\sigma_i^2 = \lVert E\rVert_F^2` (eq. C5)."""
        return float(np.sum(self.singular_values[self.rank :] ** 2))

    @property
    def kept_energy_fraction(self) -> float:
        r""":math:`\sum_{i\le r}\sigma_i^2 / \sum_i\sigma_i^2` (1 for a zero matrix)."""
        total = float(np.sum(self.singular_values**2))
        return 1.0 if total == 0 else float(np.sum(self.singular_values[: self.rank] ** 2)) / total


@dataclass(frozen=True)
class LowRank:
    r"""Truncated SVD of each weight tensor, to a fixed rank or a fixed energy.

    Parameters
    ----------
    rank : int, optional
        The rank r, :math:`1 \le r \le \min(C_{out}, K)` (checked against each tensor).
    energy : float in (0, 1], optional
        Keep the smallest rank whose singular values hold at least this fraction of
        :math:`\sum_i \sigma_i^2` (eq. C6). Exactly one of ``rank`` and ``energy``.

    Notes
    -----
    The values are :math:`(U_r\Sigma_r)V_r^\top` reshaped to the input's shape. The error
    model is per output channel, the actual row mean square of the residual (exact and
    deterministic); summed over the tensor it is :math:`\sum_{i>r}\sigma_i^2` (eq. C5).
    """

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise ValueError(
                f"give exactly one of rank and energy, got rank={self.rank!r}, "
                f"energy={self.energy!r}"
            )
        if self.rank is not None:
            check_int("rank", self.rank, 1)
        else:
            e = self.energy
            if (
                isinstance(e, bool)
                or not isinstance(e, int | float | np.integer | np.floating)
                or not 0.0 < float(e) <= 1.0
            ):
                raise ValueError(f"energy must be a fraction in (0, 1], got {e!r}")

    def compress(self, w: Any, *, seed: int | None = None):
        """Truncate ``w`` (at least 2 axes; channels on axis 0).

        Parameters
        ----------
        w : array_like or torch.Tensor of shape (C_out, ...)
        seed : ignored (deterministic)

        Returns
        -------
        Compressed
            ``detail`` is a :class:`LowRankFactors`.
        """
        w64, like = prepare(w, min_ndim=2, what="factorize")
        mat = w64.reshape(w64.shape[0], -1)
        small = mat.size <= SMALL_MATRIX  # one BLAS thread: see blas_single_thread
        with blas_single_thread() if small else contextlib.nullcontext():
            return self._truncate(w64, like, mat)

    def _truncate(self, w64: np.ndarray, like: Any, mat: np.ndarray):
        from distortion.compression import Compressed

        full = min(mat.shape)
        if self.rank is not None and self.rank > full:
            raise ValueError(
                f"rank must be in 1..min{mat.shape} = {full} for w of shape "
                f"{w64.shape!r}, got {self.rank!r}"
            )
        u, s, vt = _cached_svd(mat)  # read-only: what the result holds is its own
        r = int(self.rank) if self.rank is not None else _energy_rank(s, float(self.energy))
        left, right = u[:, :r] * s[:r], vt[:r].copy()
        values, error = finish((left @ right).reshape(w64.shape), w64, like)
        model = exact_error_model(error, "channel", "lowrank")
        return Compressed(values, error, model, self, LowRankFactors(left, right, s.copy(), r))


#: Matrices up to this many entries are factorized and rebuilt on one BLAS thread.
SMALL_MATRIX = 2**20
#: Most bytes of factors :func:`_cached_svd` keeps (least recently used dropped first).
SVD_CACHE_BYTES = 256 * 2**20
_svd_cache: OrderedDict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
_svd_lock = threading.Lock()
_svd_bytes = 0  # bytes held by _svd_cache


def _cached_svd(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_thin_svd` of ``mat``, remembered by its shape and the sha256 of its bytes.

    The decomposition does not depend on the rank or energy asked for, so a grid of
    configurations over the same weights (``AccuracyLossEstimator.predict``, the study, the
    allocation) factorizes each matrix once; the factors are returned read-only. At most
    :data:`SVD_CACHE_BYTES` are kept in memory, least recently used dropped first.
    """
    m = np.ascontiguousarray(mat, dtype=np.float64)
    key = (m.shape, hashlib.sha256(memoryview(m).cast("B")).hexdigest())
    with _svd_lock:
        hit = _svd_cache.get(key)
        if hit is not None:
            _svd_cache.move_to_end(key)
            return hit
    factors = _thin_svd(m)
    for f in factors:
        f.flags.writeable = False
    global _svd_bytes
    with _svd_lock:
        if not _svd_cache:  # emptied (``_svd_cache.clear()``): nothing held
            _svd_bytes = 0
        if key not in _svd_cache:
            _svd_bytes += sum(f.nbytes for f in factors)
        _svd_cache[key] = factors
        while _svd_bytes > SVD_CACHE_BYTES and len(_svd_cache) > 1:
            _, old = _svd_cache.popitem(last=False)
            _svd_bytes -= sum(f.nbytes for f in old)
    return factors


def _thin_svd(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Thin SVD :math:`M = U\Sigma V^\top`; a wide matrix (a convolution's (C_out,
    C_in·k·k)) through the QR factorization of its transpose, :math:`M^\top = QR`,
    :math:`R^\top = U\Sigma W^\top`, :math:`V = QW` — the same factors (up to the signs of
    the singular vectors and rounding; both are backward stable), at the cost of an SVD of
    the small square :math:`R` instead of the wide matrix.
    """
    rows, cols = mat.shape
    if cols <= 2 * rows:
        return np.linalg.svd(mat, full_matrices=False)
    q, r = np.linalg.qr(mat.T, mode="reduced")  # (cols, rows), (rows, rows)
    u, s, wt = np.linalg.svd(r.T)
    return u, s, wt @ q.T


def _energy_rank(s: np.ndarray, energy: float) -> int:
    r"""Smallest r with :math:`\sum_{i\le r}\sigma_i^2 \ge \text{energy}\sum_i\sigma_i^2` (C6)."""
    cum = np.cumsum(s**2)
    if cum[-1] == 0:
        return 1
    frac = cum / cum[-1]  # the last is exactly 1
    return int(np.searchsorted(frac, energy, side="left")) + 1
