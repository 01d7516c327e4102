"""Input conversion and validation shared by the modules of :mod:`distortion.stats` (private)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__: list[str] = []  # private helpers only; imported by name


def _as_float_array(x: Any, name: str) -> np.ndarray:
    """float64 copy of an array or tensor (torch tensors are converted without importing torch)."""
    if hasattr(x, "detach") and type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must hold real numbers, got an array of dtype {arr.dtype}")
    arr = np.array(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or inf); remove them first")
    return arr


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
