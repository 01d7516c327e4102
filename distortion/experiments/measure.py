r"""Measured accuracy loss and prediction flips after real quantization (level 4).

Quantize chosen layers of a real model — the last layer alone, a list of layers, or all —
with any :class:`~distortion.quantize.UniformQuantizer` (or one per layer), run it on the
same images as the float model, and compare image by image:

- the accuracy loss :math:`\hat\ell = (n_{10} - n_{01})/n`, with :math:`n_{10}` the images
  correct before and wrong after and :math:`n_{01}` the reverse, with an exact paired
  (McNemar) test and an exact conditional interval (:func:`paired_accuracy_loss`);
- the flip rate :math:`\hat p = k/n`, the fraction of images whose predicted class changes,
  with its Clopper–Pearson interval (:func:`binomial_interval`).

For stochastic rounding and dither, ``repeats`` seeded realizations of the error are drawn
and the quantities are averaged over them; their intervals are then the t intervals of the
per-realization values (flips of the same images under one realization are dependent, so
the counts must not be pooled over realizations; see :class:`Measurement`).

When only the last layer is quantized the network need not be run again:
:func:`measure_last_layer` recomputes the logits :math:`\hat W x + b` from a
:class:`~distortion.experiments.features.FeatureSet` (numpy only).

The pure statistics here import neither torch nor matplotlib; torch is imported inside the
functions that run a model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from distortion.quantize import QuantizedTensor, UniformQuantizer
from distortion.results import ConfidenceInterval, check_confidence_level, deprecated_alias

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Measurement",
    "PairedLoss",
    "binomial_interval",
    "measure",
    "measure_last_layer",
    "measurement_from_dict",
    "measurement_to_dict",
    "paired_accuracy_loss",
    "predict_logits",
    "quantize_model",
    "resolve_layers",
]

Quantity = Literal["flip_rate", "accuracy_loss"]
_QUANTITIES = ("flip_rate", "accuracy_loss")


def _level(confidence_level: float, confidence: float | None) -> float:
    """The confidence level, from the deprecated ``confidence=`` keyword when given."""
    if confidence is not None:
        confidence_level = deprecated_alias("confidence_level=", "confidence=", confidence)
    return check_confidence_level(confidence_level)


def binomial_interval(
    k: int, n: int, *, confidence_level: float = 0.95, confidence: float | None = None
) -> ConfidenceInterval:
    r"""Clopper–Pearson (exact) interval for a binomial proportion :math:`k/n`.

    Parameters
    ----------
    k, n : int
        Successes and trials, :math:`0 \le k \le n`, :math:`n > 0`.
    confidence_level : float
        Nominal coverage, in (0, 1).
    confidence : float, optional
        Deprecated name of ``confidence_level``.

    Returns
    -------
    ConfidenceInterval
        With ``method="clopper-pearson"``.

    Notes
    -----
    .. math:: [\,B^{-1}(\tfrac{a}{2}; k, n-k+1),\; B^{-1}(1-\tfrac{a}{2}; k+1, n-k)\,]

    with :math:`a = 1 - \text{confidence level}` and :math:`B^{-1}` the beta quantile
    (0 and 1 at the ends) [1]_.

    References
    ----------
    .. [1] C. J. Clopper and E. S. Pearson, "The use of confidence or fiducial limits
       illustrated in the case of the binomial", Biometrika 26(4), 1934.
    """
    c = _level(confidence_level, confidence)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k!r}, n={n!r}")
    a = 1.0 - c
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return ConfidenceInterval(lo, hi, c, "clopper-pearson")


def _paired_interval(n10: int, n01: int, n: int, c: float) -> ConfidenceInterval:
    """Exact conditional interval of the loss (n10 - n01)/n given m = n10 + n01."""
    m = n10 + n01
    if m == 0:
        return ConfidenceInterval(0.0, 0.0, c, "exact-conditional")
    th = binomial_interval(n10, m, confidence_level=c)
    lo, hi = (m / n) * (2 * th.low - 1), (m / n) * (2 * th.high - 1)
    return ConfidenceInterval(lo, hi, c, "exact-conditional")


def _paired_stderr(n10: int, n01: int, n: int) -> float:
    r""":math:`\sqrt{((n_{10}+n_{01})/n - \hat\ell^2)/n}`, the paired standard error of the loss."""
    loss = (n10 - n01) / n
    return math.sqrt(max((n10 + n01) / n - loss**2, 0.0) / n)


def _binomial_stderr(k: int, n: int) -> float:
    p = k / n
    return math.sqrt(p * (1.0 - p) / n)


def _t_interval(
    values: np.ndarray, c: float, bounds: tuple[float, float]
) -> tuple[float, ConfidenceInterval]:
    """(stderr, t interval) of the mean of ``values``: mean ± t_{R-1} sd / sqrt(R)."""
    r = values.size
    se = float(np.std(values, ddof=1)) / math.sqrt(r)
    h = float(stats.t.ppf(0.5 + c / 2, r - 1)) * se
    mean = float(np.mean(values))
    lo, hi = max(mean - h, bounds[0]), min(mean + h, bounds[1])
    return se, ConfidenceInterval(lo, hi, c, "t")


@dataclass(frozen=True)
class PairedLoss:
    r"""Accuracy loss of paired predictions (same images before and after).

    Attributes
    ----------
    n : int
        Number of images.
    n10, n01 : int
        Correct before and wrong after; wrong before and correct after.
    accuracy_loss : float
        :math:`(n_{10} - n_{01})/n`, the accuracy before minus after.
    interval : ConfidenceInterval
        Exact conditional interval: given the :math:`m = n_{10} + n_{01}` discordant pairs,
        :math:`n_{10} \sim \mathrm{Bin}(m, \theta)` and the loss is
        :math:`(m/n)(2\theta - 1)`; the Clopper–Pearson interval of :math:`\theta` maps to it.
    pvalue : float
        Two-sided exact McNemar test of "no loss" (:math:`\theta = 1/2`); 1 when :math:`m = 0`.
    confidence_level : float
    accuracy_loss_stderr : float
        :math:`\sqrt{((n_{10}+n_{01})/n - \hat\ell^2)/n}`.
    """

    n: int
    n10: int
    n01: int
    accuracy_loss: float
    interval: ConfidenceInterval
    pvalue: float
    confidence_level: float = 0.95
    accuracy_loss_stderr: float = float("nan")

    def confidence_interval(self, *, confidence_level: float = 0.95) -> ConfidenceInterval:
        """The exact conditional interval of the loss at another confidence level."""
        c = check_confidence_level(confidence_level)
        return _paired_interval(self.n10, self.n01, self.n, c)

    @property
    def loss(self) -> float:
        """Deprecated: ``accuracy_loss``."""
        return deprecated_alias("accuracy_loss", "PairedLoss.loss", self.accuracy_loss)

    @property
    def ci(self) -> ConfidenceInterval:
        """Deprecated: ``interval``."""
        return deprecated_alias("interval", "PairedLoss.ci", self.interval)

    @property
    def confidence(self) -> float:
        """Deprecated: ``confidence_level``."""
        return deprecated_alias("confidence_level", "PairedLoss.confidence", self.confidence_level)

    def to_frame(self) -> pd.DataFrame:
        """One-row DataFrame."""
        return pd.DataFrame(
            [
                {
                    "n": self.n,
                    "n10": self.n10,
                    "n01": self.n01,
                    "accuracy_loss": self.accuracy_loss,
                    "accuracy_loss_stderr": self.accuracy_loss_stderr,
                    "accuracy_loss_low": self.interval.low,
                    "accuracy_loss_high": self.interval.high,
                    "pvalue": self.pvalue,
                    "confidence_level": self.confidence_level,
                }
            ]
        )


def paired_accuracy_loss(
    correct_before: Any,
    correct_after: Any,
    *,
    confidence_level: float = 0.95,
    confidence: float | None = None,
) -> PairedLoss:
    r"""Accuracy loss between two paired sets of predictions, with an exact test and interval.

    Parameters
    ----------
    correct_before, correct_after : array_like of bool, shape (n_samples,)
        Whether each image is classified correctly before and after quantization.
    confidence_level : float
        Confidence level of the interval.
    confidence : float, optional
        Deprecated name of ``confidence_level``.

    Returns
    -------
    PairedLoss

    Notes
    -----
    Only discordant pairs carry information about the difference (McNemar [1]_). With
    :math:`m = n_{10} + n_{01}`, conditionally on :math:`m`,
    :math:`n_{10} \sim \mathrm{Bin}(m, \theta)` and

    .. math:: \ell = \frac{n_{10} - n_{01}}{n} = \frac{m}{n}(2\theta - 1).

    References
    ----------
    .. [1] Q. McNemar, "Note on the sampling error of the difference between correlated
       proportions or percentages", Psychometrika 12, 1947.
    """
    c = _level(confidence_level, confidence)
    before = np.asarray(correct_before)
    after = np.asarray(correct_after)
    if before.shape != after.shape or before.ndim != 1 or before.size == 0:
        raise ValueError(
            "correct_before and correct_after must be non-empty 1-D arrays of the same length, "
            f"got shapes {before.shape} and {after.shape}"
        )
    before, after = before.astype(bool), after.astype(bool)
    n = before.size
    n10 = int(np.sum(before & ~after))
    n01 = int(np.sum(~before & after))
    m = n10 + n01
    pvalue = 1.0 if m == 0 else float(stats.binomtest(n10, m, 0.5).pvalue)
    return PairedLoss(
        n=n,
        n10=n10,
        n01=n01,
        accuracy_loss=(n10 - n01) / n,
        interval=_paired_interval(n10, n01, n, c),
        pvalue=pvalue,
        confidence_level=c,
        accuracy_loss_stderr=_paired_stderr(n10, n01, n),
    )


@dataclass(frozen=True)
class Measurement:
    r"""Measured effect of quantizing some layers of a network on a set of images (level 4).

    Attributes
    ----------
    quantizer : UniformQuantizer
        The quantizer of the first quantized layer (the only one unless the allocation is
        mixed; see ``quantizers``).
    layers : tuple of str
        The quantized layers.
    n : int
        Number of images.
    accuracy_float : float
        Accuracy of the float network.
    accuracy : float
        Accuracy of the quantized network (mean over realizations).
    accuracy_loss : float
        ``accuracy_float - accuracy`` (mean over realizations).
    accuracy_loss_stderr : float
        Its standard error (see Notes).
    accuracy_loss_interval : ConfidenceInterval
        Its confidence interval at ``confidence_level`` (see Notes).
    accuracy_loss_pvalue : float
        Test of "no loss": exact McNemar for one realization, one-sample t test of the
        per-realization losses for several.
    flip_rate : float
        Fraction of images whose predicted class changes (mean over realizations).
    flip_rate_stderr : float
    flip_rate_interval : ConfidenceInterval
    repeats : int
        Number of realizations R (1 for nearest rounding).
    confidence_level : float
        Level of the two intervals.
    quantizers : dict of str to UniformQuantizer
        The quantizer of every quantized layer.
    bits_per_weight : float
        Mean bit-width per quantized weight (the bit-width when all layers share one; NaN
        when the layer sizes are unknown).
    accuracies, flip_rates : ndarray of shape (repeats,)
        Per realization.
    flip_counts, n10, n01 : ndarray of int, shape (repeats,)
        Per realization: images whose prediction changed; correct before and wrong after;
        wrong before and correct after.
    flips : ndarray of bool, shape (n,)
        Per image, whether the first realization changed its prediction.
    level : str
        ``"4"`` (measured).

    Notes
    -----
    *One realization* (nearest rounding, or ``repeats=1``): the flip rate
    :math:`\hat p = k/n` has the binomial standard error :math:`\sqrt{\hat p(1-\hat p)/n}`
    and the exact Clopper–Pearson interval; the loss :math:`\hat\ell = (n_{10}-n_{01})/n`
    has the paired standard error :math:`\sqrt{((n_{10}+n_{01})/n - \hat\ell^2)/n}` and the
    exact conditional interval of :func:`paired_accuracy_loss`. Their target is the flip
    probability (accuracy loss) of an image drawn from the population the images come from,
    for this quantized network.

    *Several realizations* (stochastic rounding, dither, :math:`R > 1`): the target is the
    *expected* flip rate (accuracy loss) over realizations of the quantization error, on the
    given images. Flips of the images under one realization are dependent (they share the
    error), so the :math:`nR` trials must not be pooled; the :math:`R` per-realization
    values :math:`v_r` are independent, and

    .. math:: \bar v \pm t_{R-1,\,(1+c)/2}\; s_v/\sqrt R,
              \qquad \text{stderr} = s_v/\sqrt R,

    with :math:`s_v` their standard deviation (the flip interval clipped to [0, 1]).
    """

    quantizer: UniformQuantizer
    layers: tuple[str, ...]
    n: int
    accuracy_float: float
    accuracy: float
    accuracy_loss: float
    accuracy_loss_stderr: float
    accuracy_loss_interval: ConfidenceInterval
    accuracy_loss_pvalue: float
    flip_rate: float
    flip_rate_stderr: float
    flip_rate_interval: ConfidenceInterval
    repeats: int
    confidence_level: float = 0.95
    quantizers: dict[str, UniformQuantizer] = field(default_factory=dict, repr=False)
    bits_per_weight: float = float("nan")
    accuracies: np.ndarray = field(default=None, repr=False)  # (repeats,)
    flip_rates: np.ndarray = field(default=None, repr=False)  # (repeats,)
    flip_counts: np.ndarray = field(default=None, repr=False)  # (repeats,)
    n10: np.ndarray = field(default=None, repr=False)  # (repeats,)
    n01: np.ndarray = field(default=None, repr=False)  # (repeats,)
    flips: np.ndarray = field(default=None, repr=False)  # (n,)
    level: str = "4"

    @property
    def mixed(self) -> bool:
        """Whether the layers were quantized with different quantizers."""
        return len(set(self.quantizers.values())) > 1

    @property
    def accuracy_losses(self) -> np.ndarray:
        """Accuracy loss of each realization, shape (repeats,)."""
        return (np.asarray(self.n10) - np.asarray(self.n01)) / self.n

    def confidence_interval(
        self, quantity: Quantity = "flip_rate", *, confidence_level: float = 0.95
    ) -> ConfidenceInterval:
        """Confidence interval of ``quantity`` at ``confidence_level`` (see the Notes).

        Parameters
        ----------
        quantity : {"flip_rate", "accuracy_loss"}
        confidence_level : float

        Returns
        -------
        ConfidenceInterval
            Exact (Clopper–Pearson, or conditional paired) for one realization, the t
            interval over the realizations for several.
        """
        if quantity not in _QUANTITIES:
            raise ValueError(f"quantity must be 'flip_rate' or 'accuracy_loss', got {quantity!r}")
        c = check_confidence_level(confidence_level)
        return _intervals(
            np.asarray(self.flip_counts), np.asarray(self.n10), np.asarray(self.n01), self.n, c
        )[quantity][1]

    # deprecated names of the previous release
    @property
    def loss(self) -> float:
        """Deprecated: ``accuracy_loss``."""
        return deprecated_alias("accuracy_loss", "Measurement.loss", self.accuracy_loss)

    @property
    def loss_ci(self) -> ConfidenceInterval:
        """Deprecated: ``accuracy_loss_interval``."""
        return deprecated_alias(
            "accuracy_loss_interval", "Measurement.loss_ci", self.accuracy_loss_interval
        )

    @property
    def flip_ci(self) -> ConfidenceInterval:
        """Deprecated: ``flip_rate_interval``."""
        return deprecated_alias(
            "flip_rate_interval", "Measurement.flip_ci", self.flip_rate_interval
        )

    @property
    def loss_pvalue(self) -> float:
        """Deprecated: ``accuracy_loss_pvalue``."""
        return deprecated_alias(
            "accuracy_loss_pvalue", "Measurement.loss_pvalue", self.accuracy_loss_pvalue
        )

    @property
    def loss_sd(self) -> float:
        """Deprecated: the sd of ``accuracy_losses`` across realizations (0 for one)."""
        sd = float(np.std(self.accuracy_losses, ddof=1)) if self.repeats > 1 else 0.0
        return deprecated_alias(
            "accuracy_losses.std(ddof=1) or accuracy_loss_stderr", "Measurement.loss_sd", sd
        )

    @property
    def flip_sd(self) -> float:
        """Deprecated: the sd of ``flip_rates`` across realizations (0 for one)."""
        sd = float(np.std(self.flip_rates, ddof=1)) if self.repeats > 1 else 0.0
        return deprecated_alias(
            "flip_rates.std(ddof=1) or flip_rate_stderr", "Measurement.flip_sd", sd
        )

    def _setting(self, name: str) -> Any:
        values = {getattr(q, name) for q in self.quantizers.values()} or {
            getattr(self.quantizer, name)
        }
        return next(iter(values)) if len(values) == 1 else "mixed"

    def to_frame(self) -> pd.DataFrame:
        """One-row DataFrame with the quantizer's settings and the measured quantities.

        ``bits`` is the bit-width when every layer has the same, else the mean bits per
        weight (NaN when unknown); ``mixed`` says whether the layers' quantizers differ, and
        a setting that differs between layers reads ``"mixed"``.
        """
        bits = self._setting("bits")
        fi, li = self.flip_rate_interval, self.accuracy_loss_interval
        return pd.DataFrame(
            [
                {
                    "level": self.level,
                    "bits": bits if bits != "mixed" else self.bits_per_weight,
                    "mixed": self.mixed,
                    "scheme": self._setting("scheme"),
                    "granularity": self._setting("granularity"),
                    "clipping": self._setting("clipping"),
                    "rounding": self._setting("rounding"),
                    "layers": ",".join(self.layers)
                    if len(self.layers) <= 3
                    else f"{len(self.layers)} layers",
                    "n": self.n,
                    "accuracy_float": self.accuracy_float,
                    "accuracy": self.accuracy,
                    "flip_rate": self.flip_rate,
                    "flip_rate_stderr": self.flip_rate_stderr,
                    "flip_rate_low": fi.low,
                    "flip_rate_high": fi.high,
                    "accuracy_loss": self.accuracy_loss,
                    "accuracy_loss_stderr": self.accuracy_loss_stderr,
                    "accuracy_loss_low": li.low,
                    "accuracy_loss_high": li.high,
                    "accuracy_loss_pvalue": self.accuracy_loss_pvalue,
                    "confidence_level": self.confidence_level,
                    "repeats": self.repeats,
                }
            ]
        )


def _intervals(
    flip_counts: np.ndarray, n10: np.ndarray, n01: np.ndarray, n: int, c: float
) -> dict[str, tuple[float, ConfidenceInterval]]:
    """(stderr, interval) of the flip rate and of the accuracy loss (Measurement's Notes)."""
    if flip_counts.size == 1:
        k, a, b = int(flip_counts[0]), int(n10[0]), int(n01[0])
        return {
            "flip_rate": (_binomial_stderr(k, n), binomial_interval(k, n, confidence_level=c)),
            "accuracy_loss": (_paired_stderr(a, b, n), _paired_interval(a, b, n, c)),
        }
    # independent realizations: t interval of the per-realization values, never the pooled
    # counts (the flips of one realization are dependent)
    return {
        "flip_rate": _t_interval(flip_counts / n, c, (0.0, 1.0)),
        "accuracy_loss": _t_interval((n10 - n01) / n, c, (-1.0, 1.0)),
    }


def _t_pvalue(values: np.ndarray) -> float:
    """Two-sided one-sample t test of mean 0 (1 or 0 when the values do not vary)."""
    sd = float(np.std(values, ddof=1))
    mean = float(np.mean(values))
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = mean / (sd / math.sqrt(values.size))
    return float(2 * stats.t.sf(abs(t), values.size - 1))


def _summarize(
    quantizers: dict[str, UniformQuantizer],
    layers: Sequence[str],
    labels: np.ndarray,
    pred_float: np.ndarray,
    preds: list[np.ndarray],
    confidence_level: float,
    bits_per_weight: float,
) -> Measurement:
    correct0 = pred_float == labels
    n = labels.size
    accs = np.array([np.mean(p == labels) for p in preds])
    counts = np.array([int(np.sum(p != pred_float)) for p in preds], dtype=np.int64)
    n10 = np.array([int(np.sum(correct0 & (p != labels))) for p in preds], dtype=np.int64)
    n01 = np.array([int(np.sum(~correct0 & (p == labels))) for p in preds], dtype=np.int64)
    r = len(preds)
    iv = _intervals(counts, n10, n01, n, confidence_level)
    losses = (n10 - n01) / n
    if r == 1:
        m = int(n10[0] + n01[0])
        pvalue = 1.0 if m == 0 else float(stats.binomtest(int(n10[0]), m, 0.5).pvalue)
    else:
        pvalue = _t_pvalue(losses)
    layers = tuple(layers)
    return Measurement(
        quantizer=quantizers[layers[0]],
        layers=layers,
        n=n,
        accuracy_float=float(np.mean(correct0)),
        accuracy=float(accs.mean()),
        accuracy_loss=float(losses.mean()),  # = accuracy_float - mean accuracy
        accuracy_loss_stderr=iv["accuracy_loss"][0],
        accuracy_loss_interval=iv["accuracy_loss"][1],
        accuracy_loss_pvalue=pvalue,
        flip_rate=float(counts.mean() / n),
        flip_rate_stderr=iv["flip_rate"][0],
        flip_rate_interval=iv["flip_rate"][1],
        repeats=r,
        confidence_level=confidence_level,
        quantizers=dict(quantizers),
        bits_per_weight=float(bits_per_weight),
        accuracies=accs,
        flip_rates=counts / n,
        flip_counts=counts,
        n10=n10,
        n01=n01,
        flips=preds[0] != pred_float,
    )


_FORMAT = "distortion.Measurement"
_FORMAT_VERSION = 2


def measurement_to_dict(m: Measurement) -> dict[str, Any]:
    """A :class:`Measurement` as JSON types (for a cache file); see :func:`measurement_from_dict`.

    Every field is kept, so :func:`measurement_from_dict` gives back an equal measurement.
    """
    return {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "layers": list(m.layers),
        "quantizers": {name: asdict(q) for name, q in m.quantizers.items()},
        "quantizer": asdict(m.quantizer),
        "n": int(m.n),
        "accuracy_float": float(m.accuracy_float),
        "accuracies": [float(a) for a in m.accuracies],
        "flip_counts": [int(k) for k in m.flip_counts],
        "n10": [int(k) for k in m.n10],
        "n01": [int(k) for k in m.n01],
        "flips": [bool(f) for f in m.flips],
        "confidence_level": float(m.confidence_level),
        "bits_per_weight": None if math.isnan(m.bits_per_weight) else m.bits_per_weight,
    }


def measurement_from_dict(d: dict[str, Any]) -> Measurement:
    """The :class:`Measurement` written by :func:`measurement_to_dict`.

    Raises
    ------
    ValueError
        Not such a dict, or one written by another version (recompute the measurement).
    """
    if not isinstance(d, dict) or d.get("format") != _FORMAT or d.get("version") != _FORMAT_VERSION:
        version = d.get("version") if isinstance(d, dict) else None
        raise ValueError(
            f"not a version-{_FORMAT_VERSION} {_FORMAT} record (got version {version!r}); "
            "recompute the measurement"
        )
    c = check_confidence_level(d["confidence_level"])
    n = int(d["n"])
    counts = np.asarray(d["flip_counts"], dtype=np.int64)
    n10 = np.asarray(d["n10"], dtype=np.int64)
    n01 = np.asarray(d["n01"], dtype=np.int64)
    iv = _intervals(counts, n10, n01, n, c)
    losses = (n10 - n01) / n
    if counts.size == 1:
        mm = int(n10[0] + n01[0])
        pvalue = 1.0 if mm == 0 else float(stats.binomtest(int(n10[0]), mm, 0.5).pvalue)
    else:
        pvalue = _t_pvalue(losses)
    accs = np.asarray(d["accuracies"], dtype=np.float64)
    bpw = d.get("bits_per_weight")
    return Measurement(
        quantizer=UniformQuantizer(**d["quantizer"]),
        layers=tuple(d["layers"]),
        n=n,
        accuracy_float=float(d["accuracy_float"]),
        accuracy=float(accs.mean()),
        accuracy_loss=float(losses.mean()),
        accuracy_loss_stderr=iv["accuracy_loss"][0],
        accuracy_loss_interval=iv["accuracy_loss"][1],
        accuracy_loss_pvalue=pvalue,
        flip_rate=float(counts.mean() / n),
        flip_rate_stderr=iv["flip_rate"][0],
        flip_rate_interval=iv["flip_rate"][1],
        repeats=int(counts.size),
        confidence_level=c,
        quantizers={k: UniformQuantizer(**v) for k, v in d["quantizers"].items()},
        bits_per_weight=float("nan") if bpw is None else float(bpw),
        accuracies=accs,
        flip_rates=counts / n,
        flip_counts=counts,
        n10=n10,
        n01=n01,
        flips=np.asarray(d["flips"], dtype=bool),
    )


def _check_quantizers(
    quantizer: UniformQuantizer | dict[str, UniformQuantizer],
) -> list[UniformQuantizer]:
    qs = list(quantizer.values()) if isinstance(quantizer, dict) else [quantizer]
    if not qs:
        raise ValueError("quantizer is an empty dict: map each layer to a UniformQuantizer")
    for q in qs:
        if not isinstance(q, UniformQuantizer):
            raise ValueError(f"quantizer must be a UniformQuantizer, got {type(q).__name__}")
    return qs


def _check_repeats(quantizers: Sequence[UniformQuantizer], repeats: int | None) -> int:
    stochastic = any(q.rounding != "nearest" for q in quantizers)
    if repeats is None:
        return 10 if stochastic else 1
    if isinstance(repeats, bool) or not isinstance(repeats, int | np.integer) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    return int(repeats) if stochastic else 1


def measure_last_layer(
    feature_set: Any,
    quantizer: UniformQuantizer,
    *,
    quantize_bias: bool = False,
    rows: Sequence[int] | None = None,
    repeats: int | None = None,
    seed: int = 0,
    confidence_level: float = 0.95,
    confidence: float | None = None,
) -> Measurement:
    r"""Measure the effect of quantizing only the last layer, from saved features.

    Parameters
    ----------
    feature_set : FeatureSet
        Penultimate features (n_samples, d), labels, logits, and the layer ``W`` (K, d), ``b``.
    quantizer : UniformQuantizer
    quantize_bias : bool
        Quantize ``b`` too (with the same quantizer, per tensor); by default it stays float.
    rows : sequence of int, optional
        Decide among these rows of ``W`` only (a sub-problem such as cat vs dog, whose labels
        index ``rows``), after quantizing the whole ``W`` as the network would be.
    repeats : int, optional
        Realizations for stochastic rounding and dither (default 10; 1 for nearest).
    seed : int
        Realization ``r`` uses seed ``seed + r``.
    confidence_level : float
        Level of the intervals (see :class:`Measurement` for what they cover).
    confidence : float, optional
        Deprecated name of ``confidence_level``.

    Returns
    -------
    Measurement
        ``layers`` is ``("last",)``.
    """
    c = _level(confidence_level, confidence)
    repeats = _check_repeats(_check_quantizers(quantizer), repeats)
    x = np.asarray(feature_set.features, dtype=np.float64)
    W = np.asarray(feature_set.W, dtype=np.float64)
    b = np.asarray(feature_set.b, dtype=np.float64)
    labels = np.asarray(feature_set.labels)
    keep = np.arange(W.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    if keep.ndim != 1 or keep.size < 2 or keep.min() < 0 or keep.max() >= W.shape[0]:
        raise ValueError(f"rows must list at least 2 rows of W (0..{W.shape[0] - 1}), got {rows!r}")
    pred_float = np.argmax(x @ W[keep].T + b[keep], axis=1)
    bias_q = replace(quantizer, granularity="tensor")
    preds = []
    for r in range(repeats):
        Wq = np.asarray(quantizer.quantize(feature_set.W, seed=seed + r).values, np.float64)
        bq = np.asarray(bias_q.quantize(b, seed=seed + r + 7919).values) if quantize_bias else b
        preds.append(np.argmax(x @ Wq[keep].T + bq[keep], axis=1))
    return _summarize(
        {"last": quantizer}, ("last",), labels, pred_float, preds, c, float(quantizer.bits)
    )


def resolve_layers(
    model: Any, layers: str | Sequence[str], *, input_shape: tuple[int, ...] | None = None
) -> list[str]:
    """Names of the layers to quantize: ``"last"``, ``"all"``, or a list of layer names.

    ``input_shape`` (default (1, 3, 32, 32)) is the shape of the input batch of the forward
    pass that finds the layers (see :func:`~distortion.experiments.models.quantizable_layers`).
    Raises a ValueError naming the unknown layers and listing the known ones, or naming the
    type of a layer that is not supported. A layer whose weight is tied to others stands
    for all of them: their names map to it, and it is quantized once.
    """
    from distortion.experiments._torch_state import modes_kept
    from distortion.experiments.models import (
        SUPPORTED_LAYER_TYPES,
        _discover,
        _example,
        last_linear,
    )

    with modes_kept(model):  # its forward pass in eval mode resets the submodules' modes
        model.eval()
        shape = (1, 3, 32, 32) if input_shape is None else tuple(input_shape)
        found = _discover(model, _example(model, shape))
    known = [s.name for s in found.layers]
    if isinstance(layers, str):
        if layers == "all":
            return known
        if layers == "last":
            name = last_linear(model).name
            return [found.aliases.get(name, name)]
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: pass 'last', 'all' or a list of layer names")
    bad = [f"{n!r}: {found.unsupported[n]}" for n in layers if n in found.unsupported]
    if bad:
        raise ValueError(
            f"layer(s) not supported: {'; '.join(bad)} (supported types: "
            f"{', '.join(SUPPORTED_LAYER_TYPES)})"
        )
    unknown = [name for name in layers if name not in known and name not in found.aliases]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; quantizable layers are: {', '.join(known)}")
    # a tied weight is quantized once, under the name that stands for all its uses
    return list(dict.fromkeys(found.aliases.get(n, n) for n in layers))


def quantize_model(
    model: torch.nn.Module,
    quantizer: UniformQuantizer | dict[str, UniformQuantizer],
    layers: str | Sequence[str] = "all",
    *,
    seed: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    bias_correction: Any = None,
) -> tuple[torch.nn.Module, dict[str, QuantizedTensor]]:
    """A copy of ``model`` with the weights of ``layers`` quantized (biases stay float).

    Parameters
    ----------
    model : torch.nn.Module
    quantizer : UniformQuantizer or dict mapping layer name to UniformQuantizer
        One quantizer for every layer, or one per layer (mixed precision).
    layers : "all", "last" or list of str
        Ignored when ``quantizer`` is a dict (its keys are the layers).
    seed : int, optional
        Seed of stochastic rounding and dither; layer ``i`` uses ``seed + i``.
    input_shape : tuple of int, optional
        Shape of an input batch (see :func:`resolve_layers`).
    bias_correction : InputMeans, optional
        Shift each quantized layer's bias by its output mean error on the calibration
        inputs (:mod:`~distortion.experiments.bias_correction`, eq. L22).

    Returns
    -------
    model : torch.nn.Module
        The quantized copy (the input model is not modified).
    quantized : dict of str to QuantizedTensor
    """
    import torch

    from distortion.experiments.models import get_layer

    if isinstance(quantizer, dict):
        names = resolve_layers(model, list(quantizer), input_shape=input_shape)
        per_layer = quantizer
    else:
        names = resolve_layers(model, layers, input_shape=input_shape)
        per_layer = dict.fromkeys(names, quantizer)
    qmodel = copy.deepcopy(model)
    out = {}
    with torch.no_grad():
        for i, name in enumerate(names):
            module = get_layer(qmodel, name)
            q = per_layer[name]
            res = q.quantize(module.weight.detach(), seed=None if seed is None else seed + i)
            module.weight.copy_(res.values)
            out[name] = res
    if bias_correction is not None:
        from distortion.experiments.bias_correction import correct_compressed

        correct_compressed(model, qmodel, {n: r.values for n, r in out.items()}, bias_correction)
    return qmodel, out


def _logits(model: Any, dataset: Any, batch_size: int, dev: Any, progress: bool, desc: str):
    import torch
    from tqdm.auto import tqdm

    from distortion.experiments.sensitivity import _batches, _n_samples

    out = []
    n = _n_samples(dataset)
    total = None if n is None else -(-n // batch_size)
    with torch.inference_mode():
        for x, _ in tqdm(
            _batches(dataset, batch_size), total=total, desc=desc, disable=not progress,
            leave=False,
        ):  # fmt: skip
            out.append(model(x.to(dev)).float().cpu().numpy())
    return np.concatenate(out)


def predict_logits(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int = 500,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "predict",
) -> np.ndarray:
    """Logits of ``model`` on every image of ``dataset``, shape (n_samples, K), float32.

    ``dataset`` is any form :func:`~distortion.experiments.sensitivity.gradient_grams`
    accepts (ImageDataset, DataLoader, Dataset, (x, y) or an input tensor).

    The model is run on ``device`` in eval mode and then left as it was (its tensors back on
    their devices, every submodule back in its own training mode).
    """
    from distortion.experiments._torch_state import evaluated_on

    with evaluated_on(model, device) as dev:
        return _logits(model, dataset, batch_size, dev, progress, desc)


def measure(
    model: torch.nn.Module,
    dataset: Any,
    quantizer: UniformQuantizer | dict[str, UniformQuantizer],
    *,
    layers: str | Sequence[str] = "all",
    reference_logits: np.ndarray | None = None,
    repeats: int | None = None,
    seed: int = 0,
    batch_size: int = 500,
    device: str = "cpu",
    progress: bool = True,
    confidence_level: float = 0.95,
    confidence: float | None = None,
    bias_correction: Any = None,
) -> Measurement:
    """Quantize ``layers`` of ``model``, run it on ``dataset`` and compare with the float model.

    Parameters
    ----------
    model : torch.nn.Module
        The float network; not modified, and left on its device in its training mode.
    dataset : ImageDataset, DataLoader, Dataset or (x, y)
        Labelled samples: an ImageDataset (``dataset.batches``, ``dataset.labels``), a
        ``torch.utils.data.DataLoader`` of (x, y) batches (not shuffled), a ``TensorDataset``
        or other map-style ``Dataset`` of (x, y) items, or a pair of inputs (N, ...) and
        labels (N,).
    quantizer : UniformQuantizer or dict of layer name to UniformQuantizer
        One quantizer for every layer of ``layers``, or one per layer (a mixed allocation:
        its keys are the layers, ``layers`` is ignored, and every layer's quantizer is kept
        in ``Measurement.quantizers``).
    layers : "all", "last" or list of str
    reference_logits : ndarray of shape (n_samples, K), optional
        Float logits already computed on the same images (saves one pass).
    repeats : int, optional
        Realizations for stochastic rounding and dither (default 10 when any layer's
        rounding is stochastic; 1 for nearest).
    seed : int
        Realization ``r`` uses seed ``seed + 1000 r``.
    batch_size, device, progress
    confidence_level : float
        Level of the intervals (see :class:`Measurement` for what they cover).
    confidence : float, optional
        Deprecated name of ``confidence_level``.
    bias_correction : InputMeans, optional
        Measure the bias-corrected network (see :func:`quantize_model`).

    Returns
    -------
    Measurement
    """
    from distortion.experiments._torch_state import evaluated_on

    c = _level(confidence_level, confidence)
    qs = _check_quantizers(quantizer)
    repeats = _check_repeats(qs, repeats)
    from distortion.experiments.sensitivity import _batches, _data_info

    _, labels, _ = _data_info(dataset, fingerprint=False)
    if labels is None:
        raise ValueError("measure needs labels: pass (x, y), or a DataLoader of (x, y) batches")
    if reference_logits is None:
        reference_logits = predict_logits(
            model, dataset, batch_size=batch_size, device=device, progress=progress, desc="float"
        )
    reference_logits = np.asarray(reference_logits)
    if reference_logits.shape[0] != labels.size:
        raise ValueError(
            f"reference_logits has {reference_logits.shape[0]} rows but the dataset has "
            f"{labels.size} images"
        )
    pred_float = reference_logits.argmax(axis=1)
    bits = {q.bits for q in qs}
    desc = f"{qs[0].bits}-bit" if len(bits) == 1 else "mixed"
    preds = []
    per_layer: dict[str, UniformQuantizer] = {}
    sizes: dict[str, int] = {}
    x0, _ = next(iter(_batches(dataset, 1)))
    shape = (1, *tuple(x0.shape[1:]))
    for r in range(repeats):
        qmodel, qt = quantize_model(
            model, quantizer, layers, seed=seed + 1000 * r, input_shape=shape,
            bias_correction=bias_correction,
        )  # fmt: skip
        per_layer = (
            {name: quantizer[name] for name in qt}
            if isinstance(quantizer, dict)
            else dict.fromkeys(qt, quantizer)
        )
        sizes = {name: int(np.prod(t.values.shape)) for name, t in qt.items()}
        with evaluated_on(qmodel, device) as dev:  # the copy: nothing to give back
            logits = _logits(qmodel, dataset, batch_size, dev, progress, desc)
        preds.append(logits.argmax(axis=1))
        del qmodel
    total = sum(sizes.values())
    bpw = sum(per_layer[k].bits * s for k, s in sizes.items()) / total if total else float("nan")
    return _summarize(per_layer, list(per_layer), labels, pred_float, preds, c, bpw)
