r"""Several quantized layers: the first-order logit-noise model and its closed forms.

Quantizing the weights :math:`W_\ell` of several layers at once perturbs the logits of a
sample :math:`x` by, to first order (eq. L2),

.. math:: \delta z(x) = \sum_\ell J_\ell(x)\,\operatorname{vec}(E_\ell), \qquad
          J_\ell(x) = \frac{\partial z}{\partial \operatorname{vec}(W_\ell)}
          \in \mathbb{R}^{K\times n_\ell}.

Under the uniform-error hypothesis H_U the error is centred with covariance (eq. L4)

.. math:: C(x) = \sum_\ell \sum_c \sigma_{\ell c}^2\, \Gamma_{\ell c}(x), \qquad
          \Gamma_{\ell c}(x) = J_{\ell c}(x) J_{\ell c}(x)^\top, \qquad
          \sigma_{\ell c}^2 = \Delta_{\ell c}^2 / 12,

(:math:`c` runs over output channels for per-channel steps; per tensor
:math:`\Gamma_\ell = \sum_c \Gamma_{\ell c}`), and Gaussian by the central limit theorem.
The :math:`K\times K` Gram matrices :math:`\Gamma_\ell(x)` are computed once per sample
(:func:`distortion.experiments.sensitivity.gradient_grams`, K backward passes) and held in
a :class:`GradientGrams`; after that every bit allocation is numpy work on arrays of
shape (N, L, K, K): the flip probability of each sample is one minus a Gaussian orthant
probability of its K-1 margins (eq. L6), computed here by Deák's radial method with a
control variate (eq. L8-L10), or by the independence / union approximations (eq. L11).

The derivation, with the equation numbers cited in the code as ``(eq. L#)``, is in
``theory/multilayer.md``.

References
----------
.. [1] I. Deák, "Three digit accurate multiple normal probabilities", Numerische
   Mathematik 35, 1980 (the radial / orthonormal-directions estimator).
.. [2] A. Genz and F. Bretz, "Computation of multivariate normal and t probabilities",
   Lecture Notes in Statistics 195, Springer, 2009 (section 4.1: spherical-radial methods).
.. [3] D. Slepian, "The one-sided barrier problem for Gaussian noise", Bell System
   Technical Journal 41, 1962 (the orthant inequality behind eq. L11).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import special

from distortion.results import Band, Prediction, check_confidence_level
from distortion.theory._bands import order_statistic_band

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "GradientGrams",
    "KnapsackSolution",
    "LayerContributions",
    "MarginStatistics",
    "MultilayerDistortion",
    "OrthantResult",
    "TAIL_CONSTANT",
    "Truncation",
    "knapsack_allocation",
    "layer_contributions",
    "input_noise_inflation",
    "margin_statistics",
    "multilayer_distortion",
    "noise_covariance",
    "orthant_flip",
    "truncation_tail_bound",
]

OrthantMethod = Literal["radial", "independent", "union"]
_METHODS = ("radial", "independent", "union")
#: Samples whose union bound on the flip probability is below this are not integrated.
PRUNE_TOLERANCE = 1e-12


# ----------------------------------------------------------------------------- the cache
@dataclass(frozen=True, eq=False)
class Truncation:
    r"""The nearest competitors a truncated :class:`GradientGrams` keeps (eq. L17-L20).

    A network with many classes is analysed on the :math:`M = m + 1` classes
    :math:`S_i = \{\hat y_i, c_{i1}, \dots, c_{im}\}` of smallest float margins; the Grams
    are those of the gradients :math:`\partial(z_j - z_{\hat y})/\partial W_\ell`,
    :math:`j \in S_i` (zero for :math:`j = \hat y_i`, eq. L17), which determine every margin
    among the kept classes. The others are bounded, not modelled (eq. L19).

    Attributes
    ----------
    classes : int array of shape (N, M)
        The network's class index of each kept column; column 0 is the float decision.
    n_classes : int
        K, the number of classes of the network.
    tail : array of shape (N, L)
        Hutchinson estimate of :math:`T_{i\ell} = \sum_{j \notin S_i}
        \|\partial(z_j - z_{\hat y})/\partial W_\ell\|^2` (eq. L18), float64.
    channel_tail : array of shape (N, C) or None
        The same per output channel (per-channel steps), float32.
    tail_margin : array of shape (N,)
        :math:`d_i = z_{\hat y} - \max_{j \notin S_i} z_j` (+inf when every class is kept).
    n_probes : int
        Rademacher probes behind ``tail`` (0: no tail estimate; the bound is then unknown).
    """

    classes: np.ndarray = field(repr=False)  # (N, M)
    n_classes: int
    tail: np.ndarray = field(repr=False)  # (N, L)
    channel_tail: np.ndarray | None = field(default=None, repr=False)  # (N, C)
    tail_margin: np.ndarray = field(default=None, repr=False)  # (N,)
    n_probes: int = 0

    def __post_init__(self) -> None:
        cls = np.asarray(self.classes)
        if cls.ndim != 2 or not np.issubdtype(cls.dtype, np.integer):
            raise ValueError(f"classes must be an integer array of shape (N, M), got {cls.shape}")
        k = int(self.n_classes)
        if cls.shape[1] < 2 or cls.shape[1] > k:
            raise ValueError(f"classes must keep 2..{k} columns, got {cls.shape[1]}")
        if cls.size and (cls.min() < 0 or cls.max() >= k):
            raise ValueError(f"classes must lie in 0..{k - 1}")
        n = cls.shape[0]
        tail = np.asarray(self.tail, dtype=np.float64)
        if tail.ndim != 2 or tail.shape[0] != n:
            raise ValueError(f"tail must have shape (N, L) with N = {n}, got {tail.shape}")
        if not np.all(np.isfinite(tail)) or np.any(tail < 0):
            raise ValueError("tail must be finite and >= 0")
        margin = (
            np.full(n, np.inf) if self.tail_margin is None
            else np.asarray(self.tail_margin, dtype=np.float64)
        )  # fmt: skip
        if margin.shape != (n,) or np.any(np.isnan(margin)):
            raise ValueError(f"tail_margin must have shape ({n},) without NaN")
        if self.n_probes < 0:
            raise ValueError(f"n_probes must be >= 0, got {self.n_probes}")
        object.__setattr__(self, "classes", cls.astype(np.int64))
        object.__setattr__(self, "n_classes", k)
        object.__setattr__(self, "tail", tail)
        object.__setattr__(self, "tail_margin", margin)
        object.__setattr__(self, "n_probes", int(self.n_probes))

    @property
    def n_competitors(self) -> int:
        """m, the competitors kept beside the float decision."""
        return int(self.classes.shape[1]) - 1

    def take(self, rows: np.ndarray | slice) -> Truncation:
        """The truncation of a subset of the samples."""
        ct = None if self.channel_tail is None else self.channel_tail[rows]
        return Truncation(
            self.classes[rows], self.n_classes, self.tail[rows], ct, self.tail_margin[rows],
            self.n_probes,
        )  # fmt: skip


#: :math:`\max_{t>0} t^2\,\Phi(-t)`, the constant of the tail bound (eq. L19).
def _tail_constant() -> float:
    from scipy import optimize

    f = lambda t: 2.0 * special.ndtr(-t) - t * np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    t = optimize.brentq(f, 0.5, 3.0, xtol=1e-14)
    return float(t * t * special.ndtr(-t))


TAIL_CONSTANT = _tail_constant()


def truncation_tail_bound(
    truncation: Truncation, variances: Sequence[np.ndarray], channel_offsets: np.ndarray
) -> np.ndarray:
    r"""Per-sample upper bound on the flip probability towards the classes not kept (eq. L19).

    Parameters
    ----------
    truncation : Truncation
    variances : sequence of length L
        Checked noise variances (scalars or per-channel arrays), as for eq. L4.
    channel_offsets : array of shape (L+1,)

    Returns
    -------
    ndarray of shape (N,)
        :math:`\min(1,\; c^\ast V_i/d_i^2,\; (K-M)\,\Phi(-d_i/\sqrt{V_i}))` with
        :math:`V_i = \sum_\ell \sigma_\ell^2 T_{i\ell}` (eq. L18); zero when every class
        is kept, NaN without a tail estimate.
    """
    tr = truncation
    n_rest = tr.n_classes - tr.classes.shape[1]
    n = tr.classes.shape[0]
    if n_rest == 0:
        return np.zeros(n)
    if tr.n_probes == 0:
        return np.full(n, np.nan)
    tensor = np.array([float(a) if np.ndim(a) == 0 else 0.0 for a in variances])
    v = tr.tail @ tensor  # (eq. L18)
    if any(np.ndim(a) == 1 for a in variances):
        if tr.channel_tail is None:
            raise ValueError(
                "per-channel steps need per-channel tails; recompute the cache with "
                "gradient_grams(..., granularity='channel', competitors=m)"
            )
        s = np.zeros(int(channel_offsets[-1]))
        for i, a in enumerate(variances):
            if np.ndim(a) == 1:
                s[channel_offsets[i] : channel_offsets[i + 1]] = a
        v = v + tr.channel_tail.astype(np.float64) @ s
    d = tr.tail_margin
    with np.errstate(divide="ignore", invalid="ignore"):
        chebyshev = np.where(v > 0, TAIL_CONSTANT * v / d**2, 0.0)
        union = np.where(v > 0, n_rest * special.ndtr(-d / np.sqrt(v)), 0.0)
    return np.clip(np.minimum(chebyshev, union), 0.0, 1.0)  # (eq. L19)


@dataclass(frozen=True, eq=False)
class GradientGrams:
    r"""Per-sample Gram matrices of the logit Jacobians of the quantizable layers.

    Built by :func:`distortion.experiments.sensitivity.gradient_grams`; everything the
    closed forms of this module need, for any bit allocation and quantizer.

    Attributes
    ----------
    layer_names : tuple of str, length L
        The layers, in forward order.
    layer_kinds : tuple of str, length L
        ``"conv"`` or ``"linear"``.
    weight_shapes : tuple of tuple of int, length L
        Shape of each weight, output channels first.
    logits : array of shape (N, K)
        Float logits :math:`z(x_i)`.
    grams : array of shape (N, L, K, K)
        :math:`\Gamma_\ell(x_i) = J_\ell(x_i) J_\ell(x_i)^\top` (eq. L3), float64.
    labels : array of shape (N,) or None
        True classes (for the accuracy).
    channel_grams : array of shape (N, C, K(K+1)/2) or None
        Per-output-channel Grams :math:`\Gamma_{\ell c}`, upper triangles packed row by row
        (``numpy.triu_indices(K)``), float32; :math:`C = \sum_\ell C_\ell` channels, layer
        :math:`\ell` at ``channel_offsets()[l]:channel_offsets()[l+1]``.
    projections : array of shape (N, L, R, K) or None
        :math:`J_\ell(x_i)\,(s_\ell \odot \varepsilon_\ell^{(r)})` for R fixed draws
        :math:`\varepsilon_\ell^{(r)}` with i.i.d. entries :math:`U(-\sqrt3, \sqrt3)` (unit
        variance) shared by all samples: realizations of the error, for the band of one
        realization (eq. L12). float32.
    projection_scales : tuple of arrays of shape (C_l,), or None
        The per-channel profile :math:`s_{\ell c}` of those draws (all ones for per-tensor).
    weights : tuple of arrays, or None
        The float weights of each layer (float64), to compute quantization steps.
    truncation : Truncation or None
        Set when only the nearest competitors of each sample are kept (many classes,
        eq. L17-L20): the K of the arrays above is then :math:`M = m + 1`, column 0 is the
        float decision, ``labels`` are column indices (-1 for a label not kept) and the
        Grams are those of :math:`\partial(z_j - z_{\hat y})/\partial W_\ell`.
    key : str
        Cache key (weights, data, layers and options).
    meta : dict
        Provenance (model, dataset, timings).
    """

    layer_names: tuple[str, ...]  # (L,)
    layer_kinds: tuple[str, ...]  # (L,)
    weight_shapes: tuple[tuple[int, ...], ...]  # (L,)
    logits: np.ndarray = field(repr=False)  # (N, K)
    grams: np.ndarray = field(repr=False)  # (N, L, K, K)
    labels: np.ndarray | None = field(default=None, repr=False)  # (N,)
    channel_grams: np.ndarray | None = field(default=None, repr=False)  # (N, C, K(K+1)/2)
    projections: np.ndarray | None = field(default=None, repr=False)  # (N, L, R, K)
    projection_scales: tuple[np.ndarray, ...] | None = field(default=None, repr=False)
    weights: tuple[np.ndarray, ...] | None = field(default=None, repr=False)
    truncation: Truncation | None = field(default=None, repr=False)
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.layer_names)
        L = len(names)
        if L == 0:
            raise ValueError("layer_names is empty: pass at least one layer")
        if len(set(names)) != L:
            raise ValueError(f"layer_names must be unique, got {names}")
        if len(self.layer_kinds) != L or len(self.weight_shapes) != L:
            raise ValueError(
                "layer_names, layer_kinds and weight_shapes must have one entry per layer"
            )
        logits = np.asarray(self.logits, dtype=np.float64)
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(f"logits must have shape (N, K) with K >= 2, got {logits.shape}")
        n, k = logits.shape
        grams = np.asarray(self.grams, dtype=np.float64)
        if grams.shape != (n, L, k, k):
            raise ValueError(
                f"grams must have shape (N, L, K, K) = {(n, L, k, k)} to match logits "
                f"{logits.shape} and {L} layers, got {grams.shape}"
            )
        if not (np.all(np.isfinite(logits)) and np.all(np.isfinite(grams))):
            raise ValueError("logits and grams must be finite; found NaN or inf")
        shapes = tuple(tuple(int(s) for s in sh) for sh in self.weight_shapes)
        labels = None
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels must be integers of shape ({n},), got {labels.shape}")
            low = -1 if self.truncation is not None else 0
            if n and (labels.min() < low or labels.max() >= k):
                raise ValueError(
                    f"labels must lie in {low}..{k - 1} (K mismatch: the logits have {k} classes)"
                )
            labels = labels.astype(np.int64)
        n_ch = np.array([sh[0] for sh in shapes])
        if self.channel_grams is not None:
            cg = np.asarray(self.channel_grams)
            if cg.shape != (n, int(n_ch.sum()), k * (k + 1) // 2):
                raise ValueError(
                    f"channel_grams must have shape {(n, int(n_ch.sum()), k * (k + 1) // 2)}, "
                    f"got {cg.shape}"
                )
        if self.projections is not None:
            pr = np.asarray(self.projections)
            if pr.ndim != 4 or pr.shape[:2] != (n, L) or pr.shape[3] != k:
                raise ValueError(f"projections must have shape (N, L, R, K), got {pr.shape}")
            scales = self.projection_scales
            if scales is None or len(scales) != L:
                raise ValueError("projection_scales must give one profile per layer")
            for sh, s in zip(shapes, scales, strict=True):
                if np.shape(s) != (sh[0],):
                    raise ValueError(
                        f"projection_scales entries must have shape (C_l,), got {np.shape(s)}"
                    )
        if self.truncation is not None:
            tr = self.truncation
            if tr.classes.shape != (n, k) or tr.tail.shape != (n, L):
                raise ValueError(
                    f"truncation must keep {k} classes of {n} samples and {L} layer tails, got "
                    f"classes {tr.classes.shape} and tail {tr.tail.shape}"
                )
            if tr.channel_tail is not None and np.shape(tr.channel_tail) != (n, int(n_ch.sum())):
                raise ValueError(f"channel_tail must have shape {(n, int(n_ch.sum()))}")
        if self.weights is not None:
            if len(self.weights) != L:
                raise ValueError("weights must give one array per layer")
            for name, sh, w in zip(names, shapes, self.weights, strict=True):
                if tuple(np.shape(w)) != sh:
                    raise ValueError(f"weight of {name!r} has shape {np.shape(w)}, expected {sh}")
        object.__setattr__(self, "layer_names", names)
        object.__setattr__(self, "layer_kinds", tuple(str(s) for s in self.layer_kinds))
        object.__setattr__(self, "weight_shapes", shapes)
        object.__setattr__(self, "logits", logits)
        object.__setattr__(self, "grams", grams)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "meta", dict(self.meta))

    # -- sizes --------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        """N, the number of samples."""
        return self.logits.shape[0]

    @property
    def n_classes(self) -> int:
        """K, the number of classes (logits)."""
        return self.logits.shape[1]

    @property
    def total_classes(self) -> int:
        """The network's number of classes (K, or more when truncated)."""
        return self.n_classes if self.truncation is None else self.truncation.n_classes

    def kept_columns(self, a: np.ndarray) -> np.ndarray:
        """The columns of an (N, K_total) array that the Grams keep, shape (N, K)."""
        a = np.asarray(a)
        if self.truncation is None:
            return a
        if a.shape != (self.n_samples, self.total_classes):
            raise ValueError(
                f"expected an array of shape {(self.n_samples, self.total_classes)}, got {a.shape}"
            )
        return np.take_along_axis(a, self.truncation.classes, axis=1)

    @property
    def n_layers(self) -> int:
        """L, the number of layers."""
        return len(self.layer_names)

    @property
    def n_realizations(self) -> int:
        """R, the number of cached error realizations (0 without projections)."""
        return 0 if self.projections is None else int(self.projections.shape[2])

    def layer_sizes(self) -> np.ndarray:
        r"""Number of weights :math:`n_\ell` of each layer, shape (L,)."""
        return np.array([math.prod(s) for s in self.weight_shapes], dtype=np.int64)

    def channel_counts(self) -> np.ndarray:
        """Output channels of each layer, shape (L,)."""
        return np.array([s[0] for s in self.weight_shapes], dtype=np.int64)

    def channel_offsets(self) -> np.ndarray:
        """Start of each layer's channels in ``channel_grams``, shape (L+1,)."""
        return np.concatenate([[0], np.cumsum(self.channel_counts())])

    def layer_index(self, name: str) -> int:
        """Position of a layer, with a clear error for an unknown name."""
        try:
            return self.layer_names.index(name)
        except ValueError:
            shown = ", ".join(self.layer_names[:8]) + (", ..." if self.n_layers > 8 else "")
            raise ValueError(f"unknown layer {name!r}; the cached layers are: {shown}") from None

    def predictions(self) -> np.ndarray:
        r"""Float decisions :math:`\hat y_i`, shape (N,)."""
        return np.argmax(self.logits, axis=1)

    def accuracy(self) -> float:
        """Accuracy of the float network on the samples (NaN without labels)."""
        if self.labels is None:
            return float("nan")
        return float(np.mean(self.predictions() == self.labels))

    def margin_gradient_norms(self) -> np.ndarray:
        r"""Squared margin gradient norms, shape (N, L, K).

        :math:`G_{\ell j}(x_i) = \|\partial(z_{\hat y} - z_j)/\partial W_\ell\|^2`;
        zero at :math:`j = \hat y_i` (eq. L5).
        """
        return _margin_diagonals(self.grams, self.predictions())

    def layer_major_grams(self) -> np.ndarray:
        """The Grams as a C-contiguous array of shape (L, N*K*K) (no copy when possible)."""
        g = np.moveaxis(self.grams, 1, 0)
        return np.ascontiguousarray(g).reshape(self.n_layers, -1)

    @cached_property
    def _packed_layer_major(self) -> np.ndarray:
        """Upper triangles of the Grams, layer-major, shape (L, N*K(K+1)/2) (eq. L4).

        Built once: contracting it with the L variances streams half the memory of the
        full (N, L, K, K) array, which bounds the time of one prediction.
        """
        iu = np.triu_indices(self.n_classes)
        packed = np.moveaxis(self.grams[:, :, iu[0], iu[1]], 1, 0)
        return np.ascontiguousarray(packed).reshape(self.n_layers, -1)

    @cached_property
    def _channel_major(self) -> np.ndarray:
        """The per-channel Grams channel-major, shape (C, N*K(K+1)/2), built once.

        Stored as (N, C, K(K+1)/2), one layer's contraction is a batch of N small products;
        channel-major it is one product over a contiguous block, at the speed of streaming
        it (ResNet-56, 500 images: 37 ms against 14 ms for all 56 layers, benchmarked on
        the same shapes). It holds a second copy of ``channel_grams``.
        """
        cg = self.channel_grams
        return np.ascontiguousarray(np.moveaxis(cg, 1, 0)).reshape(cg.shape[1], -1)

    @cached_property
    def _contractions(self) -> dict[int, list[tuple[np.ndarray, float, np.ndarray]]]:
        """Per layer, a few (direction, norm, contraction) of per-channel variances."""
        return {}

    def _channel_contraction(self, li: int, a: np.ndarray) -> np.ndarray:
        r""":math:`\sum_{c \in \ell} a_c\,\Gamma_{\ell c}(x_i)`, packed, shape (N, K(K+1)/2).

        The sum is linear in ``a``: the contraction with a variance vector proportional to
        one already seen (the same layer at another bit-width, clip ratio or step scale: the
        per-channel steps of a max-based grid all scale by one factor) is that contraction
        rescaled, exact up to rounding. Only a new direction streams the layer's per-channel
        Grams again. A few directions are kept per layer.
        """
        norm = float(np.linalg.norm(a))
        seen = self._contractions.setdefault(li, [])
        if norm == 0.0:
            return np.zeros((self.n_samples, self.n_classes * (self.n_classes + 1) // 2))
        for u0, n0, c0 in seen:  # proportional: cosine 1 (Cauchy-Schwarz equality)
            if u0.shape == a.shape and float(u0 @ a) >= norm * (1.0 - 1e-13):
                return c0 * (norm / n0)
        u = a / norm
        off = self.channel_offsets()
        block = self._channel_major[off[li] : off[li + 1]]  # (C_l, N*K(K+1)/2)
        c = (a.astype(np.float32) @ block).reshape(self.n_samples, -1).astype(np.float64)
        seen.insert(0, (u, norm, c))
        del seen[4:]
        return c

    def to_frame(self) -> pd.DataFrame:
        r"""One row per layer: kind, shape, weights, channels and the mean :math:`G_{\ell j}`
        to the runner-up class (the margin's squared gradient norm)."""
        import pandas as pd

        z = self.logits
        pred = self.predictions()
        zz = z.copy()
        zz[np.arange(self.n_samples), pred] = -np.inf
        runner = np.argmax(zz, axis=1)
        g = self.margin_gradient_norms()[np.arange(self.n_samples), :, runner]  # (N, L)
        return pd.DataFrame(
            {
                "layer": list(self.layer_names),
                "kind": list(self.layer_kinds),
                "weight_shape": list(self.weight_shapes),
                "n_weights": self.layer_sizes(),
                "n_channels": self.channel_counts(),
                "mean_runner_up_grad_sq": g.mean(axis=0),
            }
        )


# ----------------------------------------------------------------------------- helpers
def _margin_diagonals(c: np.ndarray, ref: np.ndarray) -> np.ndarray:
    r""":math:`c_{rr} - 2c_{rj} + c_{jj}` for (N, ..., K, K) matrices, reference r per sample."""
    n = c.shape[0]
    idx = np.arange(n)
    crr = c[idx, ..., ref, ref]  # (N, ...)
    crj = c[idx, ..., ref, :]  # (N, ..., K)
    diag = np.diagonal(c, axis1=-2, axis2=-1)  # (N, ..., K)
    out = crr[..., None] - 2.0 * crj + diag
    return np.clip(out, 0.0, None)


def _check_variances(grams: GradientGrams, variances: Sequence[Any]) -> list[np.ndarray]:
    if isinstance(variances, np.ndarray) and variances.ndim == 1:
        variances = list(variances)
    if not isinstance(variances, Sequence) and not isinstance(variances, np.ndarray):
        raise ValueError(
            f"variances must be a sequence with one entry per layer ({grams.n_layers}), "
            f"got {type(variances).__name__}"
        )
    if len(variances) != grams.n_layers:
        raise ValueError(
            f"variances must have one entry per cached layer ({grams.n_layers}: "
            f"{', '.join(grams.layer_names[:4])}{', ...' if grams.n_layers > 4 else ''}), "
            f"got {len(variances)}"
        )
    out = []
    for name, c, v in zip(grams.layer_names, grams.channel_counts(), variances, strict=True):
        a = np.zeros(()) if v is None else np.asarray(v, dtype=np.float64)
        if a.ndim == 1 and a.shape != (c,):
            raise ValueError(
                f"noise variance of layer {name!r} must be a scalar or have shape ({c},) "
                f"(one per output channel), got shape {a.shape}"
            )
        if a.ndim > 1:
            raise ValueError(
                f"noise variance of layer {name!r} must be a scalar or 1-d, got {a.shape}"
            )
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"noise variance of layer {name!r} must be finite and >= 0")
        if a.ndim == 1 and np.all(a == a[0]):
            a = np.asarray(a[0])
        out.append(a)
    return out


def input_noise_inflation(
    variances: Sequence[Any], ratios: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    r"""Second moments inflated by the noise at each layer's input (eq. L25-L26).

    Parameters
    ----------
    variances : sequence of length L
        Each layer's error second moment (scalar, or one per output channel; 0 or None: the
        layer stays in float), as :func:`multilayer_distortion` takes them.
    ratios : array of shape (L, L)
        :math:`A_{\ell j}`: the energy of the first-order noise at layer :math:`\ell`'s
        input caused by a unit-variance error in layer :math:`j` (channel profile of the
        draws), relative to the energy of that input
        (:func:`distortion.experiments.input_noise.input_noise`); zero for :math:`j \ge \ell`.

    Returns
    -------
    inflated : list of ndarray
        :math:`\sigma^2_{\ell c}\,(1 + \rho_\ell)`.
    rho : ndarray of shape (L,)
        :math:`\rho_\ell = \sum_j \bar\sigma_j^2 A_{\ell j}`, with
        :math:`\bar\sigma_j^2` the mean over channels of layer :math:`j`'s second moment.
    """
    a = np.asarray(ratios, dtype=np.float64)
    n = len(variances)
    if a.shape != (n, n):
        raise ValueError(
            f"ratios must be an ({n}, {n}) array (one row and column per layer), got {a.shape}"
        )
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError("ratios must be finite and >= 0 (energy ratios)")
    v = []
    for i, x in enumerate(variances):
        arr = np.zeros(()) if x is None else np.asarray(x, dtype=np.float64)
        if arr.ndim > 1 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(
                f"variance {i} must be a finite scalar or 1-d array >= 0, got shape {arr.shape}"
            )
        v.append(arr)
    mean = np.array([float(np.mean(x)) if x.size else 0.0 for x in v])
    rho = a @ mean
    return [x * (1.0 + r) for x, r in zip(v, rho, strict=True)], rho


def noise_covariance(grams: GradientGrams, variances: Sequence[Any]) -> np.ndarray:
    r"""Covariance :math:`C(x_i)` of the logit noise under H_U, shape (N, K, K).

    Parameters
    ----------
    grams : GradientGrams
    variances : sequence of length L
        :math:`\sigma_\ell^2 = \Delta_\ell^2/12` per layer: a scalar (per-tensor step; 0 or
        None for a layer kept in float) or an array of shape (C_l,) (per-channel steps,
        which need ``grams.channel_grams``).

    Returns
    -------
    ndarray of shape (N, K, K)

    Notes
    -----
    .. math:: C(x) = \sum_\ell \sum_c \sigma_{\ell c}^2\, \Gamma_{\ell c}(x)  \qquad \text{(eq. L4)}
    """
    v = _check_variances(grams, variances)
    return _noise_covariance(grams, v)


def _noise_covariance(grams: GradientGrams, v: list[np.ndarray]) -> np.ndarray:
    n, k = grams.n_samples, grams.n_classes
    iu = np.triu_indices(k)
    tensor = np.array([float(a) if a.ndim == 0 else 0.0 for a in v])
    if tensor.any():
        packed = (tensor @ grams._packed_layer_major).reshape(n, -1)  # (eq. L4)
    else:  # every layer per channel (or float): nothing to stream
        packed = np.zeros((n, k * (k + 1) // 2))
    if any(a.ndim == 1 for a in v):
        if grams.channel_grams is None:
            raise ValueError(
                "per-channel steps need per-channel Gram matrices; recompute the cache with "
                "gradient_grams(..., granularity='channel')"
            )
        for i, a in enumerate(v):
            if a.ndim == 1:
                packed += grams._channel_contraction(i, a)  # (eq. L4)
    cov = np.empty((n, k, k))
    cov[:, iu[0], iu[1]] = packed
    cov[:, iu[1], iu[0]] = packed
    return cov


@dataclass(frozen=True)
class MarginStatistics:
    r"""Margins of each sample with respect to a reference class and their noise covariance.

    Attributes
    ----------
    reference : array of shape (N,)
        The reference class r of each sample.
    competitors : array of shape (N, K-1)
        The other classes j, in increasing order.
    margins : array of shape (N, K-1)
        :math:`z_r - z_j`.
    covariance : array of shape (N, K-1, K-1)
        :math:`A_r C(x) A_r^\top` (eq. L5).
    """

    reference: np.ndarray  # (N,)
    competitors: np.ndarray  # (N, K-1)
    margins: np.ndarray  # (N, K-1)
    covariance: np.ndarray  # (N, K-1, K-1)

    def z_scores(self) -> np.ndarray:
        r""":math:`t_j = m_j / \sqrt{S_{jj}}` (+inf for a noiseless margin), shape (N, K-1)."""
        return _z_scores(self.margins, np.diagonal(self.covariance, axis1=1, axis2=2))


def margin_statistics(z: np.ndarray, cov: np.ndarray, reference: np.ndarray) -> MarginStatistics:
    r"""Margins :math:`m = A_r z` and their covariance :math:`A_r C A_r^\top` (eq. L5).

    Parameters
    ----------
    z : array of shape (N, K)
    cov : array of shape (N, K, K)
    reference : int array of shape (N,)
    """
    z = np.asarray(z, dtype=np.float64)
    n, k = z.shape
    ref = np.asarray(reference, dtype=np.int64)
    if cov.shape != (n, k, k) or ref.shape != (n,):
        raise ValueError(f"cov must have shape {(n, k, k)} and reference shape ({n},)")
    comp = _competitors(ref, k)  # (N, K-1)
    idx = np.arange(n)[:, None]
    margins = z[idx[:, 0], ref][:, None] - z[idx, comp]
    crow = cov[idx[:, 0], ref]  # (N, K)
    s_full = cov - crow[:, None, :] - crow[:, :, None] + cov[idx[:, 0], ref, ref][:, None, None]
    s = s_full[idx[:, :, None], comp[:, :, None], comp[:, None, :]]
    return MarginStatistics(ref, comp, margins, 0.5 * (s + np.swapaxes(s, 1, 2)))


def _competitors(ref: np.ndarray, k: int) -> np.ndarray:
    base = np.arange(k - 1)[None, :]
    return base + (base >= ref[:, None])


def _z_scores(m: np.ndarray, var: np.ndarray) -> np.ndarray:
    sd = np.sqrt(np.clip(var, 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = m / sd
    t = np.where(sd > 0, t, np.where(m > 0, np.inf, np.where(m < 0, -np.inf, 0.0)))
    return t


# ----------------------------------------------------------------------------- orthant
_DIRECTION_BLOCK = 256
_direction_cache: dict[tuple[int, int, int], np.ndarray] = {}


def _directions(n: int, dim: int, n_rotations: int, seed: int) -> np.ndarray:
    r"""Per-sample rotations :math:`Q_{i1}..Q_{iR}`, shape (n, dim, R dim) (eq. L10).

    The directions of sample ``i`` are the columns of its R Haar rotations and their
    negatives (the antithetic half is never stored). They are drawn from a generator seeded
    with ``(seed, dim, i // 256)``, so they do not depend on ``n``, and the integration
    errors of different samples are independent (they average out in the mean over
    samples). Cached, grown by blocks of 256 samples.
    """
    key = (dim, n_rotations, seed)
    have = _direction_cache.get(key)
    if have is not None and have.shape[0] >= n:
        return have[:n]
    blocks = [] if have is None else [have]
    start = 0 if have is None else have.shape[0] // _DIRECTION_BLOCK
    stop = -(-n // _DIRECTION_BLOCK)
    for b in range(start, stop):
        rng = np.random.default_rng([seed, dim, b, 9157])
        g = rng.standard_normal((_DIRECTION_BLOCK * n_rotations, dim, dim))
        q, r = np.linalg.qr(g)
        d = np.sign(np.diagonal(r, axis1=1, axis2=2))
        q = q * np.where(d == 0, 1.0, d)[:, None, :]  # Haar rotations
        q = q.reshape(_DIRECTION_BLOCK, n_rotations, dim, dim)
        blocks.append(np.moveaxis(q, 1, 2).reshape(_DIRECTION_BLOCK, dim, -1))
    out = np.ascontiguousarray(np.concatenate(blocks))
    out.setflags(write=False)
    _direction_cache[key] = out
    return out[:n]


def _factor(s: np.ndarray) -> np.ndarray:
    """Batched F with F F^T = s (Cholesky; eigen-decomposition for singular matrices)."""
    try:
        return np.linalg.cholesky(s)
    except np.linalg.LinAlgError:
        lam, vec = np.linalg.eigh(s)
        return vec * np.sqrt(np.clip(lam, 0.0, None))[:, None, :]


@dataclass(frozen=True)
class OrthantResult:
    r"""Per-sample probabilities that the decision leaves / stays at the reference class.

    Attributes
    ----------
    leave : array of shape (N,)
        :math:`P(\exists j: m_j + \delta m_j \le 0)`.
    stay : array of shape (N,)
        ``1 - leave``.
    stderr : array of shape (N,)
        Integration standard error of the radial method (0 for the closed-form methods).
    """

    leave: np.ndarray  # (N,)
    stay: np.ndarray  # (N,)
    stderr: np.ndarray  # (N,)


def orthant_flip(
    margins: np.ndarray,
    covariance: np.ndarray,
    *,
    method: OrthantMethod = "radial",
    n_rotations: int = 4,
    seed: int = 0,
) -> OrthantResult:
    r"""Probability that some Gaussian margin becomes non-positive, per sample.

    Parameters
    ----------
    margins : array of shape (N, M)
        Float margins :math:`m_j` (any sign).
    covariance : array of shape (N, M, M)
        Covariance :math:`S` of the margin noise :math:`\delta m \sim N(0, S)`.
    method : {"radial", "independent", "union"}
        ``"radial"``: Deák's spherical-radial estimator over ``n_rotations`` random
        orthonormal direction sets per sample (2M directions each), with the
        most probable single-margin crossing as control variate (eq. L8-L10): accurate to
        its ``stderr``. ``"independent"``: margins treated as independent,
        :math:`1 - \prod_j \Phi(t_j)`. ``"union"``: Boole's bound
        :math:`\min(1, \sum_j \Phi(-t_j))` (eq. L11).
    n_rotations : int
        Direction sets of the radial method.
    seed : int
        Seed of the rotations (sample i always gets the same directions, which makes the
        estimate a deterministic, smooth function of the inputs).

    Returns
    -------
    OrthantResult

    Notes
    -----
    With :math:`\delta m = F\rho u`, :math:`FF^\top = S`, :math:`\rho^2 \sim \chi^2_M` and
    :math:`u` uniform on the sphere, the margins stay positive for
    :math:`\rho \in [lo(u), hi(u)]` (eq. L8), so

    .. math:: P(\text{stay}) = E_u\left[F_{\chi^2_M}(hi^2) - F_{\chi^2_M}(lo^2)\right]_+ .

    When every margin is positive (:math:`lo = 0`) the leave probability is estimated as
    :math:`\Phi(-t_{j^*}) + E_u[Q_{\chi^2_M}(hi^2) - Q_{\chi^2_M}(hi_{j^*}^2)]` (eq. L9),
    exact when only the closest margin :math:`j^*` matters.
    """
    m = np.asarray(margins, dtype=np.float64)
    s = np.asarray(covariance, dtype=np.float64)
    if m.ndim != 2 or s.shape != (m.shape[0], m.shape[1], m.shape[1]):
        raise ValueError(
            f"margins must have shape (N, M) and covariance (N, M, M), got {m.shape} and {s.shape}"
        )
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, _METHODS))}, got {method!r}")
    if not isinstance(n_rotations, int | np.integer) or n_rotations < 2:
        raise ValueError(f"n_rotations must be an integer >= 2 (for a stderr), got {n_rotations!r}")
    n, dim = m.shape
    t = _z_scores(m, np.diagonal(s, axis1=1, axis2=2))  # (eq. L11)
    stderr = np.zeros(n)
    if method == "independent":
        logstay = special.log_ndtr(t).sum(axis=1)
        return OrthantResult(-np.expm1(logstay), np.exp(logstay), stderr)
    union = special.ndtr(-t).sum(axis=1)
    if method == "union":
        leave = np.minimum(union, 1.0)
        return OrthantResult(leave, 1.0 - leave, stderr)
    leave = np.minimum(union, 1.0)
    positive = np.all(m > 0, axis=1)
    active = ~positive | (union > PRUNE_TOLERANCE)
    if np.any(active):
        rot = _directions(n, dim, int(n_rotations), int(seed))
        if np.all(active):
            lv, se = _radial(m, s, t, rot, int(n_rotations))
            leave, stderr = lv, se
        else:
            ia = np.flatnonzero(active)
            lv, se = _radial(m[ia], s[ia], t[ia], rot[ia], int(n_rotations))
            leave[ia] = lv
            stderr[ia] = se
    leave = np.clip(leave, 0.0, 1.0)
    return OrthantResult(leave, 1.0 - leave, stderr)


def _rows(a: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """``a[idx]`` without a copy when ``idx`` is every row."""
    return a if idx.size == n else a[idx]


def _radial(
    m: np.ndarray, s: np.ndarray, t: np.ndarray, rot: np.ndarray, n_rot: int
) -> tuple[np.ndarray, np.ndarray]:
    """Leave probability and its integration stderr by the radial method (eq. L8-L10).

    ``rot`` (n, M, R M) holds the rotations; the directions are their columns and the
    negatives, so each estimate array has shape (n, 2, R M): [+q, -q].
    """
    n, dim = m.shape
    f = _factor(s)  # (n, M, M)
    positive = np.all(m > 0, axis=1)
    est = np.empty((n, 2, rot.shape[2]))
    p = np.flatnonzero(positive)
    if p.size:
        est[p] = _radial_positive(_rows(m, p, n), _rows(f, p, n), _rows(t, p, n), _rows(rot, p, n))
    if p.size < n:
        g = np.flatnonzero(~positive)
        est[g] = _radial_general(m[g], f[g], rot[g])
    per_rot = est.reshape(n, 2, n_rot, dim).mean(axis=(1, 3))  # (eq. L10)
    leave = per_rot.mean(axis=1)
    se = per_rot.std(axis=1, ddof=1) / math.sqrt(n_rot)
    return leave, se


#: Chi-square tail probabilities below this are dropped (per direction, eq. L8-L9).
NEGLIGIBLE_TAIL = 1e-20


@lru_cache(maxsize=64)
def _negligible_radius_sq(half: float) -> float:
    """Squared radius beyond which the chi-square survival function is below NEGLIGIBLE_TAIL."""
    return 2.0 * float(special.gammainccinv(half, NEGLIGIBLE_TAIL))


def _chi2_sf_of_radius(half: float, radius_sq: np.ndarray) -> np.ndarray:
    r""":math:`Q_{\chi^2_M}(r^2)`, :math:`M = 2\,\text{half}`; 0 where below ``NEGLIGIBLE_TAIL``.

    For :math:`M \le 40` the finite series of the regularized upper incomplete gamma
    function at integer and half-integer shape are used (several times faster than
    ``scipy.special.gammaincc``, same accuracy): with :math:`x = r^2/2`,
    :math:`Q(n, x) = e^{-x}\sum_{k<n} x^k/k!` and
    :math:`Q(n+\tfrac12, x) = \operatorname{erfc}\sqrt x + e^{-x}\sum_{k=1}^{n}
    x^{k-1/2}/\Gamma(k+\tfrac12)`; all terms are positive, so there is no cancellation.
    """
    out = np.zeros(radius_sq.shape)
    small = radius_sq < _negligible_radius_sq(half)
    x = 0.5 * radius_sq[small]
    dim = int(round(2 * half))
    if dim > 40:
        out[small] = special.gammaincc(half, x)
        return out
    if dim % 2 == 0:
        term = np.exp(-x)
        total = term.copy()
        for k in range(1, dim // 2):
            term = term * x / k
            total += term
    else:
        sx = np.sqrt(x)
        total = special.erfc(sx)
        if dim > 1:
            term = np.exp(-x) * sx * (2.0 / math.sqrt(math.pi))  # k = 1: x^{1/2}/Gamma(3/2)
            total += term
            for k in range(2, (dim - 1) // 2 + 1):
                term = term * x / (k - 0.5)
                total += term
    out[small] = np.clip(total, 0.0, 1.0)
    return out


def _radial_positive(m: np.ndarray, f: np.ndarray, t: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Per-direction leave estimates when every margin is positive (eq. L8, L9), (n, 2, D/2)."""
    n, dim = m.shape
    half = 0.5 * dim
    # w_j(u) = -(F u)_j / m_j: constraint j is hit at radius 1 / w_j when w_j > 0 (eq. L8);
    # for the antithetic direction -u, w_j changes sign
    w = (-f / m[:, :, None]) @ rot  # (n, M, D/2)
    wmax = np.stack([w.max(axis=1), -w.min(axis=1)], axis=1)  # (n, 2, D/2): first hit
    js = np.argmin(t, axis=1)  # the closest margin, control variate (eq. L9)
    wj = w[np.arange(n), js, :]
    wj = np.stack([wj, -wj], axis=1)
    out = np.empty(wmax.shape)
    out[...] = special.ndtr(-t[np.arange(n), js])[:, None, None]
    other = (wmax > 0) & (wmax > wj)  # another margin is crossed first in direction u
    if np.any(other):
        q = _chi2_sf_of_radius(half, 1.0 / wmax[other] ** 2)
        wj_o = wj[other]
        pos = wj_o > 0
        qj = np.zeros(wj_o.shape)
        qj[pos] = _chi2_sf_of_radius(half, 1.0 / wj_o[pos] ** 2)
        out[other] += q - qj  # (eq. L9)
    return out


def _radial_general(m: np.ndarray, f: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Per-direction leave estimates for margins of any sign (eq. L8), shape (n, 2, D/2)."""
    half = 0.5 * m.shape[1]
    a1 = f @ rot  # (F u)_j, (n, M, D/2)
    a = np.stack([a1, -a1], axis=1)  # (n, 2, M, D/2)
    mm = m[:, None, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = mm / -a
    hi = np.min(np.where(a < 0, r, np.inf), axis=2)
    lo = np.maximum(np.max(np.where(a > 0, r, 0.0), axis=2), 0.0)
    dead = np.any((a == 0) & (mm <= 0), axis=2)
    stay = special.gammainc(half, 0.5 * hi**2) - special.gammainc(half, 0.5 * lo**2)
    stay = np.where((hi > lo) & ~dead, np.clip(stay, 0.0, 1.0), 0.0)
    return 1.0 - stay


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class MultilayerDistortion:
    r"""Predicted flip rate and accuracy loss of a quantized network (first-order model).

    Attributes
    ----------
    level : str
        ``"3L"``: empirical inputs, H_U, first-order propagation through the network.
    method : str
        Orthant method (``"radial"``, ``"independent"``, ``"union"``).
    n_samples : int
    flip_rate : float
        :math:`\frac1N\sum_i P(\arg\max \hat z_i \ne \hat y_i)` (eq. L7).
    flip_rate_stderr : float
        Integration standard error of ``flip_rate`` (radial method; 0 otherwise).
    accuracy_float, accuracy_quantized, accuracy_loss : float
        NaN without labels.
    coverage : float
        Nominal coverage of the one-realization bands.
    layer_names : tuple of str
    noise_variances : tuple of arrays
        :math:`\sigma_\ell^2` per layer (scalar or per channel).
    flip_probabilities : array of shape (N,)
    correct_probabilities : array of shape (N,) or None
    predictions : array of shape (N,)
    labels : array of shape (N,) or None
    flip_counts : array of shape (R,) or None
        Flips of R simulated error realizations in the linear model (eq. L12).
    correct_counts : array of shape (R,) or None
    truncation_bound : float
        With truncated Grams (many classes, eq. L19): the mean bound on the flip probability
        towards the classes not kept, added to the high end of the flip band and to both ends
        of the accuracy-loss band (0 for full Grams; NaN when no tail was estimated).
    """

    level: str
    method: str
    n_samples: int
    flip_rate: float
    flip_rate_stderr: float
    accuracy_float: float
    accuracy_quantized: float
    accuracy_loss: float
    coverage: float
    layer_names: tuple[str, ...] = field(repr=False)  # (L,)
    noise_variances: tuple[np.ndarray, ...] = field(repr=False)  # (L,) of () or (C_l,)
    flip_probabilities: np.ndarray = field(repr=False)  # (N,)
    correct_probabilities: np.ndarray | None = field(repr=False)  # (N,)
    predictions: np.ndarray = field(repr=False)  # (N,)
    labels: np.ndarray | None = field(repr=False)  # (N,)
    flip_counts: np.ndarray | None = field(repr=False)  # (R,)
    correct_counts: np.ndarray | None = field(repr=False)  # (R,)
    truncation_bound: float = 0.0

    @property
    def n_realizations(self) -> int:
        """Simulated realizations behind the bands (0 when none)."""
        return 0 if self.flip_counts is None else int(self.flip_counts.size)

    def _coverage(self, coverage: float | None) -> float:
        return self.coverage if coverage is None else check_confidence_level(coverage, "coverage")

    def flip_band(self, coverage: float | None = None) -> Band:
        """Prediction interval of the flip rate of one realization of the error (eq. L12, L15),
        widened by the truncation bound (eq. L20)."""
        band = _order_band(self.flip_counts, self.n_samples, self._coverage(coverage))
        b = self._widening()
        high = band.high + b
        return band if b == 0.0 else Band(band.low, high if math.isnan(high) else min(1.0, high))

    def _widening(self) -> float:
        b = self.truncation_bound
        return float("inf") if math.isnan(b) else float(b)

    def accuracy_loss_band(self, coverage: float | None = None) -> Band:
        """Prediction interval of the accuracy loss of one realization (eq. L12, L15).

        NaN ends without labels.
        """
        cov = self._coverage(coverage)
        if self.correct_counts is None:
            return Band(float("nan"), float("nan"))
        lo, hi = _order_band(self.correct_counts, self.n_samples, cov)
        b = self._widening()
        return Band(self.accuracy_float - hi - b, self.accuracy_float - lo + b)  # (eq. L20)

    def to_prediction(self) -> Prediction:
        """The result as a level-``"3L"`` :class:`~distortion.results.Prediction`.

        The bands are those of the simulated realizations (eq. L12); the accuracy loss has
        no integration standard error here (NaN).
        """
        return Prediction(
            level=self.level,
            flip_rate=self.flip_rate,
            flip_rate_stderr=self.flip_rate_stderr,
            flip_rate_band=self.flip_band(),
            accuracy_loss=self.accuracy_loss,
            accuracy_loss_band=self.accuracy_loss_band(),
            accuracy_float=self.accuracy_float,
            accuracy_compressed=self.accuracy_quantized,
            n_samples=self.n_samples,
            coverage=self.coverage,
            method=self.method,
        )

    def simulated_flip_rate(self) -> float:
        """Mean flip rate of the simulated realizations (linear model, exact H_U, no CLT)."""
        if self.flip_counts is None or self.flip_counts.size == 0:
            return float("nan")
        return float(np.mean(self.flip_counts)) / self.n_samples

    def to_frame(self, *, per_sample: bool = False) -> pd.DataFrame:
        """The headline numbers as one row, or one row per sample."""
        import pandas as pd

        if per_sample:
            cols: dict[str, Any] = {
                "prediction": self.predictions,
                "flip_probability": self.flip_probabilities,
            }
            if self.labels is not None:
                cols["label"] = self.labels
                cols["correct_probability"] = self.correct_probabilities
            return pd.DataFrame(cols)
        fb = self.flip_band()
        lb = self.accuracy_loss_band()
        return pd.DataFrame(
            [
                {
                    "level": self.level,
                    "method": self.method,
                    "n_samples": self.n_samples,
                    "flip_rate": self.flip_rate,
                    "flip_rate_stderr": self.flip_rate_stderr,
                    "flip_rate_low": fb.low,
                    "flip_rate_high": fb.high,
                    "accuracy_float": self.accuracy_float,
                    "accuracy_quantized": self.accuracy_quantized,
                    "accuracy_loss": self.accuracy_loss,
                    "accuracy_loss_low": lb.low,
                    "accuracy_loss_high": lb.high,
                    "coverage": self.coverage,
                    "n_realizations": self.n_realizations,
                    "truncation_bound": self.truncation_bound,
                }
            ]
        )


def _order_band(counts: np.ndarray | None, n: int, coverage: float) -> Band:
    """Order-statistic prediction interval for one more realization (eq. L12, L15).

    The one rule shared with level 3: :func:`distortion.theory._bands.order_statistic_band`.
    """
    return order_statistic_band(counts, n, coverage)


def _simulate(
    grams: GradientGrams,
    v: list[np.ndarray],
    shift: np.ndarray | None = None,
    fresh: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Flip and correct counts of the cached realizations, scaled to the variances (eq. L12),
    each realization added to the known logit ``shift`` when one is given, and, with
    ``fresh`` (N, K, K), to a noise redrawn for every sample and realization with that
    covariance (activation errors, ``theory/activations.md`` eq. A13)."""
    kappa = np.empty(grams.n_layers)
    for i, (a, prof) in enumerate(zip(v, grams.projection_scales, strict=True)):
        kappa[i] = math.sqrt(float(np.mean(a * np.ones_like(prof))) / float(np.mean(prof**2)))
    pr = grams.projections  # (N, L, R, K)
    n, L, R, k = pr.shape
    dz = (kappa.astype(pr.dtype) @ pr.reshape(n, L, R * k)).reshape(n, R, k)  # (eq. L12)
    z = grams.logits if shift is None else grams.logits + shift
    if fresh is not None:  # one independent draw per sample and realization (eq. A13)
        rng = np.random.default_rng([int(seed), 5813])
        xi = rng.standard_normal((n, k, R))
        dz = dz + np.matmul(_factor(fresh), xi).transpose(0, 2, 1).astype(dz.dtype)
    pq = np.argmax(z[:, None, :] + dz, axis=2)  # (N, R)
    flips = np.sum(pq != grams.predictions()[:, None], axis=0).astype(np.int64)
    correct = None
    if grams.labels is not None:
        correct = np.sum(pq == grams.labels[:, None], axis=0).astype(np.int64)
    return flips, correct


def multilayer_distortion(
    grams: GradientGrams,
    variances: Sequence[Any],
    *,
    method: OrthantMethod = "radial",
    n_rotations: int = 4,
    seed: int = 0,
    band: bool = True,
    coverage: float = 0.95,
    shift: np.ndarray | None = None,
    activation_covariance: np.ndarray | None = None,
) -> MultilayerDistortion:
    r"""Predicted flip rate and accuracy of the network with noisy layers (eq. L4-L7).

    Parameters
    ----------
    grams : GradientGrams
        Per-sample Gram matrices (:func:`distortion.experiments.sensitivity.gradient_grams`).
    variances : sequence of length L
        :math:`\sigma_\ell^2 = \Delta_\ell^2/12` of each cached layer: scalar (per tensor;
        0 or None keeps the layer in float) or array of shape (C_l,) (per channel).
    method : {"radial", "independent", "union"}
        How the orthant probability of the K-1 correlated margins is computed
        (see :func:`orthant_flip`).
    n_rotations, seed
        Direction sets of the radial method.
    band : bool
        Also count flips in the R cached error realizations (the band of one realization,
        eq. L12); needs ``grams.projections``.
    coverage : float
        Nominal coverage of the bands.
    shift : array of shape (N, K), optional
        A known first-order logit perturbation added to the noise (the clipped part of the
        error, ``theory/error_models.md`` eq. E7): the margins are those of
        :math:`z + s` (any sign), the decisions compared against are still the float ones,
        and every cached realization of the band gets the same shift.
    activation_covariance : array of shape (N, K, K), optional
        Covariance of an error redrawn for every sample (quantized activations,
        :meth:`distortion.experiments.activation_grams.ActivationGrams.covariance`, eq. A11
        of ``theory/activations.md``): added to the weights' covariance (eq. A12), and, in
        the band, drawn afresh for every sample of every realization (eq. A13).

    Returns
    -------
    MultilayerDistortion

    Notes
    -----
    With :math:`r = \hat y_i` (flip) or :math:`r = y_i` (correct decision),
    :math:`m = A_r z(x_i)` and :math:`\delta m \sim N(0, A_r C(x_i) A_r^\top)`:

    .. math:: P(\text{flip}_i) = 1 - P(m + \delta m > 0), \qquad
              \bar p = \frac1N \sum_i P(\text{flip}_i)   \qquad \text{(eq. L6, L7)}.

    When :math:`y_i = \hat y_i` the correct-decision probability is
    :math:`1 - P(\text{flip}_i)`; otherwise it is the orthant probability of the margins
    :math:`z_{y_i} - z_j`, some of them negative.
    """
    coverage = check_confidence_level(coverage, "coverage")
    z = grams.logits
    if shift is not None:
        s = np.asarray(shift, dtype=np.float64)
        if s.shape != z.shape:
            raise ValueError(f"shift must have shape (N, K) = {z.shape}, got {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError("shift must be finite; found NaN or inf")
        shift = s
        z = z + s
    v = _check_variances(grams, variances)
    cov = _noise_covariance(grams, v)
    fresh = None
    if activation_covariance is not None:
        fresh = np.asarray(activation_covariance, dtype=np.float64)
        if fresh.shape != cov.shape:
            raise ValueError(
                f"activation_covariance must have shape (N, K, K) = {cov.shape} (the same "
                f"samples and classes as the Grams), got {fresh.shape}"
            )
        if not np.all(np.isfinite(fresh)):
            raise ValueError("activation_covariance must be finite; found NaN or inf")
        cov = cov + fresh  # (eq. A12)
    pred = grams.predictions()
    ms = margin_statistics(z, cov, pred)
    res = orthant_flip(ms.margins, ms.covariance, method=method, n_rotations=n_rotations, seed=seed)
    flip_p = res.leave
    y = grams.labels
    correct_p = None
    acc_f = acc_q = float("nan")
    if y is not None:
        correct_p = 1.0 - flip_p
        # a label that a truncated cache does not keep (-1) is out of reach (eq. L20)
        correct_p[y < 0] = 0.0
        wrong = np.flatnonzero((y != pred) & (y >= 0))
        if wrong.size:
            mw = margin_statistics(z[wrong], cov[wrong], y[wrong])
            rw = orthant_flip(
                mw.margins, mw.covariance, method=method, n_rotations=n_rotations, seed=seed
            )
            correct_p[wrong] = rw.stay
        acc_f = float(np.mean(pred == y))
        acc_q = float(np.mean(correct_p))
    flips = correct = None
    if band:
        if grams.projections is None:
            raise ValueError(
                "band=True needs cached error realizations; recompute the cache with "
                "n_realizations > 0 or pass band=False"
            )
        flips, correct = _simulate(grams, v, shift, fresh, seed)
    n = grams.n_samples
    bound = 0.0
    if grams.truncation is not None:
        bound = float(np.mean(truncation_tail_bound(grams.truncation, v, grams.channel_offsets())))
    return MultilayerDistortion(
        level="3L",
        method=method,
        n_samples=n,
        flip_rate=float(np.mean(flip_p)),
        flip_rate_stderr=float(np.sqrt(np.sum(res.stderr**2))) / n,
        accuracy_float=acc_f,
        accuracy_quantized=acc_q,
        accuracy_loss=acc_f - acc_q,
        coverage=float(coverage),
        layer_names=grams.layer_names,
        noise_variances=tuple(v),
        flip_probabilities=flip_p,
        correct_probabilities=correct_p,
        predictions=pred,
        labels=y,
        flip_counts=flips,
        correct_counts=correct,
        truncation_bound=bound,
    )


# ----------------------------------------------------------------------------- allocation
@dataclass(frozen=True)
class LayerContributions:
    r"""Predicted flip rate and accuracy loss with one layer quantized at a time (eq. L13).

    Attributes
    ----------
    layer_names : tuple of str, length L
    bits : array of shape (B,)
    flip_rate : array of shape (L, B)
    accuracy_loss : array of shape (L, B)
    """

    layer_names: tuple[str, ...]  # (L,)
    bits: np.ndarray  # (B,)
    flip_rate: np.ndarray  # (L, B)
    accuracy_loss: np.ndarray  # (L, B)

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (layer, bits)."""
        import pandas as pd

        L, B = self.flip_rate.shape
        return pd.DataFrame(
            {
                "layer": np.repeat(self.layer_names, B),
                "bits": np.tile(self.bits, L),
                "flip_rate": self.flip_rate.ravel(),
                "accuracy_loss": self.accuracy_loss.ravel(),
            }
        )


def layer_contributions(
    grams: GradientGrams,
    variance_table: Sequence[Sequence[Any]],
    bits: Sequence[int],
    *,
    method: OrthantMethod = "radial",
    n_rotations: int = 4,
    seed: int = 0,
) -> LayerContributions:
    r"""Flip rate and accuracy loss of each layer quantized alone, at each bit-width.

    Parameters
    ----------
    grams : GradientGrams
    variance_table : nested sequence of shape (L, B)
        ``variance_table[l][i]``: :math:`\sigma^2` of layer l at ``bits[i]`` (scalar or (C_l,)).
    bits : sequence of int of length B

    Returns
    -------
    LayerContributions
        The terms of the additive surrogate (eq. L13).
    """
    bits_arr = np.asarray(list(bits), dtype=np.int64)
    L = grams.n_layers
    if len(variance_table) != L or any(len(row) != bits_arr.size for row in variance_table):
        raise ValueError(f"variance_table must have shape (L, B) = ({L}, {bits_arr.size})")
    flip = np.zeros((L, bits_arr.size))
    loss = np.zeros((L, bits_arr.size))
    for li in range(L):
        for bi in range(bits_arr.size):
            v: list[Any] = [0.0] * L
            v[li] = variance_table[li][bi]
            r = multilayer_distortion(
                grams, v, method=method, n_rotations=n_rotations, seed=seed, band=False
            )
            flip[li, bi] = r.flip_rate
            loss[li, bi] = r.accuracy_loss
    return LayerContributions(grams.layer_names, bits_arr, flip, loss)


@dataclass(frozen=True)
class KnapsackSolution:
    """Exact solution of the multiple-choice knapsack (eq. L14).

    Attributes
    ----------
    choice : array of shape (L,)
        Index of the option chosen for each item.
    total_cost : int
    total_value : float
    """

    choice: np.ndarray  # (L,)
    total_cost: int
    total_value: float


def knapsack_allocation(costs: np.ndarray, values: np.ndarray, budget: int) -> KnapsackSolution:
    r"""Minimize :math:`\sum_\ell v_{\ell c_\ell}` s.t. :math:`\sum_\ell w_{\ell c_\ell} \le B`.

    Exact dynamic programming over integer costs (a multiple-choice knapsack), after
    removing each layer's cheapest option from the budget and dividing costs by their
    greatest common divisor (eq. L14).

    Parameters
    ----------
    costs : int array of shape (L, B)
        Cost of option b of item l (e.g. :math:`n_\ell b` bits), >= 0.
    values : float array of shape (L, B)
        Value to minimize (e.g. the per-layer flip rate).
    budget : int
        Largest total cost.

    Returns
    -------
    KnapsackSolution

    Raises
    ------
    ValueError
        Inconsistent shapes, non-finite values, or a budget below the cheapest allocation.
    """
    w = np.asarray(costs)
    v = np.asarray(values, dtype=np.float64)
    if w.ndim != 2 or v.shape != w.shape or w.size == 0:
        raise ValueError(
            f"costs and values must have the same shape (L, B), got {w.shape} and {v.shape}"
        )
    if not np.issubdtype(w.dtype, np.integer) or np.any(w < 0):
        raise ValueError("costs must be non-negative integers")
    if not np.all(np.isfinite(v)):
        raise ValueError("values must be finite")
    budget = int(budget)
    w = w.astype(np.int64)
    base = w.min(axis=1)
    spare = budget - int(base.sum())
    if spare < 0:
        raise ValueError(
            f"budget {budget} is impossible: the cheapest allocation costs {int(base.sum())}; "
            "raise the budget or allow fewer bits"
        )
    extra = w - base[:, None]
    g = int(np.gcd.reduce(extra[extra > 0])) if np.any(extra > 0) else 1
    ex = extra // g
    cap = min(spare // g, int(ex.max(axis=1).sum()))
    L, B = w.shape
    dp = np.zeros(cap + 1)
    choice = np.zeros((L, cap + 1), dtype=np.int16 if B < 32000 else np.int32)
    for li in range(L):
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=choice.dtype)
        for bi in range(B):
            c = int(ex[li, bi])
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = dp[: cap + 1 - c] + v[li, bi]
            better = cand < new
            new[better] = cand[better]
            arg[better] = bi
        dp = new
        choice[li] = arg
    c = cap
    pick = np.zeros(L, dtype=np.int64)
    for li in range(L - 1, -1, -1):
        pick[li] = choice[li, c]
        c -= int(ex[li, pick[li]])
    total_cost = int(w[np.arange(L), pick].sum())
    return KnapsackSolution(pick, total_cost, float(v[np.arange(L), pick].sum()))
