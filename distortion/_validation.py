r"""Argument checks shared by the whole package: one rule each, one message each.

numpy only (torch tensors are converted through ``.detach()`` without importing torch).

* :func:`as_float_array`: a finite float64 array, optionally of a given rank or shape;
* :func:`check_step`: quantization steps, one per row (output channel) of a weight. A zero
  step is **valid**: a constant row is returned unchanged by
  :class:`distortion.quantize.UniformQuantizer` (its error is 0); negative and non-finite
  steps are not;
* :func:`check_variance`: error variances :math:`\sigma^2` per tensor or per row, the same
  rules as a step;
* :func:`resolve_variance`: the row variances from exactly one of ``variance=`` and
  ``step=`` (a step goes through
  :func:`distortion.theory.error_models.uniform_error_variance`, the one place that turns a
  step into :math:`\Delta^2/12`);
* :func:`check_count`: an integer count with a lower bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "as_float_array",
    "check_count",
    "check_linear_layer",
    "check_step",
    "check_variance",
    "resolve_variance",
]


def as_float_array(
    value: Any,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
) -> np.ndarray:
    """``value`` as a finite float64 array (no copy when it already is one).

    Parameters
    ----------
    value : array_like
        Numbers (bool, integer or real); a torch tensor is moved to the CPU first.
    name : str
        The argument's name, for the error messages.
    ndim : int or sequence of int, optional
        Allowed number(s) of dimensions.
    shape : sequence of int or None, optional
        Required shape; ``None`` entries match any length.

    Raises
    ------
    ValueError
        Not numeric, complex, NaN or infinite entries, wrong rank or shape.
    """
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    try:
        raw = np.asarray(value)
        if raw.dtype.kind == "c":
            raise TypeError
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric array, got {type(value).__name__}") from None
    if not np.all(np.isfinite(arr)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} must be finite; found {bad} NaN or inf value(s)")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimension(s), got shape {arr.shape}")
    if shape is not None:
        want_shape = tuple(shape)
        if arr.ndim != len(want_shape) or any(
            w is not None and w != s for w, s in zip(want_shape, arr.shape, strict=True)
        ):
            shown = "(" + ", ".join("n" if w is None else str(w) for w in want_shape) + ")"
            raise ValueError(f"{name} must have shape {shown}, got shape {arr.shape}")
    return arr


def _per_row(value: Any, n_rows: int, name: str, what: str) -> np.ndarray:
    """A scalar, (1,), (n_rows,) or (n_rows, 1) non-negative value as shape (n_rows,)."""
    if value is None:
        raise ValueError(f"{name} must be given: {what} (scalar) or one per row ({n_rows},)")
    s = as_float_array(value, name)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.shape in ((), (1,)):
        s = np.full(n_rows, float(s.reshape(())))
    if s.shape != (n_rows,):
        raise ValueError(
            f"{name} must be a scalar (per-tensor) or have shape ({n_rows},) (one per row of "
            f"W), got shape {s.shape}"
        )
    if np.any(s < 0):
        raise ValueError(
            f"{name} must be non-negative (0 for a constant row), got minimum {s.min()!r}"
        )
    return s


def check_step(step: Any, n_rows: int, *, name: str = "step") -> np.ndarray:
    r"""Quantization steps :math:`\Delta_j` of the rows of a weight, shape (n_rows,).

    A scalar is a per-tensor step. 0 is valid (a constant row, returned unchanged by the
    quantizer, has no error); negative or non-finite steps raise ValueError.
    """
    return _per_row(step, n_rows, name, "the quantizer step")


def check_variance(variance: Any, n_rows: int, *, name: str = "variance") -> np.ndarray:
    r"""Error variances :math:`\sigma_j^2` of the rows of a weight, shape (n_rows,).

    A scalar is a per-tensor variance; 0 means no error in that row.
    """
    return _per_row(variance, n_rows, name, "the error variance sigma^2")


def resolve_variance(step: Any, variance: Any, n_rows: int) -> np.ndarray:
    r"""Row variances (n_rows,) from exactly one of ``variance`` and ``step``.

    ``variance`` (what a compressor's error model gives) is used as is; a ``step`` is
    converted by :func:`distortion.theory.error_models.uniform_error_variance`
    (:math:`\Delta^2/12`, H_U, eq. E1).
    """
    if (step is None) == (variance is None):
        raise ValueError(
            "pass exactly one of variance= (the error variance sigma^2, per tensor or one per "
            "row, e.g. ErrorModel.second_moment) and step= (the quantizer step, converted "
            "by the uniform-error rule Delta^2/12)"
        )
    if variance is not None:
        return check_variance(variance, n_rows)
    from distortion.theory.error_models import uniform_error_variance

    return uniform_error_variance(check_step(step, n_rows))


def check_count(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` as an int ``>= minimum`` (bools and floats are refused)."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_linear_layer(
    W: Any, b: Any, n_classes: int, n_features: int | None, what: str = "W"
) -> tuple[np.ndarray, np.ndarray]:
    """A linear layer ``z = W x + b``: ``W`` (n_classes, n_features) and ``b`` (n_classes,).

    ``b=None`` means no bias (zeros). The bias is called ``b`` for ``W`` and ``b_hat``
    for ``W_hat``.
    """
    w = as_float_array(W, what)
    if w.ndim != 2:
        raise ValueError(f"{what} must have shape (n_classes, n_features), got shape {w.shape}")
    if w.shape[0] != n_classes:
        raise ValueError(
            f"{what} has {w.shape[0]} rows but the model has {n_classes} classes (K mismatch); "
            "pass the last layer with one row per class"
        )
    if n_features is not None and w.shape[1] != n_features:
        raise ValueError(
            f"{what} has {w.shape[1]} columns but the features have dimension {n_features} "
            "(d mismatch); pass the last layer acting on these features"
        )
    bname = "b" if what == "W" else "b_hat"
    if b is None:
        bias = np.zeros(n_classes)
    else:
        bias = as_float_array(b, bname)
        if bias.shape != (n_classes,):
            raise ValueError(
                f"{bname} must have shape ({n_classes},) to match {what}, got {bias.shape} "
                "(K mismatch)"
            )
    return w, bias
