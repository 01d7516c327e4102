r"""AccuracyLossEstimator: predicted accuracy loss of a quantized network, per bit-width.

A scikit-learn-like object. Fit it once, then ask for predictions:

* :meth:`AccuracyLossEstimator.fit` — the last layer only, from a
  :class:`~distortion.experiments.features.FeatureSet` (penultimate features, labels,
  ``W``, ``b``): level 3 of ``ARCHITECTURE.md`` (empirical features, uniform error H_U),
  :func:`distortion.theory.multiclass.semiparametric_distortion`;
* :meth:`AccuracyLossEstimator.fit_model` — several layers of a network, from per-sample
  Gram matrices of the logit Jacobians (computed and cached by
  :func:`distortion.experiments.sensitivity.gradient_grams`): the first-order model
  "3L" of :mod:`distortion.theory.multilayer`.

Then :meth:`~AccuracyLossEstimator.predict` gives, per bit-width, the predicted flip rate
and accuracy loss with the band of one realization of the error;
:meth:`~AccuracyLossEstimator.min_bits` the smallest bit-width within a loss budget; and
:meth:`~AccuracyLossEstimator.allocate` a mixed-precision allocation under a size budget
(exact knapsack over the additive per-layer model, eq. L13-L14 of
``theory/multilayer.md``), re-evaluated with the full closed form.

This module imports neither torch nor matplotlib at import time.

Examples
--------
>>> from distortion import AccuracyLossEstimator, UniformQuantizer  # doctest: +SKIP
>>> est = AccuracyLossEstimator(UniformQuantizer(4)).fit_model(model, dataset)  # doctest: +SKIP
>>> est.predict(bits=range(2, 9)).to_frame()  # doctest: +SKIP
>>> est.allocate(avg_bits=4).to_frame()  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from distortion.compression import Compressed, error_second_moment, realization_seed
from distortion.quantize import UniformQuantizer
from distortion.results import Band, Prediction
from distortion.theory._bands import min_realizations
from distortion.theory.multilayer import (
    GradientGrams,
    LayerContributions,
    MultilayerDistortion,
    knapsack_allocation,
    layer_contributions,
    multilayer_distortion,
)

__all__ = [
    "AccuracyLossEstimator",
    "AccuracyLossPrediction",
    "BitAllocation",
    "CompressionAllocation",
]

Objective = Literal["flip_rate", "accuracy_loss"]


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class AccuracyLossPrediction:
    r"""Predicted flip rate and accuracy loss of a quantized network, per bit-width.

    Attributes
    ----------
    bits : array of shape (B,)
    flip_rate : array of shape (B,)
        Expected fraction of changed decisions.
    flip_rate_stderr : array of shape (B,)
        Standard error of the integration of ``flip_rate`` (0 when exact).
    flip_rate_low, flip_rate_high : arrays of shape (B,)
        Prediction band of the flip rate of one realization of the error.
    accuracy_float : float
    accuracy_quantized : array of shape (B,)
    accuracy_loss : array of shape (B,)
        ``accuracy_float - accuracy_quantized``.
    accuracy_loss_low, accuracy_loss_high : arrays of shape (B,)
        Prediction band of the accuracy loss of one realization.
    level : str
        What produced it: ``"3"`` (last layer, empirical features, H_U) or ``"3L"``
        (several layers, first-order propagation, empirical inputs, H_U).
    method : str
        Orthant method (``"radial"``, ``"independent"``, ``"union"``) or ``"gauss-hermite"``.
    layers : tuple of str
        The quantized layers.
    quantizer : UniformQuantizer
        The quantizer (its ``bits`` replaced by each entry of ``bits``).
    n_samples : int
    coverage : float
        Nominal coverage of the bands.
    hu_deviation : array of shape (B,) or None
        A check of the uniform hypothesis that costs no data: over the quantized layers, the
        largest :math:`|\overline{e^2}/E[e^2] - 1|` of the actual quantization error against
        its error model (:math:`\Delta^2/12` for nearest rounding, eq. E1; the exact eq. E2
        for stochastic rounding): the effect
        :math:`12\,\overline{u^2} - 1` of the second-moment test of ``theory/hypotheses.md``
        (section "H_U: tests"), on :math:`u = e/\Delta` with per-channel steps row by row,
        and the relative error that ``error_variance="uniform"`` passes on to
        :math:`\sigma^2` (``theory/multilayer.md``, eq. L4).
    hu_fail_share : array of shape (B,) or None
        Fraction of the quantized layers whose deviation exceeds the "fails" threshold of
        :class:`distortion.stats.UniformThresholds` (20 %). A large share means the
        prediction is not to be trusted; a small one does not guarantee it, as the
        first-order propagation can fail on its own. On CIFAR-10 ResNet-20 with every layer
        quantized per tensor it is 100 % at 2 bits and 35 % at 3, where the predicted flip
        rates (0.62, 0.28) fall far short of the measured ones (0.88, 0.71); per channel it is
        90 % at 2 bits but 0 % at 3, where the prediction (0.16) still falls short of the
        measurement (0.25). From 4 bits on the predictions were within their bands.
    """

    bits: np.ndarray  # (B,)
    flip_rate: np.ndarray  # (B,)
    flip_rate_low: np.ndarray  # (B,)
    flip_rate_high: np.ndarray  # (B,)
    accuracy_float: float
    accuracy_quantized: np.ndarray  # (B,)
    accuracy_loss: np.ndarray  # (B,)
    accuracy_loss_low: np.ndarray  # (B,)
    accuracy_loss_high: np.ndarray  # (B,)
    level: str
    method: str
    layers: tuple[str, ...] = field(repr=False)
    quantizer: UniformQuantizer = field(repr=False, default=None)
    n_samples: int = 0
    coverage: float = 0.95
    hu_deviation: np.ndarray | None = None  # (B,)
    hu_fail_share: np.ndarray | None = None  # (B,)
    flip_rate_stderr: np.ndarray | None = None  # (B,)

    def predictions(self) -> list[Prediction]:
        """One :class:`~distortion.results.Prediction` per bit-width (the shared shape)."""
        nan = np.full(self.bits.shape, np.nan)
        se = nan if self.flip_rate_stderr is None else self.flip_rate_stderr
        return [
            Prediction(
                level=self.level, flip_rate=float(self.flip_rate[i]),
                flip_rate_stderr=float(se[i]),
                flip_rate_band=Band(self.flip_rate_low[i], self.flip_rate_high[i]),
                accuracy_loss=float(self.accuracy_loss[i]),
                accuracy_loss_band=Band(self.accuracy_loss_low[i], self.accuracy_loss_high[i]),
                accuracy_float=self.accuracy_float,
                accuracy_compressed=float(self.accuracy_quantized[i]),
                n_samples=self.n_samples, coverage=self.coverage, method=self.method,
            )  # fmt: skip
            for i in range(self.bits.size)
        ]

    def to_frame(self) -> pd.DataFrame:
        """One row per bit-width."""
        q = self.quantizer
        return pd.DataFrame(
            {
                "bits": self.bits,
                "flip_rate": self.flip_rate,
                "flip_rate_stderr": np.nan
                if self.flip_rate_stderr is None
                else self.flip_rate_stderr,
                "flip_rate_low": self.flip_rate_low,
                "flip_rate_high": self.flip_rate_high,
                "accuracy_float": self.accuracy_float,
                "accuracy_quantized": self.accuracy_quantized,
                "accuracy_loss": self.accuracy_loss,
                "accuracy_loss_low": self.accuracy_loss_low,
                "accuracy_loss_high": self.accuracy_loss_high,
                "level": self.level,
                "method": self.method,
                "n_layers": len(self.layers),
                "granularity": None if q is None else q.granularity,
                "scheme": None if q is None else q.scheme,
                "n_samples": self.n_samples,
                "hu_deviation": np.nan if self.hu_deviation is None else self.hu_deviation,
                "hu_fail_share": np.nan if self.hu_fail_share is None else self.hu_fail_share,
            }
        )


@dataclass(frozen=True)
class BitAllocation:
    r"""A mixed-precision allocation and its predicted effect.

    Attributes
    ----------
    layer_names : tuple of str, length L
    bits : array of shape (L,)
        Bits of each layer.
    n_weights : array of shape (L,)
    budget_bits : int
        The size budget (bits over the quantized weights).
    total_bits : int
        :math:`\sum_\ell n_\ell b_\ell \le` ``budget_bits``.
    objective : str
        ``"flip_rate"`` or ``"accuracy_loss"``: what the knapsack minimized.
    surrogate : float
        The additive surrogate :math:`\sum_\ell f_\ell(b_\ell)` at the optimum (eq. L13).
    flip_rate, accuracy_loss : float
        The allocation re-evaluated with the full closed form (eq. L6-L7).
    prediction : MultilayerDistortion
        That evaluation (bands included when realizations are cached).
    contributions : LayerContributions
        The per-layer terms :math:`f_\ell(b)` the knapsack used.
    point_names : tuple of str, length P
        Activation points (W+A allocations only; empty otherwise).
    activation_bits : array of shape (P,) or None
        Bits of each point.
    point_sizes : array of shape (P,) or None
        Entries of each point per sample.
    activation_budget_bits, activation_total_bits : int or None
        The activations' budget and size (bits per sample), :math:`\sum_p m_p a_p`.
    activation_bit_options : array of shape (B_a,) or None
    activation_contributions : array of shape (P, B_a) or None
        Each point's term :math:`g_p(a)` (eq. A15): the flip rate (or loss) with that point
        alone at a bits.
    """

    layer_names: tuple[str, ...]  # (L,)
    bits: np.ndarray  # (L,)
    n_weights: np.ndarray  # (L,)
    budget_bits: int
    total_bits: int
    objective: str
    surrogate: float
    flip_rate: float
    accuracy_loss: float
    prediction: MultilayerDistortion = field(repr=False, default=None)
    contributions: LayerContributions = field(repr=False, default=None)
    point_names: tuple[str, ...] = ()
    activation_bits: np.ndarray | None = None  # (P,)
    point_sizes: np.ndarray | None = None  # (P,)
    activation_budget_bits: int | None = None
    activation_total_bits: int | None = None
    activation_bit_options: np.ndarray | None = field(repr=False, default=None)  # (B_a,)
    activation_contributions: np.ndarray | None = field(repr=False, default=None)  # (P, B_a)

    def avg_activation_bits(self) -> float:
        """Average bits per activation entry (NaN without activations)."""
        if self.activation_bits is None:
            return float("nan")
        return self.activation_total_bits / float(self.point_sizes.sum())

    def activation_dict(self) -> dict[str, int]:
        """``{point: bits}`` of the activations (empty without activations)."""
        if self.activation_bits is None:
            return {}
        return {n: int(b) for n, b in zip(self.point_names, self.activation_bits, strict=True)}

    def avg_bits(self) -> float:
        """Average bits per weight of the allocation."""
        return self.total_bits / float(self.n_weights.sum())

    def as_dict(self) -> dict[str, int]:
        """``{layer name: bits}`` (what :meth:`AccuracyLossEstimator.predict_allocation` takes)."""
        return {n: int(b) for n, b in zip(self.layer_names, self.bits, strict=True)}

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: weights, bits, and its additive-model term at those bits."""
        contrib = np.full(len(self.layer_names), np.nan)
        if self.contributions is not None:
            c = self.contributions
            table = c.flip_rate if self.objective == "flip_rate" else c.accuracy_loss
            col = {int(b): i for i, b in enumerate(c.bits)}
            contrib = np.array([table[i, col[int(b)]] for i, b in enumerate(self.bits)])
        frame = pd.DataFrame(
            {
                "layer": list(self.layer_names),
                "n_weights": self.n_weights,
                "bits": self.bits,
                "contribution": contrib,
                "kind": "weights",
            }
        )
        if self.activation_bits is None:
            return frame
        col = {int(b): i for i, b in enumerate(self.activation_bit_options)}
        acts = pd.DataFrame(
            {
                "layer": list(self.point_names),
                "n_weights": self.point_sizes,  # entries per sample
                "bits": self.activation_bits,
                "contribution": [self.activation_contributions[i, col[int(b)]]
                                 for i, b in enumerate(self.activation_bits)],  # fmt: skip
                "kind": "activations",
            }
        )
        return pd.concat([frame, acts], ignore_index=True)


