r"""Helpers shared by the compressors: conversion, validation, exact error models.

The conversion follows :mod:`distortion.quantize`: a torch tensor is read with
``.detach().cpu().numpy()`` and written back with its own ``new_tensor`` (same dtype and
device), so torch is never imported; arithmetic is float64; the input is never modified.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distortion.quantize import _as_float64, _from_numpy, _to_numpy
from distortion.theory.error_models import ErrorModel

__all__ = [
    "blas_single_thread",
    "check_choice",
    "check_int",
    "exact_error_model",
    "finish",
    "group_rows",
    "nearest_level",
    "prepare",
]


_controller: Any = None


def blas_single_thread():
    """A context in which numpy's BLAS runs on one thread.

    Compressing layer after layer interleaves small BLAS calls (numpy) with tensor copies
    (torch): each library's worker threads then spin while the other's run, and on a
    2-core machine a 64×40 by 40×576 product took 8.6 ms instead of 0.1 ms beside a torch
    copy (0.74 ms with one BLAS thread). :class:`~distortion.compressors.LowRank` uses it for
    matrices of up to ``SMALL_MATRIX`` entries. Without threadpoolctl this is a no-op.
    """
    global _controller
    from contextlib import nullcontext

    try:
        if _controller is None:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
        return _controller.limit(limits=1, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return nullcontext()


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in ``lo..hi`` (bools and non-integers are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {'in ' if hi is not None else ''}{rng}, got {value!r}")
    return int(value)


def prepare(w: Any, *, min_ndim: int = 0, what: str = "compress") -> tuple[np.ndarray, Any]:
    """A float64 copy of ``w`` and the object to convert back to, after the common checks.

    Raises ``ValueError`` for an empty tensor, non-finite entries, non-real dtypes, or
    fewer than ``min_ndim`` axes.
    """
    w64, like = _to_numpy(w)
    if w64.size == 0:
        raise ValueError(f"w is empty: there is nothing to {what}")
    if not np.all(np.isfinite(w64)):
        bad = int(w64.size - np.count_nonzero(np.isfinite(w64)))
        raise ValueError(
            f"w holds {bad} non-finite value(s) (NaN or inf): {what} finite weights only"
        )
    if w64.ndim < min_ndim:
        raise ValueError(f"w needs at least {min_ndim} axes, got shape {w64.shape!r}")
    return w64, like


def finish(values64: np.ndarray, w64: np.ndarray, like: Any) -> tuple[Any, np.ndarray]:
    """The values in the input's type, dtype and device, and the actual error (float64)."""
    values = _from_numpy(np.ascontiguousarray(values64), like)
    return values, _as_float64(values) - w64


def group_rows(x: np.ndarray, granularity: str) -> np.ndarray:
    """``x`` as (groups, entries): one group for the tensor, or one per output channel."""
    if granularity == "tensor" or x.ndim == 0:
        return x.reshape(1, -1)
    return x.reshape(x.shape[0], -1)


def exact_error_model(error: np.ndarray, granularity: str, rule: str) -> ErrorModel:
    r"""The actual mean square and mean of ``error`` per tensor or channel, deterministic.

    For a compression that is a deterministic function of the weights the error model *is*
    the actual perturbation's moments (theory/compression.md, eq. C1).
    """
    granularity = "tensor" if error.ndim == 0 else granularity
    rows = group_rows(error, granularity)
    m2, mu = np.mean(rows**2, axis=1), np.mean(rows, axis=1)
    if granularity == "tensor":
        m2, mu = m2.reshape(()), mu.reshape(())
    return ErrorModel(m2, mu, granularity=granularity, random=False, rule=rule)


def nearest_level(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    r"""Index of the level nearest to each entry of ``x``; ``levels`` sorted ascending (Q,).

    An entry exactly halfway between two levels goes to the one of smaller magnitude (the
    lower one when both magnitudes are equal), so rounding is symmetric about 0. A value
    equal to a level maps to it: quantizing with the same codebook twice changes nothing.

    Parameters
    ----------
    x : ndarray of float64, any shape
    levels : ndarray of float64, shape (Q,), non-decreasing

    Returns
    -------
    ndarray of int64, shape of ``x``
    """
    q = levels.size
    if q == 1:
        return np.zeros(x.shape, dtype=np.int64)
    j = np.clip(_search_left(levels, x), 1, q - 1)
    lo, hi = levels[j - 1], levels[j]
    d_lo, d_hi = np.abs(x - lo), np.abs(x - hi)
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (np.abs(hi) < np.abs(lo)))
    return np.where(up, j, j - 1).astype(np.int64)


#: Buckets of the lookup table :func:`_search_left` uses; below this many entries it
#: calls ``searchsorted`` directly.
_BUCKETS = 4096


def _search_left(levels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``np.searchsorted(levels, x, side="left")``, through a lookup table for many entries.

    ``searchsorted`` of unsorted entries costs a branchy binary search each. The table
    gives, per bucket of a uniform partition of [levels[0], levels[-1]], the answer at the
    bucket's left edge; an entry keeps it when ``levels[i-1] < x <= levels[i]`` confirms it
    (the defining property of the answer ``i``), and the few that do not — in a bucket
    holding a level, or pushed across a bucket edge by rounding — are searched exactly.
    """
    if x.size < 4 * _BUCKETS or levels[-1] == levels[0]:
        return np.searchsorted(levels, x, side="left")
    lo, hi = float(levels[0]), float(levels[-1])
    scale = _BUCKETS / (hi - lo)
    edges = lo + np.arange(_BUCKETS) / scale
    table = np.searchsorted(levels, edges, side="left")
    with np.errstate(invalid="ignore"):  # non-finite entries: searched exactly below
        t = np.clip(((x - lo) * scale).astype(np.int64), 0, _BUCKETS - 1)
    i = table[t]
    padded = np.concatenate([[-np.inf], levels, [np.inf]])  # padded[i] = levels[i - 1]
    ok = (padded[i] < x) & (x <= padded[i + 1])
    bad = ~ok
    if np.any(bad):
        i[bad] = np.searchsorted(levels, x[bad], side="left")
    return i
