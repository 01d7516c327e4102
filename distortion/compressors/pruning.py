r"""Magnitude pruning: unstructured, N:M semi-structured and filter (output-channel) pruning.

The perturbation of pruning is :math:`E = -W` on the pruned set and 0 elsewhere, so its
error model is the actual mean square and mean of the pruned weights per output channel —
data-free, deterministic and exact (theory/compression.md, eqs. C1–C4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from distortion.compressors._common import (
    check_choice,
    check_int,
    exact_error_model,
    finish,
    prepare,
)

__all__ = ["MagnitudePruner", "PrunedTensor"]

_SCOPES = ("layer", "global")
_PATTERNS = ("unstructured", "n:m", "filter")
_NORMS = ("l1", "l2")


@dataclass(frozen=True)
class PrunedTensor:
    """What :class:`MagnitudePruner` did to one tensor.

    Attributes
    ----------
    kept : ndarray of bool, shape of w
        The surviving entries.
    sparsity : float
        The fraction of entries pruned (zeroed).
    """

    kept: np.ndarray = field(repr=False)  # shape of w
    sparsity: float

    @property
    def pruned(self) -> np.ndarray:
        """The pruned entries (shape of w); :class:`Compose` keeps them at 0."""
        return ~self.kept


@dataclass(frozen=True)
class MagnitudePruner:
    r"""Zero the weights of smallest magnitude.

    Parameters
    ----------
    sparsity : float in [0, 1), or None for ``pattern="n:m"``
        ``"unstructured"``: the fraction of entries pruned, :math:`k = \operatorname{round}
        (\text{sparsity}\cdot\text{size})` (half to even); ``"filter"``: the fraction of
        output channels removed, :math:`\operatorname{round}(\text{sparsity}\cdot C)`;
        ``"n:m"``: must be :math:`1 - n/m` (or None, which sets it).
    scope : {"layer", "global"}
        Threshold each tensor on its own, or all the tensors given to
        :meth:`compress_many` jointly (one global ranking).
    pattern : {"unstructured", "n:m", "filter"}
        ``"n:m"`` keeps the ``n`` largest :math:`|w|` of each group of ``m`` consecutive
        weights of an output row (the row is the flattened ``w[c]``: inputs, then kernel
        positions); ``m`` must divide the row length. ``"filter"`` removes whole output
        channels (axis 0) of smallest norm.
    n, m : int
        The N:M pattern, :math:`1 \le n < m` (2:4 by default).
    norm : {"l1", "l2"}
        The channel norm of ``"filter"``, per entry (mean :math:`|w|` or root mean square),
        so that channels of tensors with different fan-in compare under ``scope="global"``;
        within one tensor this ranks as the plain L1/L2 norm.

    Notes
    -----
    Ties are broken deterministically by a stable sort: among equal magnitudes the entry
    (channel) that comes first in C order is pruned first. Pruning is idempotent: the pruned
    entries are the smallest (zero) ones of the result. The error model is per output
    channel (eq. C2):

    .. math:: \sigma_c^2 = \frac1{n_c}\sum_{i\in c} w_i^2\,1[i\ \text{pruned}],\qquad
              \mu_c = -\frac1{n_c}\sum_{i\in c} w_i\,1[i\ \text{pruned}].

    Examples
    --------
    >>> import numpy as np
    >>> MagnitudePruner(0.5).compress(np.array([[1.0, -0.1, 0.3, -2.0]])).values
    array([[ 1.,  0.,  0., -2.]])
    """

    sparsity: float | None
    scope: Literal["layer", "global"] = "layer"
    pattern: Literal["unstructured", "n:m", "filter"] = "unstructured"
    n: int = 2
    m: int = 4
    norm: Literal["l1", "l2"] = "l1"

    def __post_init__(self) -> None:
        check_choice("scope", self.scope, _SCOPES)
        check_choice("pattern", self.pattern, _PATTERNS)
        check_choice("norm", self.norm, _NORMS)
        if self.pattern == "n:m":
            m = check_int("m", self.m, 2)
            n = check_int("n", self.n, 1, m - 1)
            implied = 1.0 - n / m
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", implied)
            elif not _is_real(self.sparsity) or abs(float(self.sparsity) - implied) > 1e-12:
                raise ValueError(
                    f"the sparsity of an {n}:{m} pattern is 1 - n/m = {implied!r} "
                    f"(or pass None), got {self.sparsity!r}"
                )
            if self.scope == "global":
                raise ValueError(
                    "pattern='n:m' is a per-group pattern: scope must be 'layer', got 'global'"
                )
        s = self.sparsity
        if not _is_real(s) or not (0.0 <= float(s) < 1.0):
            raise ValueError(f"sparsity must be a number in [0, 1), got {s!r}")
        object.__setattr__(self, "sparsity", float(s))

    # ------------------------------------------------------------------ public API
    def compress(self, w: Any, *, seed: int | None = None):
        """Prune one tensor (a global scope over one tensor is the layer scope).

        Parameters
        ----------
        w : array_like or torch.Tensor of shape (C, ...)
        seed : ignored (pruning is deterministic)

        Returns
        -------
        Compressed
            ``detail`` is a :class:`PrunedTensor`.
        """
        w64, like = self._prepare(w)
        if self.pattern == "unstructured":
            kept = _keep_largest(np.abs(w64).ravel(), _count(self.sparsity, w64.size))
            kept = kept.reshape(w64.shape)
        elif self.pattern == "filter":
            norms = self._channel_norms(w64)
            keep_c = _keep_largest(norms, _count(self.sparsity, norms.size))
            kept = np.broadcast_to(keep_c.reshape((-1,) + (1,) * (w64.ndim - 1)), w64.shape)
        else:
            kept = self._nm_kept(w64)
        return self._result(w64, like, np.array(kept, dtype=bool))

    def compress_many(self, weights: dict[str, Any], *, seed: int | None = None) -> dict:
        """Prune several tensors: jointly for ``scope="global"``, one by one for ``"layer"``.

        Parameters
        ----------
        weights : dict of str to array_like or torch.Tensor
        seed : ignored

        Returns
        -------
        dict of str to Compressed, in the order of ``weights``
        """
        if not isinstance(weights, dict) or not weights:
            raise ValueError(f"weights must be a non-empty dict of tensors, got {weights!r}")
        if self.scope == "layer":
            return {k: self.compress(v) for k, v in weights.items()}
        prepared = {k: self._prepare(v) for k, v in weights.items()}
        if self.pattern == "unstructured":
            scores = [np.abs(w64).ravel() for w64, _ in prepared.values()]
        else:
            scores = [self._channel_norms(w64) for w64, _ in prepared.values()]
        sizes = [s.size for s in scores]
        flat = np.concatenate(scores)
        kept_all = _keep_largest(flat, _count(self.sparsity, flat.size))
        out, start = {}, 0
        for (name, (w64, like)), size in zip(prepared.items(), sizes, strict=True):
            k = kept_all[start : start + size]
            start += size
            if self.pattern == "unstructured":
                kept = k.reshape(w64.shape)
            else:
                kept = np.broadcast_to(k.reshape((-1,) + (1,) * (w64.ndim - 1)), w64.shape)
            out[name] = self._result(w64, like, np.array(kept, dtype=bool))
        return out

    # ------------------------------------------------------------------ internals
    def _prepare(self, w: Any):
        min_ndim = {"unstructured": 0, "filter": 1, "n:m": 2}[self.pattern]
        return prepare(w, min_ndim=min_ndim, what="prune")

    def _channel_norms(self, w64: np.ndarray) -> np.ndarray:
        rows = w64.reshape(w64.shape[0], -1)
        if self.norm == "l1":
            return np.mean(np.abs(rows), axis=1)
        return np.sqrt(np.mean(rows**2, axis=1))

    def _nm_kept(self, w64: np.ndarray) -> np.ndarray:
        rows = w64.reshape(w64.shape[0], -1)
        d = rows.shape[1]
        if d % self.m:
            raise ValueError(
                f"pattern='n:m' needs m to divide the row length {d} of w (shape "
                f"{w64.shape!r}), got m={self.m!r}"
            )
        groups = np.abs(rows).reshape(rows.shape[0], d // self.m, self.m)
        order = np.argsort(groups, axis=-1, kind="stable")  # smallest first
        kept = np.ones(groups.shape, dtype=bool)
        np.put_along_axis(kept, order[..., : self.m - self.n], False, axis=-1)
        return kept.reshape(w64.shape)

    def _result(self, w64: np.ndarray, like: Any, kept: np.ndarray):
        from distortion.compression import Compressed

        values64 = np.where(kept, w64, 0.0)
        values, error = finish(values64, w64, like)
        # E = -W on the pruned set (the kept weights come back exactly from any float
        # dtype): its moments are those of the pruned weights (eq. C2)
        model = exact_error_model(error, "channel", "pruning")
        detail = PrunedTensor(kept, float(1.0 - np.mean(kept)))
        return Compressed(values, error, model, self, detail)


def _is_real(x: Any) -> bool:
    return (
        not isinstance(x, bool)
        and isinstance(x, int | float | np.integer | np.floating)
        and np.isfinite(x)
    )


def _count(sparsity: float, size: int) -> int:
    """Number of entries (or channels) to prune: round half to even."""
    return int(np.round(sparsity * size))


def _keep_largest(scores: np.ndarray, n_pruned: int) -> np.ndarray:
    """Mask of the entries kept when the ``n_pruned`` smallest scores (stable) are pruned.

    The same mask as pruning the first ``n_pruned`` of a stable argsort, in O(n): the
    threshold is the ``n_pruned``-th smallest score (a partition, not a sort); every score
    below it is pruned, and of the scores equal to it the first ones in C order.
    """
    kept = np.ones(scores.size, dtype=bool)
    if n_pruned <= 0:
        return kept
    if n_pruned >= scores.size:
        kept[:] = False
        return kept
    threshold = np.partition(scores, n_pruned - 1)[n_pruned - 1]
    below = scores < threshold
    kept[below] = False
    ties = np.flatnonzero(scores == threshold)[: n_pruned - int(np.count_nonzero(below))]
    kept[ties] = False
    return kept