@dataclass(frozen=True)
class CompressionAllocation:
    r"""A per-layer strength for any compressor family under a size budget (eq. C24).

    Attributes
    ----------
    layer_names : tuple of str, length L
    strengths : tuple, length L
        The chosen strength (sparsity, rank, energy, clusters, bits...) of each layer.
    strength_options : tuple, length S
        The strengths the knapsack chose from.
    cost : {"parameters", "bits"}
        What the budget counts (``theory/compression.md`` eqs. C18-C23).
    sizes : int array of shape (L, S)
        Each layer's size at each strength, in ``cost`` units.
    dense_size : int
        The float model's size in the same units (:math:`\sum_\ell n_\ell` or
        :math:`\sum_\ell n_\ell f`).
    budget : int
    total : int
        :math:`\sum_\ell` size of the chosen strengths, :math:`\le` ``budget``.
    cost_unit : int
        Costs were rounded up to multiples of this before the exact DP (1: no rounding).
    objective : str
        ``"flip_rate"`` or ``"accuracy_loss"``.
    surrogate : float
        :math:`\sum_\ell f_\ell(s_\ell)` at the optimum.
    contributions : float array of shape (L, S)
        :math:`f_\ell(s)`: the objective with layer :math:`\ell` alone compressed at s.
    flip_rate, accuracy_loss : float
        Every layer compressed at its strength, the full closed form.
    prediction : Prediction
        That evaluation (with the band when realizations are cached).
    """

    layer_names: tuple[str, ...]  # (L,)
    strengths: tuple  # (L,)
    strength_options: tuple  # (S,)
    cost: str
    sizes: np.ndarray = field(repr=False)  # (L, S)
    dense_size: int
    budget: int
    total: int
    cost_unit: int
    objective: str
    surrogate: float
    contributions: np.ndarray = field(repr=False)  # (L, S)
    flip_rate: float
    accuracy_loss: float
    prediction: Prediction = field(repr=False, default=None)

    def ratio(self) -> float:
        """The allocation's size over the float model's (e.g. 1 - global sparsity)."""
        return self.total / float(self.dense_size)

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: its strength, size and additive-model term."""
        col = {s: i for i, s in enumerate(self.strength_options)}
        idx = [col[s] for s in self.strengths]
        rows = np.arange(len(self.layer_names))
        return pd.DataFrame({
            "layer": list(self.layer_names),
            "strength": list(self.strengths),
            self.cost: self.sizes[rows, idx],
            "contribution": self.contributions[rows, idx],
        })  # fmt: skip


# ----------------------------------------------------------------------------- estimator
def _first_samples(data: Any, n: int) -> Any:
    """The first ``n`` samples of any data form ``fit_model`` takes (all if fewer)."""
    from distortion.experiments.compare import _first_images

    if getattr(data, "images", None) is not None:
        return _first_images(data, n)
    import torch

    from distortion.experiments.sensitivity import _batches

    xs, ys, have = [], [], 0
    for x, y in _batches(data, min(n, 256)):
        xs.append(x)
        ys.append(y)
        have += x.shape[0]
        if have >= n:
            break
    x = torch.cat(xs)[:n]
    if any(y is None for y in ys):
        return x
    return x, torch.cat(ys)[:n]


def _check_bits_list(bits: Iterable[int] | int, name: str = "bits") -> np.ndarray:
    """Sorted distinct bit-widths, each an integer in 1..16 (no silent coercion)."""

    def bad(detail: str) -> ValueError:
        return ValueError(f"{name} must be integers in 1..16 ({detail}), got {bits!r}")

    if isinstance(bits, str | bytes):
        raise bad("a string is not a list of bit-widths: pass e.g. [16] or range(2, 9)")
    if isinstance(bits, int | np.integer) and not isinstance(bits, bool):
        bits = [int(bits)]
    try:
        items = list(bits)
    except TypeError:
        raise bad("not an iterable of integers") from None
    out = set()
    for b in items:
        if isinstance(b, bool) or not isinstance(b, int | np.integer):
            if isinstance(b, float | np.floating) and float(b).is_integer():
                b = int(b)
            else:
                raise bad(f"{b!r} is not an integer")
        out.add(int(b))
    arr = np.array(sorted(out), dtype=np.int64)
    if arr.size == 0 or arr.min() < 1 or arr.max() > 16:
        raise bad("a non-empty set in range")
    return arr


class AccuracyLossEstimator:
    r"""Predict the accuracy loss of a network whose weights are quantized.

    Parameters
    ----------
    quantizer : UniformQuantizer, optional
        Scheme, granularity and clipping of the quantizer (its ``bits`` is the default
        bit-width). Default ``UniformQuantizer(8)`` (symmetric, per tensor, max, nearest).
    layers : "all", "last" or sequence of str
        Layers :meth:`fit_model` analyses (and quantizes in :meth:`predict`).
    method : {"radial", "independent", "union"}
        Orthant method of the multi-layer model (see
        :func:`distortion.theory.multilayer.orthant_flip`).
    error_variance : {"uniform", "empirical"}
        :math:`\sigma^2` of each layer's error: :math:`\Delta^2/12` (H_U, default), or the
        actual mean square :math:`\|Q(W) - W\|^2/n` of the quantized weights (per tensor or
        per channel), which accounts for the occupancy of the zero bin and for clipping.
    coverage : float
        Nominal coverage of the one-realization bands.
    n_realizations : int
        Error realizations behind the bands (>= 39 for a 95 % band; 0: no band).
    n_rotations : int
        Direction sets of the radial method.
    seed : int
        Seeds the realizations and the radial directions.
    cache_dir : path, optional
        Where :meth:`fit_model` caches the Gram matrices.
    device : str
        Device of :meth:`fit_model`.
    batch_size : int, optional
        Samples per batch of the Gram computation in :meth:`fit_model` (default: as many
        as ``memory_mb`` allows, at most 256).
    memory_mb : int, optional
        Memory budget (MiB) of one batch's per-sample Jacobians in :meth:`fit_model`
        (default 256); raise it on a large machine, lower it on a small one.
    progress : bool
        Progress bars in :meth:`fit_model`.

    Attributes
    ----------
    grams_ : GradientGrams
        After :meth:`fit_model` / :meth:`fit_grams`.
    features_, labels_, W_, b_ : arrays
        After :meth:`fit`.
    level_ : str
        ``"3"`` (after :meth:`fit`) or ``"3L"`` (after :meth:`fit_model`).

    Notes
    -----
    The error second moment :math:`\sigma^2` of a b-bit layer is the one the quantizer's
    error model gives (:meth:`UniformQuantizer.compress`, ``theory/error_models.md``):
    :math:`\Delta^2/12` under H_U for nearest rounding and dither (eq. E1), the exact
    :math:`\Delta^2\,\overline{p(1-p)}` for stochastic rounding (eq. E2, :math:`\Delta^2/6`
    on average), with the step :math:`\Delta` computed from the actual weights, per tensor
    or per output channel. Every realization is seeded from ``seed`` and the layer index.
    """

    def __init__(
        self,
        quantizer: UniformQuantizer | None = None,
        *,
        layers: str | Sequence[str] = "all",
        method: Literal["radial", "independent", "union"] = "radial",
        error_variance: Literal["uniform", "empirical"] = "uniform",
        coverage: float = 0.95,
        n_realizations: int = 40,
        n_rotations: int = 4,
        seed: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        batch_size: int | None = None,
        memory_mb: int | None = None,
        progress: bool = True,
    ) -> None:
        if quantizer is None:
            quantizer = UniformQuantizer(8)
        if not isinstance(quantizer, UniformQuantizer):
            raise ValueError(
                f"quantizer must be a UniformQuantizer, got {type(quantizer).__name__}"
            )
        if method not in ("radial", "independent", "union"):
            raise ValueError(
                f"method must be one of 'radial', 'independent', 'union', got {method!r}"
            )
        if error_variance not in ("uniform", "empirical"):
            raise ValueError(
                f"error_variance must be 'uniform' or 'empirical', got {error_variance!r}"
            )
        if not 0 < coverage < 1:
            raise ValueError(f"coverage must be in (0, 1), got {coverage!r}")
        if (
            isinstance(n_realizations, bool)
            or not isinstance(n_realizations, int | np.integer)
            or n_realizations < 0
        ):
            raise ValueError(f"n_realizations must be an integer >= 0, got {n_realizations!r}")
        if 0 < n_realizations < min_realizations(coverage):
            raise ValueError(
                f"n_realizations={n_realizations} cannot give a {coverage:.0%} band: it needs at "
                f"least {min_realizations(coverage)} realizations (or 0 for no band)"
            )
        if memory_mb is not None and (
            isinstance(memory_mb, bool) or not isinstance(memory_mb, int | np.integer)
            or memory_mb < 1
        ):  # fmt: skip
            raise ValueError(f"memory_mb must be a positive integer (MiB), got {memory_mb!r}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer)
            or batch_size < 1
        ):  # fmt: skip
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.quantizer = quantizer
        self.layers = layers
        self.method = method
        self.error_variance = error_variance
        self.coverage = coverage
        self.n_realizations = n_realizations
        self.n_rotations = n_rotations
        self.seed = seed
        self.cache_dir = cache_dir
        self.device = device
        self.batch_size = batch_size
        self.memory_mb = memory_mb
        self.progress = progress
        self._steps: dict[tuple[Any, ...], np.ndarray] = {}

    def __repr__(self) -> str:
        fitted = getattr(self, "level_", None)
        return (
            f"AccuracyLossEstimator(quantizer={self.quantizer!r}, method={self.method!r}, "
            f"fitted={'level ' + fitted if fitted else 'no'})"
        )

    # -- fitting ------------------------------------------------------------------------
    def fit(self, feature_set: Any, labels: np.ndarray | None = None) -> AccuracyLossEstimator:
        """Fit the last-layer model (level 3) on penultimate features.

        Parameters
        ----------
        feature_set : FeatureSet
            Or any object with ``features`` (N, d), ``W`` (K, d), ``b`` (K,) and
            ``labels`` (N,) attributes.
        labels : array of shape (N,), optional
            Overrides ``feature_set.labels``.

        Returns
        -------
        self
        """
        missing = [a for a in ("features", "W") if not hasattr(feature_set, a)]
        if missing:
            raise ValueError(
                f"feature_set must be a FeatureSet (missing {missing}); extract one with "
                "distortion.experiments.features.extract_features, or use fit_model"
            )
        x = np.asarray(feature_set.features, dtype=np.float64)
        w = np.asarray(feature_set.W, dtype=np.float64)
        b = getattr(feature_set, "b", None)
        b = np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(
                f"features {x.shape} and W {w.shape} must be (N, d) and (K, d) with the same d"
            )
        if b.shape != (w.shape[0],):
            raise ValueError(f"b must have shape ({w.shape[0]},) (one per row of W), got {b.shape}")
        y = labels if labels is not None else getattr(feature_set, "labels", None)
        if y is not None:
            y = np.asarray(y)
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels must have shape ({x.shape[0]},), got {y.shape}")
            if y.size and (y.min() < 0 or y.max() >= w.shape[0]):
                raise ValueError(
                    f"labels must lie in 0..{w.shape[0] - 1}: K mismatch between the labels "
                    f"(max {int(y.max())}) and W ({w.shape[0]} rows)"
                )
            y = y.astype(np.int64)
        logits = getattr(feature_set, "logits", None)
        if logits is not None and np.shape(logits)[1:] != (w.shape[0],):
            raise ValueError(
                f"K mismatch: the logits have {np.shape(logits)[1]} classes but W has "
                f"{w.shape[0]} rows"
            )
        self.features_, self.W_, self.b_, self.labels_ = x, w, b, y
        self.level_ = "3"
        self.layers_ = ("last",)
        self.grams_ = None
        self.bias_correction_ = None
        self.input_noise_ = None
        self._steps = {}
        return self

    def fit_model(
        self,
        model: Any,
        dataset: Any,
        *,
        layers: str | Sequence[str] | None = None,
        granularity: Literal["tensor", "channel"] | None = None,
        competitors: int | None = None,
        bias_correction: Any = None,
        input_noise: int = 0,
    ) -> AccuracyLossEstimator:
        """Fit the multi-layer model: per-sample Gram matrices of the logit Jacobians.

        Parameters
        ----------
        model : torch.nn.Module
            Any classifier with logits of shape (B, K); its convolutions, linear layers and
            attention projections are the layers (see
            :func:`~distortion.experiments.sensitivity.resolve_quantizable`).
        dataset : DataLoader, Dataset, (x, y), tensor or ImageDataset
            The samples the prediction is about (labels give the accuracy): a
            ``torch.utils.data.DataLoader`` of (x, y) batches (not shuffled), a
            ``TensorDataset`` or other map-style ``Dataset`` of (x, y) items, a pair of
            inputs (N, ...) and labels (N,), inputs alone, or an
            :class:`~distortion.experiments.data.ImageDataset`. A progress bar shows on a
            terminal when ``progress`` is set.
        layers : "all", "last" or sequence of str, optional
            Default: the ``layers`` given to the constructor.
        granularity : {"tensor", "channel"}, optional
            Default: the quantizer's.
        competitors : int, optional
            For many classes: keep the m nearest competitors of each sample (m + 2 backward
            passes per batch instead of K; the prediction's band carries the bound on the
            other classes, ``theory/multilayer.md`` eq. L17-L20). None: all K classes.
        bias_correction : calibration data or InputMeans, optional
            Predict for the *bias-corrected* compressed network (each layer's bias shifted by
            its mean output error on these calibration samples, as DFQ, AIMET and NNCF do at
            low bits; :mod:`~distortion.experiments.bias_correction`, eq. L22): the Grams are
            those of the centred inputs (eq. L23), and every prediction of this estimator
            is then for the corrected network. Pass calibration samples disjoint from
            ``dataset`` (any form ``dataset`` accepts), or means already computed with
            :func:`~distortion.experiments.bias_correction.input_means`. Apply the same
            correction to the network you measure or deploy
            (``measure(..., bias_correction=self.bias_correction_)``).
        input_noise : int
            Also estimate, on the first ``input_noise`` samples of ``dataset``, how much
            noise each layer's input carries from the layers before it (the ratios of
            ``theory/multilayer.md`` eq. L26, :func:`~distortion.experiments.input_noise.
            input_noise`, cached), and inflate every layer's second moment by it in the
            predictions (eq. L25, level 3I): the cross-layer term that matters from 3 bits
            down. A few hundred samples are plenty. 0: first order only. The per-layer
            costs of :meth:`allocate` stay first-order (additive); its final prediction and
            :meth:`predict_allocation` include the term.

        Returns
        -------
        self
        """
        from distortion.experiments.bias_correction import InputMeans, input_means
        from distortion.experiments.sensitivity import gradient_grams

        if isinstance(input_noise, bool) or not isinstance(input_noise, int) or input_noise < 0:
            raise ValueError(f"input_noise must be an integer >= 0 (samples), got {input_noise!r}")
        chosen = self.layers if layers is None else layers
        means = bias_correction
        if means is not None and not isinstance(means, InputMeans):
            means = input_means(
                model, means, layers=chosen, device=self.device, progress=self.progress
            )

        # another form of data: a ValueError listing the accepted ones (from gradient_grams)
        grams = gradient_grams(
            model,
            dataset,
            layers=chosen,
            granularity=granularity or self.quantizer.granularity,
            n_realizations=self.n_realizations,
            batch_size=self.batch_size,
            **({} if self.memory_mb is None else {"memory_mb": int(self.memory_mb)}),
            seed=self.seed,
            device=self.device,
            cache_dir=self.cache_dir,
            progress=self.progress,
            competitors=competitors,
            input_means=means,
        )
        self.fit_grams(grams)
        self.bias_correction_ = means
        if input_noise:
            from distortion.experiments.input_noise import input_noise as estimate

            self.input_noise_ = estimate(
                model, _first_samples(dataset, input_noise),
                layers=list(grams.layer_names), granularity=grams.meta.get("granularity",
                self.quantizer.granularity), bias_correction=means, seed=self.seed,
                device=self.device, cache_dir=self.cache_dir, progress=self.progress,
            )  # fmt: skip
        return self

    def fit_grams(self, grams: GradientGrams) -> AccuracyLossEstimator:
        """Fit the multi-layer model from already computed :class:`GradientGrams`."""
        if not isinstance(grams, GradientGrams):
            raise ValueError(f"grams must be a GradientGrams, got {type(grams).__name__}")
        if grams.weights is None:
            raise ValueError("grams must hold the layers' weights (to compute the steps)")
        self.grams_ = grams
        self.level_ = "3L"
        self.layers_ = grams.layer_names
        self.features_ = self.W_ = self.b_ = self.labels_ = None
        self.bias_correction_ = None
        self.input_noise_ = None
        self._steps = {}
        return self

    def _check_fitted(self, multilayer: bool = False) -> None:
        if getattr(self, "level_", None) is None:
            raise ValueError("the estimator is not fitted: call fit(feature_set) or fit_model")
        if multilayer and self.level_ != "3L":
            raise ValueError(
                "this needs the multi-layer model: call fit_model(model, dataset) first"
            )

    # -- steps --------------------------------------------------------------------------
    def _step(self, li: int, q: UniformQuantizer) -> np.ndarray:
        return np.asarray(self._compressed(li, q).detail.step, dtype=np.float64)

    def layer_steps(self, allocation: Mapping[str, int], quantizer=None) -> list[np.ndarray | None]:
        r"""Quantization steps :math:`\Delta_\ell` (None for float layers) of an allocation."""
        self._check_fitted(multilayer=True)
        q = self._quantizer(quantizer)
        bits = self._allocation_bits(allocation)
        return [None if b == 0 else self._step(i, q.with_bits(int(b))) for i, b in enumerate(bits)]

    def _compressed(self, li: int, q: UniformQuantizer) -> Compressed:
        """Layer ``li`` compressed by ``q``, one seeded realization (memoized)."""
        key = ("c", li, q)
        if key not in self._steps:
            w = self.grams_.weights[li] if self.level_ == "3L" else self.W_
            self._steps[key] = q.compress(w, seed=realization_seed(self.seed, li))
        return self._steps[key]

    def _variance(self, li: int, q: UniformQuantizer) -> np.ndarray:
        r"""Error second moment of layer ``li`` under ``q``: () per tensor, (C,) per channel.

        Read from the compressor's error model (``"uniform"``: eq. E1 / E2 of
        ``theory/error_models.md``) or the actual mean square (``"empirical"``, eq. E4).
        """
        return error_second_moment(self._compressed(li, q), self.error_variance)  # (eq. L4)

    def _mean_square(self, li: int, q: UniformQuantizer) -> np.ndarray:
        r"""Mean square of layer ``li``'s actual error :math:`Q(W) - W` under ``q``."""
        return error_second_moment(self._compressed(li, q), "empirical")

    def _hu_deviation(self, li: int, q: UniformQuantizer) -> float:
        r"""Relative deviation :math:`\overline{e^2}/E[e^2] - 1` of layer ``li``'s actual
        error from its error model under ``q`` (zero-variance channels skipped: the rows are
        of equal size, so this is the mean over channels of their ratios)."""
        c = self._compressed(li, q)
        ref = np.atleast_1d(c.error_model.second_moment)
        ms = np.broadcast_to(np.atleast_1d(self._mean_square(li, q)), ref.shape)
        ok = ref > 0
        return float(np.mean(ms[ok] / ref[ok]) - 1.0) if ok.any() else 0.0

    def _hu_check(self, b: int, q: UniformQuantizer) -> dict[str, float]:
        from distortion.stats import UniformThresholds

        fails = UniformThresholds().second_moment[1]
        n = len(self.grams_.layer_names) if self.level_ == "3L" else 1
        dev = np.abs([self._hu_deviation(i, q.with_bits(b)) for i in range(n)])
        return {"hu_deviation": float(dev.max()), "hu_fail_share": float(np.mean(dev > fails))}

    def _variances(self, bits: np.ndarray, q: UniformQuantizer) -> list[Any]:
        v = [0.0 if b == 0 else self._variance(i, q.with_bits(int(b))) for i, b in enumerate(bits)]
        return self._inflated(v)

    def _inflated(self, m2: list[Any]) -> list[Any]:
        """The second moments with the input-noise term (eq. L25) when it was fitted."""
        noise = getattr(self, "input_noise_", None)
        return m2 if noise is None else noise.inflate(m2)

    def _quantizer(self, quantizer: UniformQuantizer | None) -> UniformQuantizer:
        q = self.quantizer if quantizer is None else quantizer
        if not isinstance(q, UniformQuantizer):
            raise ValueError(f"quantizer must be a UniformQuantizer, got {type(q).__name__}")
        if self.level_ == "3L" and q.granularity == "channel" and self.grams_.channel_grams is None:
            raise ValueError(
                "a per-channel quantizer needs per-channel Grams: refit with "
                "fit_model(..., granularity='channel')"
            )
        return q

    def _allocation_bits(self, allocation: Mapping[str, int] | BitAllocation) -> np.ndarray:
        if isinstance(allocation, BitAllocation):
            allocation = allocation.as_dict()
        if not isinstance(allocation, Mapping):
            raise ValueError(
                f"allocation must map layer names to bits, got {type(allocation).__name__}"
            )
        g = self.grams_
        bits = np.zeros(g.n_layers, dtype=np.int64)
        for name, b in allocation.items():
            li = g.layer_index(name)  # ValueError for an unknown layer
            if b is None:
                continue
            if isinstance(b, bool) or not isinstance(b, int | np.integer) or not 1 <= b <= 16:
                raise ValueError(f"bits of layer {name!r} must be an integer in 1..16, got {b!r}")
            bits[li] = int(b)
        return bits

    # -- any compressor -----------------------------------------------------------------
    def _compress_layers(self, compressor: Any) -> list[Compressed]:
        """Every fitted layer compressed (a mapping gives one compressor per layer name;
        a compressor with ``compress_many`` and global scope sees all layers at once)."""
        from distortion.compression import Compressor

        if self.level_ == "3L":
            names = list(self.grams_.layer_names)
            weights = dict(zip(names, self.grams_.weights, strict=True))
        else:
            names, weights = ["last"], {"last": self.W_}
        if isinstance(compressor, Mapping):
            unknown = sorted(set(compressor) - set(names))
            if unknown:
                raise ValueError(f"unknown layer(s) {unknown}; the fitted layers are {names}")
            per = {n: compressor.get(n) for n in names}
        else:
            per = dict.fromkeys(names, compressor)
        for n, c in per.items():
            if c is not None and not isinstance(c, Compressor):
                raise ValueError(
                    f"the compressor of layer {n!r} must implement compress(w, *, seed=None) "
                    f"(the Compressor protocol), got {type(c).__name__}"
                )
        if (
            not isinstance(compressor, Mapping)
            and getattr(compressor, "scope", "layer") == "global"
            and hasattr(compressor, "compress_many")
        ):
            out = compressor.compress_many(weights, seed=self.seed)
            return [out[n] for n in names]
        seeds = [realization_seed(self.seed, i) for i in range(len(names))]
        return [
            None if per[n] is None else per[n].compress(weights[n], seed=sd)
            for n, sd in zip(names, seeds, strict=True)
        ]

    def _model_second_moment(self, c: Compressed | None) -> Any:
        """The error model's second moment of one compressed layer, as the fitted Grams
        take it (0 for a float layer)."""
        if c is None:
            return 0.0
        v = error_second_moment(c, self.error_variance)
        if self.level_ == "3L" and self.grams_.channel_grams is None:
            # per-tensor Grams hold one scalar per layer: the tensor's mean square (rows are
            # of equal size), which keeps E[||E||^2] but not how it spreads over channels
            v = np.asarray(np.mean(v))
        return v

    def predict_compression(self, compressor: Any, *, band: bool = True) -> Prediction:
        r"""Predicted flip rate and accuracy loss of any compressor (the cached Grams only).

        The compressor's error model (its second moment per tensor or channel,
        ``theory/error_models.md`` and ``theory/compression.md``) is treated as noise at
        first order: level 3L after :meth:`fit_model` (eq. L4-L7), level 3 after :meth:`fit`.
        With per-tensor Grams a per-channel error model enters as its tensor mean square
        (fit with ``granularity="channel"`` to keep its spread over channels).
        For deterministic compressions (pruning, truncation, codebooks) this is a hypothesis:
        compare with the actual perturbation (level 2L of
        :func:`distortion.experiments.compare.compare_all_layers`).

        Parameters
        ----------
        compressor : Compressor or mapping of layer name to Compressor
            One compressor for every fitted layer, or one per layer (absent layers stay float).
        band : bool
            Also the band of one realization (needs cached realizations).

        Returns
        -------
        Prediction
        """
        self._check_fitted()
        m2 = [self._model_second_moment(c) for c in self._compress_layers(compressor)]
        return self._predict_second_moments(self._inflated(m2), band)

    def _predict_second_moments(self, m2: list[Any], band: bool) -> Prediction:
        """Level 3L (or 3) from the error model's second moment of every fitted layer."""
        if self.level_ == "3L":
            r = multilayer_distortion(
                self.grams_, m2, method=self.method, n_rotations=self.n_rotations,
                seed=self.seed, band=band and self.grams_.projections is not None,
                coverage=self.coverage,
            )  # fmt: skip
            return r.to_prediction()
        from distortion.theory.semiparametric import semiparametric_distortion

        n_real = self.n_realizations if band else 0
        r3 = semiparametric_distortion(
            self.features_, self.W_, self.b_, variance=m2[0], labels=self.labels_,
            n_realizations=n_real, coverage=self.coverage, seed=self.seed,
        )  # fmt: skip
        return r3.to_prediction()

    def predict_grid(
        self, make: Any, strengths: Iterable[Any], *, band: bool = True
    ) -> pd.DataFrame:
        """:meth:`predict_compression` over a grid of strengths, one row each.

        Parameters
        ----------
        make : callable
            ``make(strength) -> Compressor`` (e.g. ``lambda s: MagnitudePruner(s)``).
        strengths : iterable
            Sparsities, ranks, energies, clusters, bits...

        Returns
        -------
        DataFrame
            ``strength`` and the fields of :class:`~distortion.results.Prediction`.
        """
        if not callable(make):
            raise ValueError("make must be a callable strength -> Compressor")
        rows = [
            {"strength": s, **self.predict_compression(make(s), band=band).as_dict()}
            for s in strengths
        ]
        if not rows:
            raise ValueError("strengths is empty: give at least one strength")
        return pd.DataFrame(rows)

    def allocate_compression(
        self,
        make: Any,
        strengths: Iterable[Any],
        *,
        budget: int | None = None,
        ratio: float | None = None,
        cost: Literal["parameters", "bits"] = "parameters",
        objective: Objective = "flip_rate",
        float_bits: int = 32,
        resolution: int = 100_000,
        band: bool = True,
    ) -> CompressionAllocation:
        r"""One strength per layer, for any compressor family, under a size budget (eq. C24).

        Per-layer sparsity under a global sparsity (``cost="parameters"``, ``ratio`` = 1 -
        the global sparsity), per-layer rank under a parameter budget, mixed codebook or
        non-uniform bits under a model size (``cost="bits"``), all from the cached Grams:
        each layer is compressed once per strength (its error model and its size, eqs.
        C18-C23), no backward pass runs.

        Parameters
        ----------
        make : callable
            ``make(strength) -> Compressor`` with per-layer scope (e.g.
            ``lambda s: MagnitudePruner(s)``, ``lambda r: LowRank(energy=r)``,
            ``lambda k: KMeansQuantizer(k)``).
        strengths : iterable
            The strengths each layer may take (include the mildest you accept).
        budget : int, optional
            Largest total size, in ``cost`` units.
        ratio : float, optional
            Or the largest size as a fraction of the float model's (exactly one of the two).
        cost : {"parameters", "bits"}
            What the budget counts (:func:`~distortion.compressors.size.compressed_size`).
        objective : {"flip_rate", "accuracy_loss"}
        float_bits : int, default 32
            Bits of a stored real number (``cost="bits"`` and the dense size).
        resolution : int, default 100 000
            Largest number of cost units of the DP (costs are rounded up to multiples of
            ``ceil(budget / resolution)``: the result always respects the true budget).
        band : bool
            The band of the re-evaluation (needs cached realizations).

        Returns
        -------
        CompressionAllocation
        """
        from distortion.compressors.size import _check_float_bits, compressed_size

        self._check_fitted(multilayer=True)
        if not callable(make):
            raise ValueError("make must be a callable strength -> Compressor")
        opts = tuple(strengths)
        if not opts:
            raise ValueError("strengths is empty: give at least one strength")
        if len(set(opts)) != len(opts):
            raise ValueError(f"strengths must be distinct, got {opts!r}")
        if cost not in ("parameters", "bits"):
            raise ValueError(f"cost must be 'parameters' or 'bits', got {cost!r}")
        if objective not in ("flip_rate", "accuracy_loss"):
            raise ValueError(f"objective must be 'flip_rate' or 'accuracy_loss', got {objective!r}")
        if objective == "accuracy_loss" and self.grams_.labels is None:
            raise ValueError("objective='accuracy_loss' needs labels; use objective='flip_rate'")
        if isinstance(resolution, bool) or not isinstance(resolution, int | np.integer) \
                or resolution < 1:  # fmt: skip
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        compressors = [make(s) for s in opts]
        for s, c in zip(opts, compressors, strict=True):
            if getattr(c, "scope", "layer") == "global":
                raise ValueError(f"make({s!r}) has global scope: the allocation chooses a "
                                 "strength per layer, pass a per-layer compressor")  # fmt: skip
        n_w = self.grams_.layer_sizes()
        f_bits = _check_float_bits(float_bits)
        dense = int(n_w.sum()) * (f_bits if cost == "bits" else 1)
        if (budget is None) == (ratio is None):
            raise ValueError("pass exactly one of budget and ratio")
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, int | float | np.number) \
                    or not np.isfinite(ratio) or not 0 < ratio:  # fmt: skip
                raise ValueError(f"ratio must be a positive fraction of the float size, got "
                                 f"{ratio!r}")  # fmt: skip
            budget = int(math.floor(ratio * dense + 1e-9))
        if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget <= 0:
            raise ValueError(f"budget must be a positive integer ({cost}), got {budget!r}")
        L, S = self.grams_.n_layers, len(opts)
        sizes = np.zeros((L, S), dtype=np.int64)
        table: list[list[Any]] = [[None] * S for _ in range(L)]
        for j, comp in enumerate(compressors):  # each layer once per strength
            for li, c in enumerate(self._compress_layers(comp)):
                size = compressed_size(c, float_bits=f_bits)
                sizes[li, j] = size.bits if cost == "bits" else size.parameters
                table[li][j] = self._model_second_moment(c)
        cheapest = int(sizes.min(axis=1).sum())
        if budget < cheapest:
            raise ValueError(
                f"budget of {int(budget)} {cost} ({budget / dense:.3g} of the float model) is "
                f"impossible: the strongest compression of every layer already takes "
                f"{cheapest}; raise the budget or allow stronger settings"
            )
        contrib = layer_contributions(
            self.grams_, table, list(range(S)),
            method=self.method, n_rotations=self.n_rotations, seed=self.seed,
        )  # fmt: skip
        values = contrib.flip_rate if objective == "flip_rate" else contrib.accuracy_loss
        unit = max(1, math.ceil(int(budget) / int(resolution)))
        units = -(-sizes // unit)  # rounded up: the true total stays within the budget
        sol = knapsack_allocation(units, values, int(budget) // unit)  # (eq. C24, L14)
        names = self.grams_.layer_names
        # every layer at its strength: the layers compressed above, not compressed again
        pred = self._predict_second_moments(
            [table[li][int(j)] for li, j in enumerate(sol.choice)], band
        )
        return CompressionAllocation(
            layer_names=names,
            strengths=tuple(opts[int(j)] for j in sol.choice),
            strength_options=opts,
            cost=cost,
            sizes=sizes,
            dense_size=dense,
            budget=int(budget),
            total=int(sizes[np.arange(L), sol.choice].sum()),
            cost_unit=unit,
            objective=objective,
            surrogate=float(values[np.arange(L), sol.choice].sum()),
            contributions=values,
            flip_rate=pred.flip_rate,
            accuracy_loss=pred.accuracy_loss,
            prediction=pred,
        )

    # -- prediction ---------------------------------------------------------------------
    def predict_allocation(
        self,
        allocation: Mapping[str, int] | BitAllocation,
        *,
        quantizer: UniformQuantizer | None = None,
        band: bool = True,
        activations: Any = None,
        logit_shift: Any = None,
    ) -> MultilayerDistortion:
        """Closed-form prediction for one bit allocation (layers absent stay in float).

        Parameters
        ----------
        allocation : mapping of layer name to bits, or BitAllocation
        quantizer : UniformQuantizer, optional
            Scheme, granularity, clipping and rounding (its bits are ignored).
        band : bool
            Also the band of one realization (needs cached realizations).
        activations : ActivationGrams, optional
            Quantized activations too (W+A): their covariance and clipping shift
            (:func:`distortion.experiments.activation_grams.activation_grams` on the same
            samples), added at first order (``theory/activations.md`` eq. A12-A13).
        logit_shift : ndarray of shape (N, K), optional
            A mean move of the logits added to the prediction, e.g. the moment-propagated
            mean of this allocation from :meth:`smoothed_shift` (level 3S, the 2-3 bit
            term of ``theory/multilayer.md`` eq. L31).

        Returns
        -------
        MultilayerDistortion
        """
        self._check_fitted(multilayer=True)
        q = self._quantizer(quantizer)
        bits = self._allocation_bits(allocation)
        cov, shift = self._activation_terms(activations)
        if logit_shift is not None:
            extra = np.asarray(logit_shift, dtype=np.float64)
            if extra.shape != self.grams_.logits.shape or not np.all(np.isfinite(extra)):
                raise ValueError(
                    f"logit_shift must be a finite array of shape {self.grams_.logits.shape} "
                    f"(the fitted samples x classes), got shape {extra.shape}"
                )
            shift = extra if shift is None else shift + extra
        return multilayer_distortion(
            self.grams_,
            self._variances(bits, q),
            method=self.method,
            n_rotations=self.n_rotations,
            seed=self.seed,
            band=band and self.grams_.projections is not None,
            coverage=self.coverage,
            shift=shift,
            activation_covariance=cov,
        )

    def smoothed_shift(
        self,
        model: Any,
        dataset: Any,
        allocation: Mapping[str, int] | BitAllocation,
        *,
        quantizer: UniformQuantizer | None = None,
        n_probes: int = 16,
    ) -> np.ndarray:
        r"""The moment-propagated mean move of the logits for one bit allocation (eq. L31).

        The network whose ReLUs are each smoothed by the noise this allocation's errors put
        at their input, minus the float network
        (:func:`~distortion.experiments.smoothed.smoothed_shift`, cached in ``cache_dir``).
        Pass it to :meth:`predict_allocation` as ``logit_shift``: level 3S, the term that
        carries the all-layer prediction at 3 bits (``theory/multilayer.md`` §17). It
        depends on the bit-widths, so it is computed per allocation, once: several times the
        time of the Grams (7.5 times on ResNet-56 with 200 images, §17).

        Parameters
        ----------
        model : torch.nn.Module
            The float network the estimator was fitted on.
        dataset
            The samples of :meth:`fit_model`, in the same order.
        allocation : mapping of layer name to bits, or BitAllocation
        quantizer : UniformQuantizer, optional
        n_probes : int
            Forward-mode probes of the noise scales.

        Returns
        -------
        ndarray of shape (N, K)
        """
        from distortion.experiments.sensitivity import _data_info
        from distortion.experiments.smoothed import smoothed_shift

        self._check_fitted(multilayer=True)
        if self.bias_correction_ is not None:
            raise ValueError(
                "smoothed_shift models the uncorrected network; this estimator predicts the "
                "bias-corrected one (fit_model(..., bias_correction=)): refit without it"
            )
        q = self._quantizer(quantizer)
        bits = self._allocation_bits(allocation)
        if _data_info(dataset)[2] != self.grams_.meta.get("data"):
            raise ValueError(
                "dataset is not the data the estimator was fitted on (another fingerprint): "
                "pass the samples of fit_model, in the same order"
            )
        m2 = {
            name: self._variance(i, q.with_bits(int(b)))
            for i, (name, b) in enumerate(zip(self.layers_, bits, strict=True))
            if b
        }
        if not m2:
            return np.zeros_like(self.grams_.logits)
        shift, _ = smoothed_shift(
            model, dataset, m2, n_probes=n_probes, seed=self.seed, cache_dir=self.cache_dir
        )
        return shift

    def dithered_prediction(
        self,
        model: Any,
        dataset: Any,
        allocation: Mapping[str, int] | BitAllocation,
        *,
        quantizer: UniformQuantizer | None = None,
        repeats: int = 40,
    ) -> Prediction:
        r"""Level 3N for one bit allocation: ``repeats`` networks whose quantized layers
        carry a subtractive-dither error of this allocation's steps, run through ``model``.

        The error model exactly (H_U by construction) with nothing linearized
        (:func:`~distortion.experiments.compare.dithered_prediction`): its band, the order
        statistics of the dithered networks' flip counts, is calibrated by construction. At
        2-3 bits it is the band to read beside level 3S (:meth:`smoothed_shift`), whose own
        band is about half as wide as the realizations' spread there
        (``theory/multilayer.md`` §17). It costs ``repeats`` forward passes over
        ``dataset`` (with bias correction when the estimator was fitted with it).

        Parameters
        ----------
        model : torch.nn.Module
            The float network the estimator was fitted on.
        dataset
            Labelled samples (any; those of :meth:`fit_model` to set it beside
            :meth:`predict_allocation`).
        allocation : mapping of layer name to bits, or BitAllocation
        quantizer : UniformQuantizer, optional
            Scheme, granularity and clipping (its bits and rounding are replaced).
        repeats : int
            Dithered networks (at least :func:`min_realizations` of the coverage: 39 at 95 %).

        Returns
        -------
        Prediction
            Level ``"3N"`` with its flip-rate and accuracy-loss bands.
        """
        from distortion.experiments.compare import dithered_prediction

        self._check_fitted(multilayer=True)
        q = self._quantizer(quantizer)
        bits = self._allocation_bits(allocation)
        per_layer = {
            name: q.with_bits(int(b)) for name, b in zip(self.layers_, bits, strict=True) if b
        }
        if not per_layer:
            raise ValueError("the allocation quantizes no layer: give at least one layer bits")
        return dithered_prediction(
            model, dataset, per_layer, repeats=repeats, seed=realization_seed(self.seed, 3),
            coverage=self.coverage, progress=self.progress,
            bias_correction=self.bias_correction_,
        )  # fmt: skip

    def weight_activation_split(
        self,
        allocation: Mapping[str, int] | BitAllocation | int,
        activations: Any,
        *,
        quantizer: UniformQuantizer | None = None,
    ) -> Any:
        """Which layer, and is it the weights or the activations: the predicted flip rate of
        a W+A configuration with everything quantized, weights alone, activations alone, and
        each weight layer and activation point alone
        (:func:`distortion.experiments.activation_grams.weight_activation_split`).

        Parameters
        ----------
        allocation : int, mapping of layer name to bits, or BitAllocation
            The weights' bits (an int: every fitted layer at that bit-width).
        activations : ActivationGrams
            The quantized activations, on the fitted samples.
        quantizer : UniformQuantizer, optional
        """
        from distortion.experiments.activation_grams import weight_activation_split

        self._check_fitted(multilayer=True)
        q = self._quantizer(quantizer)
        if isinstance(allocation, int | np.integer) and not isinstance(allocation, bool):
            allocation = dict.fromkeys(self.grams_.layer_names, int(allocation))
        bits = self._allocation_bits(allocation)
        self._activation_terms(activations)  # the same samples as the Grams
        return weight_activation_split(
            self.grams_, self._variances(bits, q), activations,
            coverage=self.coverage, seed=self.seed,
        )  # fmt: skip

    def _activation_terms(self, activations: Any) -> tuple[Any, Any]:
        """Covariance (N, K, K) and shift (N, K) of ``activations``, checked against the
        fitted Grams' samples (None, None without activations)."""
        if activations is None:
            return None, None
        if not all(hasattr(activations, a) for a in ("covariance", "shift", "logits")):
            raise ValueError(
                "activations must be an ActivationGrams (distortion.experiments."
                f"activation_grams.activation_grams), got {type(activations).__name__}"
            )
        z = self.grams_.logits
        za = np.asarray(activations.logits)
        if za.shape != z.shape or not np.allclose(za, z, rtol=1e-4, atol=1e-4):
            raise ValueError(
                "the activation Grams were computed on other samples (or another model) than "
                f"the fitted Grams (logits {za.shape} vs {z.shape}); compute both on the same "
                "images in the same order"
            )
        return activations.covariance(), activations.shift()

    def predict(
        self,
        bits: Iterable[int] | int = range(1, 9),
        *,
        quantizer: UniformQuantizer | None = None,
        activations: Any = None,
    ) -> AccuracyLossPrediction:
        """Predicted flip rate and accuracy loss with every fitted layer at each bit-width.

        Parameters
        ----------
        bits : iterable of int or int
            Bit-widths, 1..16.
        quantizer : UniformQuantizer, optional
            Default: the constructor's (its ``bits`` replaced by each bit-width).
        activations : ActivationGrams, optional
            Quantized activations as well, at every bit-width of the weights (all-layer
            fits only; see :meth:`predict_allocation`).

        Returns
        -------
        AccuracyLossPrediction
        """
        self._check_fitted()
        b_arr = _check_bits_list(bits)
        q = self._quantizer(quantizer)
        if activations is not None and self.level_ != "3L":
            raise ValueError("activations need an all-layer fit (fit_model or fit_grams)")
        rows = [
            self._predict_one(int(b), q, activations) | self._hu_check(int(b), q) for b in b_arr
        ]
        cols = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        acc_f = float(cols.pop("accuracy_float")[0])
        return AccuracyLossPrediction(
            bits=b_arr,
            accuracy_float=acc_f,
            level="3I" if getattr(self, "input_noise_", None) is not None else self.level_,
            method="gauss-hermite" if self.level_ == "3" else self.method,
            layers=tuple(self.layers_),
            quantizer=q,
            n_samples=self._n_samples(),
            coverage=float(self.coverage),
            **cols,
        )

    def _n_samples(self) -> int:
        return self.grams_.n_samples if self.level_ == "3L" else self.features_.shape[0]

    def _predict_one(
        self, b: int, q: UniformQuantizer, activations: Any = None
    ) -> dict[str, float]:
        if self.level_ == "3L":
            r = self.predict_allocation(
                dict.fromkeys(self.grams_.layer_names, b), quantizer=q, activations=activations
            )
            fb, lb = r.flip_band(), r.accuracy_loss_band()
            return {
                "flip_rate": r.flip_rate, "flip_rate_stderr": r.flip_rate_stderr,
                "flip_rate_low": fb.low, "flip_rate_high": fb.high,
                "accuracy_float": r.accuracy_float, "accuracy_quantized": r.accuracy_quantized,
                "accuracy_loss": r.accuracy_loss, "accuracy_loss_low": lb.low,
                "accuracy_loss_high": lb.high,
            }  # fmt: skip
        from distortion.theory.multiclass import semiparametric_distortion

        n_real = self.n_realizations
        r3 = semiparametric_distortion(
            self.features_, self.W_, self.b_, variance=self._variance(0, q.with_bits(b)),
            labels=self.labels_,
            n_realizations=n_real, coverage=self.coverage, seed=self.seed,
        )  # fmt: skip
        nan = float("nan")
        fb = r3.flip_band() if n_real else (nan, nan)
        lb = r3.accuracy_loss_band() if n_real and self.labels_ is not None else (nan, nan)
        return {
            "flip_rate": r3.flip_rate, "flip_rate_stderr": 0.0,
            "flip_rate_low": fb[0], "flip_rate_high": fb[1],
            "accuracy_float": r3.accuracy_float, "accuracy_quantized": r3.accuracy_quantized,
            "accuracy_loss": r3.accuracy_loss, "accuracy_loss_low": lb[0],
            "accuracy_loss_high": lb[1],
        }  # fmt: skip

    def min_bits(
        self,
        max_loss: float = 0.005,
        *,
        bits: Iterable[int] = range(1, 17),
        quantizer: UniformQuantizer | None = None,
        criterion: Literal["mean", "band"] = "mean",
    ) -> int:
        """Smallest bit-width from which the predicted accuracy loss stays at most ``max_loss``.

        Parameters
        ----------
        max_loss : float
            Largest acceptable accuracy loss (a fraction, e.g. 0.005 = 0.5 point).
        bits : iterable of int
            Candidate bit-widths.
        quantizer : UniformQuantizer, optional
        criterion : {"mean", "band"}
            Compare the expected loss, or the upper end of the one-realization band.

        Raises
        ------
        ValueError
            No candidate meets the budget, or the loss is unknown (no labels).
        """
        if not np.isfinite(max_loss) or max_loss < 0:
            raise ValueError(f"max_loss must be a finite number >= 0, got {max_loss!r}")
        if criterion not in ("mean", "band"):
            raise ValueError(f"criterion must be 'mean' or 'band', got {criterion!r}")
        pred = self.predict(bits, quantizer=quantizer)
        loss = pred.accuracy_loss if criterion == "mean" else pred.accuracy_loss_high
        if np.all(np.isnan(loss)):
            raise ValueError(
                "the accuracy loss is unknown (no labels, or no band): fit with labels"
            )
        # The smallest bit-width from which every larger candidate meets the budget: the
        # predicted loss need not be monotone (the 1-bit sign quantizer, sampling noise).
        order = np.argsort(pred.bits)
        meets = (loss <= max_loss)[order]
        tail = np.flip(np.logical_and.accumulate(np.flip(meets)))
        ok = order[np.flatnonzero(tail)]
        if ok.size == 0:
            raise ValueError(
                f"no bit-width in {pred.bits.tolist()} has a predicted loss <= {max_loss} "
                f"(smallest: {np.nanmin(loss):.4g} at {int(pred.bits[np.nanargmin(loss)])} bits)"
            )
        return int(pred.bits[ok[0]])

    # -- mixed precision ----------------------------------------------------------------
    def layer_contributions(
        self,
        bits: Iterable[int] = range(2, 9),
        *,
        quantizer: UniformQuantizer | None = None,
    ) -> LayerContributions:
        """Predicted flip rate and accuracy loss of each layer quantized alone (eq. L13)."""
        self._check_fitted(multilayer=True)
        q = self._quantizer(quantizer)
        b_arr = _check_bits_list(bits)
        table = [
            [self._variance(li, q.with_bits(int(b))) for b in b_arr]
            for li in range(self.grams_.n_layers)
        ]
        return layer_contributions(
            self.grams_, table, b_arr,
            method=self.method, n_rotations=self.n_rotations, seed=self.seed,
        )  # fmt: skip

    def allocate(
        self,
        budget: int | None = None,
        *,
        avg_bits: float | None = None,
        bits: Iterable[int] = range(2, 9),
        objective: Objective = "flip_rate",
        quantizer: UniformQuantizer | None = None,
        activations: Mapping[int, Any] | None = None,
        avg_activation_bits: float | None = None,
    ) -> BitAllocation:
        r"""Mixed-precision bits per layer that minimize the predicted loss under a size budget.

        Parameters
        ----------
        budget : int, optional
            Largest total size of the quantized weights, in bits.
        avg_bits : float, optional
            Or the largest average bits per weight (exactly one of the two).
        bits : iterable of int
            Allowed bit-widths of each layer.
        objective : {"flip_rate", "accuracy_loss"}
            What the additive per-layer model sums.
        quantizer : UniformQuantizer, optional
        activations : mapping of bits to ActivationGrams, optional
            W+A: the activation Grams of the fitted samples at each allowed activation
            bit-width (one :func:`~distortion.experiments.activation_grams.activation_grams`
            call with one grid per bit-width). Each point then gets its own bits too.
        avg_activation_bits : float, optional
            With ``activations``: the largest average bits per activation entry (the
            activations' own budget, weighted by each point's entries per sample).

        Returns
        -------
        BitAllocation

        Notes
        -----
        The knapsack minimizes the additive surrogate
        :math:`\sum_\ell f_\ell(b_\ell)`, with :math:`f_\ell(b)` the predicted flip rate of
        layer :math:`\ell` alone at b bits (eq. L13), under
        :math:`\sum_\ell n_\ell b_\ell \le` budget, exactly by dynamic programming
        (eq. L14); the allocation is then re-evaluated with the full closed form. With
        activations the surrogate adds each point's term :math:`g_p(a_p)` under its own
        budget :math:`\sum_p m_p a_p \le` ``avg_activation_bits`` :math:`\sum_p m_p`; the
        two knapsacks separate exactly (``theory/activations.md`` eq. A15), and the
        re-evaluation has both (eq. A12-A13).
        """
        self._check_fitted(multilayer=True)
        if (activations is None) != (avg_activation_bits is None):
            raise ValueError("pass activations (bits -> ActivationGrams) and "
                             "avg_activation_bits together")  # fmt: skip
        if objective not in ("flip_rate", "accuracy_loss"):
            raise ValueError(f"objective must be 'flip_rate' or 'accuracy_loss', got {objective!r}")
        if objective == "accuracy_loss" and self.grams_.labels is None:
            raise ValueError("objective='accuracy_loss' needs labels; use objective='flip_rate'")
        n_w = self.grams_.layer_sizes()
        if (budget is None) == (avg_bits is None):
            raise ValueError("pass exactly one of budget (total bits) and avg_bits")
        if avg_bits is not None:
            if not np.isfinite(avg_bits) or avg_bits <= 0:
                raise ValueError(f"avg_bits must be a positive number, got {avg_bits!r}")
            budget = int(math.floor(avg_bits * int(n_w.sum()) + 1e-9))
        if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget <= 0:
            raise ValueError(f"budget must be a positive integer (bits), got {budget!r}")
        b_arr = _check_bits_list(bits)
        cheapest = int(n_w.sum() * b_arr.min())
        if budget < cheapest:
            raise ValueError(
                f"budget of {int(budget)} bits ({budget / n_w.sum():.3g} bits per weight) is "
                f"impossible: {b_arr.min()} bits everywhere already takes {cheapest}; raise the "
                "budget or allow fewer bits"
            )
        q = self._quantizer(quantizer)
        contrib = self.layer_contributions(b_arr, quantizer=q)
        values = contrib.flip_rate if objective == "flip_rate" else contrib.accuracy_loss
        sol = knapsack_allocation(n_w[:, None] * b_arr[None, :], values, int(budget))  # (eq. L14)
        chosen = b_arr[sol.choice]
        names = self.grams_.layer_names
        act_kw: dict[str, Any] = {}
        mixed = None
        if activations is not None:
            act_kw, mixed = self._allocate_activations(activations, avg_activation_bits,
                                                       objective)  # fmt: skip
        pred = self.predict_allocation(dict(zip(names, chosen.tolist(), strict=True)), quantizer=q,
                                       activations=mixed)  # fmt: skip
        return BitAllocation(
            layer_names=names,
            bits=chosen,
            n_weights=n_w,
            budget_bits=int(budget),
            total_bits=sol.total_cost,
            objective=objective,
            surrogate=sol.total_value,
            flip_rate=pred.flip_rate,
            accuracy_loss=pred.accuracy_loss,
            prediction=pred,
            contributions=contrib,
            **act_kw,
        )

    def _allocate_activations(
        self, activations: Mapping[int, Any], avg_bits: float, objective: str
    ) -> tuple[dict[str, Any], Any]:
        """The activations' knapsack (eq. A15): per point and bit-width the term alone, then
        the cheapest-loss bits under the activations' budget; returns the BitAllocation
        fields and the mixed ActivationGrams of the choice."""
        if not isinstance(activations, Mapping) or not activations:
            raise ValueError("activations must map activation bits to ActivationGrams")
        opts = _check_bits_list(list(activations))
        ags = [activations[int(b)] for b in opts]
        for b, ag in zip(opts, ags, strict=True):
            self._activation_terms(ag)
            if ag.point_names != ags[0].point_names:
                raise ValueError(f"the activation Grams at {b} bits have other points")
        if not np.isfinite(avg_bits) or avg_bits <= 0:
            raise ValueError(f"avg_activation_bits must be a positive number, got {avg_bits!r}")
        sizes = np.rint(ags[0].point_sizes).astype(np.int64)
        budget = int(math.floor(avg_bits * int(sizes.sum()) + 1e-9))
        if budget < int(sizes.sum() * opts.min()):
            raise ValueError(
                f"avg_activation_bits={avg_bits} is below the fewest allowed bits "
                f"({opts.min()}); allow fewer bits or raise it"
            )
        zero = [0.0] * self.grams_.n_layers
        values = np.zeros((len(sizes), opts.size))
        for j, ag in enumerate(ags):
            for i, pname in enumerate(ag.point_names):  # each point alone (eq. A15)
                r = multilayer_distortion(
                    self.grams_, zero, method=self.method, n_rotations=self.n_rotations,
                    seed=self.seed, band=False, shift=ag.shift([pname]),
                    activation_covariance=ag.covariance([pname]),
                )  # fmt: skip
                values[i, j] = r.flip_rate if objective == "flip_rate" else r.accuracy_loss
        sol = knapsack_allocation(sizes[:, None] * opts[None, :], values, budget)
        chosen = opts[sol.choice]
        base = ags[int(np.argmax(opts))]
        pick = {n: activations[int(b)] for n, b in zip(base.point_names, chosen, strict=True)}
        fields = {
            "point_names": base.point_names, "activation_bits": chosen, "point_sizes": sizes,
            "activation_budget_bits": budget, "activation_total_bits": int(sol.total_cost),
            "activation_bit_options": opts, "activation_contributions": values,
        }  # fmt: skip
        return fields, base.mixed(pick)
