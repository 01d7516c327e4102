r"""Composition of compressors, applied in order (e.g. prune, then quantize the survivors).

Stage ``i`` compresses the output of stage ``i - 1``; the entries pruned by an earlier
stage (those its ``detail.pruned`` marks) are held at exactly 0 in every later stage. The
total error is the sum of the stages' errors :math:`E = \sum_i E_i`, and its error model
follows eq. C17 of theory/compression.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distortion.compressors._common import exact_error_model, finish, group_rows, prepare
from distortion.quantize import _as_float64
from distortion.theory.error_models import ErrorModel

__all__ = ["Compose", "ComposedTensor"]


@dataclass(frozen=True)
class ComposedTensor:
    """The stages of a composed compression.

    Attributes
    ----------
    stages : tuple of Compressed
        Each stage's own result (before the mask of earlier pruning is applied).
    errors : tuple of ndarray
        The error :math:`E_i = V_i - V_{i-1}` each stage added, after the mask (float64).
    pruned : ndarray of bool, shape of w
        Entries held at 0 (pruned by some stage).
    """

    stages: tuple = field(repr=False)
    errors: tuple = field(repr=False)
    pruned: np.ndarray = field(repr=False)  # shape of w


@dataclass(frozen=True, init=False)
class Compose:
    r"""Apply compressors in order; pruned entries stay exactly zero.

    Parameters
    ----------
    *compressors : Compressor
        At least one; each has ``compress(w, *, seed=None)``.

    Notes
    -----
    Stage ``i`` receives seed ``realization_seed(seed, i)`` (None stays None). Its output
    is set to 0 on the entries pruned so far, so a quantizer whose grid lacks 0 (a codebook,
    an asymmetric grid) cannot revive them. The error model (eq. C17) is per output channel
    when any stage's model is, per tensor otherwise:

    * all stages deterministic: the actual mean square and mean of the total error (exact);
    * otherwise (``random=True``): the actual mean square of the deterministic stages'
      summed error, plus each random stage's model second moment times the share of entries
      it acted on (those not pruned before it); cross terms are neglected (they vanish in
      expectation for zero-mean rounding noise independent of the weights: exact for
      subtractive dither, H_U for nearest rounding). The mean is assembled the same way.

    Examples
    --------
    >>> import numpy as np
    >>> from distortion.compressors import MagnitudePruner
    >>> from distortion.quantize import UniformQuantizer
    >>> c = Compose(MagnitudePruner(0.5), UniformQuantizer(4)).compress(np.arange(8.0) - 3.5)
    >>> int((c.values == 0).sum())
    4
    """

    compressors: tuple

    def __init__(self, *compressors: Any) -> None:
        object.__setattr__(self, "compressors", tuple(compressors))
        self.__post_init__()

    def __post_init__(self) -> None:
        if not self.compressors:
            raise ValueError("Compose needs at least one compressor, got none")
        for i, c in enumerate(self.compressors):
            if not callable(getattr(c, "compress", None)):
                raise ValueError(f"compressor {i} has no compress method, got {c!r}")

    def compress(self, w: Any, *, seed: int | None = None):
        """Compress ``w`` by every stage in turn.

        Returns
        -------
        Compressed
            ``detail`` is a :class:`ComposedTensor`.
        """
        from distortion.compression import Compressed, realization_seed

        w64, like = prepare(w)
        pruned = np.zeros(w64.shape, dtype=bool)
        current, current64 = w, w64
        stages, errors, shares = [], [], []
        for i, comp in enumerate(self.compressors):
            c = comp.compress(current, seed=realization_seed(seed, i))
            v64 = _as_float64(c.values)
            if v64.shape != w64.shape:
                raise ValueError(f"compressor {i} changed the shape {w64.shape!r} to {v64.shape!r}")
            shares.append(~pruned)
            if pruned.any():
                v64 = np.where(pruned, 0.0, v64)
                nxt, _ = finish(v64, w64, like)
            else:
                nxt = c.values
            stages.append(c)
            errors.append(v64 - current64)
            stage_pruned = getattr(c.detail, "pruned", None)
            if stage_pruned is not None:
                pruned = pruned | np.asarray(stage_pruned, dtype=bool)
            current, current64 = nxt, v64
        values, error = finish(current64, w64, like)
        model = _composed_model(stages, errors, shares, error)
        detail = ComposedTensor(tuple(stages), tuple(errors), pruned)
        return Compressed(values, error, model, self, detail)


def _composed_model(stages, errors, shares, error) -> ErrorModel:
    """Error model of the composition (eq. C17)."""
    channel = error.ndim > 0 and any(s.error_model.granularity == "channel" for s in stages)
    gran = "channel" if channel else "tensor"
    if not any(s.error_model.random for s in stages):
        return exact_error_model(error, gran, "composed")
    det = sum(
        (e for s, e in zip(stages, errors, strict=True) if not s.error_model.random),
        np.zeros_like(error),
    )
    rows = group_rows(det, gran)
    m2, mu = np.mean(rows**2, axis=1), np.mean(rows, axis=1)
    for s, share in zip(stages, shares, strict=True):
        if s.error_model.random:
            frac = np.mean(group_rows(share.astype(np.float64), gran), axis=1)
            m2 = m2 + frac * _per_group(s.error_model.second_moment, gran, error)
            mu = mu + frac * _per_group(s.error_model.mean, gran, error)
    if gran == "tensor":
        m2, mu = m2.reshape(()), mu.reshape(())
    return ErrorModel(m2, mu, granularity=gran, random=True, rule="composed")


def _per_group(value: np.ndarray, gran: str, error: np.ndarray) -> np.ndarray:
    """A stage's () or (C,) moment as one value per group of the composed model."""
    v = np.asarray(value, dtype=np.float64)
    if gran == "channel":
        return np.broadcast_to(v, (error.shape[0],))
    if v.ndim == 0:
        return v.reshape(1)
    raise ValueError("a per-channel stage cannot feed a per-tensor composed model")  # unreachable
