"""Input conversion and validation shared by the modules of :mod:`distortion.stats` (private)."""

from __future__ import annotations

from typing import Any

import numpy as np

from distortion._validation import as_float_array

__all__: list[str] = []  # private helpers only; imported by name


def _as_float_array(x: Any, name: str) -> np.ndarray:
    """float64 copy of an array or tensor, finite (the one check of ``distortion._validation``;
    torch tensors are converted without importing torch)."""
    try:
        arr = as_float_array(x, name)
    except ValueError as exc:
        if "finite" in str(exc):
            raise ValueError(f"{exc} (non-finite values); remove them first") from None
        raise
    return np.array(arr, dtype=np.float64)  # a copy: callers may modify it


def _as_2d(x: Any, name: str) -> np.ndarray:
    arr = _as_float_array(x, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must have shape (n_samples,) or (n_samples, n_features), got {arr.shape}"
        )
    return arr


def _check_alpha(alpha: float) -> float:
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)
