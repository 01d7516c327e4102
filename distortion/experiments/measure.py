r"""Measured accuracy loss and prediction flips after real quantization (level 4).

Quantize chosen layers of a real model — the last layer alone, a list of layers, or all —
with any :class:`~distortion.quantize.UniformQuantizer`, run it on the same images as the
float model, and compare image by image:

- the accuracy loss :math:`\hat\ell = (n_{10} - n_{01})/n`, with :math:`n_{10}` the images
  correct before and wrong after and :math:`n_{01}` the reverse, with an exact paired
  (McNemar) test and an exact conditional interval (:func:`paired_accuracy_loss`);
- the flip rate :math:`\hat p = k/n`, the fraction of images whose predicted class changes,
  with its Clopper–Pearson interval (:func:`binomial_interval`).

For stochastic rounding and dither, ``repeats`` seeded realizations give the mean and the
spread (standard deviation across realizations) of both.

When only the last layer is quantized the network need not be run again:
:func:`measure_last_layer` recomputes the logits :math:`\hat W x + b` from a
:class:`~distortion.experiments.features.FeatureSet` (numpy only).

The pure statistics here import neither torch nor matplotlib; torch is imported inside the
functions that run a model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats

from distortion.quantize import QuantizedTensor, UniformQuantizer

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Measurement",
    "PairedLoss",
    "binomial_interval",
    "measure",
    "measure_last_layer",
    "paired_accuracy_loss",
    "predict_logits",
    "quantize_model",
    "resolve_layers",
]


def binomial_interval(k: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    r"""Clopper–Pearson (exact) interval for a binomial proportion :math:`k/n`.

    Notes
    -----
    .. math:: [\,B^{-1}(\tfrac{a}{2}; k, n-k+1),\; B^{-1}(1-\tfrac{a}{2}; k+1, n-k)\,]

    with :math:`a = 1 - \text{confidence}` and :math:`B^{-1}` the beta quantile (0 and 1 at
    the ends).
    """
    _check_confidence(confidence)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k!r}, n={n!r}")
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


@dataclass(frozen=True)
class PairedLoss:
    r"""Accuracy loss of paired predictions (same images before and after).

    Attributes
    ----------
    n : int
        Number of images.
    n10, n01 : int
        Correct before and wrong after; wrong before and correct after.
    loss : float
        :math:`(n_{10} - n_{01})/n`, the accuracy before minus after.
    ci : tuple of float
        Exact conditional interval: given the :math:`m = n_{10} + n_{01}` discordant pairs,
        :math:`n_{10} \sim \mathrm{Bin}(m, \theta)` and the loss is
        :math:`(m/n)(2\theta - 1)`; the Clopper–Pearson interval of :math:`\theta` maps to it.
    pvalue : float
        Two-sided exact McNemar test of "no loss" (:math:`\theta = 1/2`); 1 when :math:`m = 0`.
    confidence : float
    """

    n: int
    n10: int
    n01: int
    loss: float
    ci: tuple[float, float]
    pvalue: float
    confidence: float

    def to_frame(self) -> pd.DataFrame:
        """One-row DataFrame."""
        return pd.DataFrame(
            [
                {
                    "n": self.n,
                    "n10": self.n10,
                    "n01": self.n01,
                    "loss": self.loss,
                    "loss_lo": self.ci[0],
                    "loss_hi": self.ci[1],
                    "pvalue": self.pvalue,
                }
            ]
        )


def paired_accuracy_loss(
    correct_before: Any, correct_after: Any, *, confidence: float = 0.95
) -> PairedLoss:
    r"""Accuracy loss between two paired sets of predictions, with an exact test and interval.

    Parameters
    ----------
    correct_before, correct_after : array_like of bool, shape (n_samples,)
        Whether each image is classified correctly before and after quantization.
    confidence : float
        Confidence level of the interval.

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
    _check_confidence(confidence)
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
    if m == 0:
        return PairedLoss(n, 0, 0, 0.0, (0.0, 0.0), 1.0, confidence)
    th_lo, th_hi = binomial_interval(n10, m, confidence=confidence)
    ci = ((m / n) * (2 * th_lo - 1), (m / n) * (2 * th_hi - 1))
    pvalue = float(stats.binomtest(n10, m, 0.5).pvalue)
    return PairedLoss(n, n10, n01, (n10 - n01) / n, ci, pvalue, confidence)


@dataclass(frozen=True)
class Measurement:
    r"""Measured effect of quantizing some layers of a network on a set of images.

    Attributes
    ----------
    quantizer : UniformQuantizer
    layers : tuple of str
        The quantized layers.
    n : int
        Number of images.
    accuracy_float : float
        Accuracy of the float network.
    accuracy : float
        Accuracy of the quantized network (mean over realizations).
    loss : float
        ``accuracy_float - accuracy`` (mean over realizations).
    loss_ci : tuple of float
        Exact paired interval of the loss (:func:`paired_accuracy_loss`); over several
        realizations, on the discordant counts pooled over them.
    loss_pvalue : float
        Exact McNemar p-value of "no loss" (pooled counts over realizations).
    flip_rate : float
        Fraction of images whose predicted class changes (mean over realizations).
    flip_ci : tuple of float
        Clopper–Pearson interval of the flip rate (pooled counts over realizations).
    loss_sd, flip_sd : float
        Standard deviation across realizations (0 for a single one).
    repeats : int
        Number of realizations (1 for nearest rounding).
    accuracies, flip_rates : ndarray of shape (repeats,)
        Per realization.
    flips : ndarray of bool, shape (n,)
        Per image, whether the first realization changed its prediction.
    """

    quantizer: UniformQuantizer
    layers: tuple[str, ...]
    n: int
    accuracy_float: float
    accuracy: float
    loss: float
    loss_ci: tuple[float, float]
    loss_pvalue: float
    flip_rate: float
    flip_ci: tuple[float, float]
    loss_sd: float
    flip_sd: float
    repeats: int
    accuracies: np.ndarray = field(repr=False)  # (repeats,)
    flip_rates: np.ndarray = field(repr=False)  # (repeats,)
    flips: np.ndarray = field(repr=False)  # (n,)

    def to_frame(self) -> pd.DataFrame:
        """One-row DataFrame with the quantizer's settings and the measured quantities."""
        q = self.quantizer
        return pd.DataFrame(
            [
                {
                    "bits": q.bits,
                    "scheme": q.scheme,
                    "granularity": q.granularity,
                    "clipping": q.clipping,
                    "rounding": q.rounding,
                    "layers": ",".join(self.layers)
                    if len(self.layers) <= 3
                    else f"{len(self.layers)} layers",
                    "n": self.n,
                    "accuracy_float": self.accuracy_float,
                    "accuracy": self.accuracy,
                    "loss": self.loss,
                    "loss_lo": self.loss_ci[0],
                    "loss_hi": self.loss_ci[1],
                    "loss_pvalue": self.loss_pvalue,
                    "flip_rate": self.flip_rate,
                    "flip_lo": self.flip_ci[0],
                    "flip_hi": self.flip_ci[1],
                    "loss_sd": self.loss_sd,
                    "flip_sd": self.flip_sd,
                    "repeats": self.repeats,
                }
            ]
        )


def _summarize(
    quantizer: UniformQuantizer,
    layers: Sequence[str],
    labels: np.ndarray,
    pred_float: np.ndarray,
    preds: list[np.ndarray],
    confidence: float,
) -> Measurement:
    correct0 = pred_float == labels
    n = labels.size
    accs = np.array([np.mean(p == labels) for p in preds])
    flips = np.array([np.mean(p != pred_float) for p in preds])
    n10 = sum(int(np.sum(correct0 & (p != labels))) for p in preds)
    n01 = sum(int(np.sum(~correct0 & (p == labels))) for p in preds)
    r = len(preds)
    if r == 1:
        paired = paired_accuracy_loss(correct0, preds[0] == labels, confidence=confidence)
    else:  # pooled discordant counts over the realizations (n * r paired trials)
        before = np.tile(correct0, r)
        after = np.concatenate([p == labels for p in preds])
        paired = paired_accuracy_loss(before, after, confidence=confidence)
    k = int(sum(np.sum(p != pred_float) for p in preds))
    assert paired.n10 == n10 and paired.n01 == n01
    return Measurement(
        quantizer=quantizer,
        layers=tuple(layers),
        n=n,
        accuracy_float=float(np.mean(correct0)),
        accuracy=float(accs.mean()),
        loss=paired.loss,  # (n10 - n01) / (n r) = accuracy_float - mean accuracy
        loss_ci=paired.ci,
        loss_pvalue=paired.pvalue,
        flip_rate=float(flips.mean()),
        flip_ci=binomial_interval(k, n * r, confidence=confidence),
        loss_sd=float(accs.std(ddof=1)) if r > 1 else 0.0,
        flip_sd=float(flips.std(ddof=1)) if r > 1 else 0.0,
        repeats=r,
        accuracies=accs,
        flip_rates=flips,
        flips=preds[0] != pred_float,
    )


def _check_repeats(quantizer: UniformQuantizer, repeats: int | None) -> int:
    if not isinstance(quantizer, UniformQuantizer):
        raise ValueError(f"quantizer must be a UniformQuantizer, got {type(quantizer).__name__}")
    if repeats is None:
        return 1 if quantizer.rounding == "nearest" else 10
    if not isinstance(repeats, int | np.integer) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    return 1 if quantizer.rounding == "nearest" else int(repeats)


def measure_last_layer(
    feature_set: Any,
    quantizer: UniformQuantizer,
    *,
    quantize_bias: bool = False,
    rows: Sequence[int] | None = None,
    repeats: int | None = None,
    seed: int = 0,
    confidence: float = 0.95,
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
    confidence : float

    Returns
    -------
    Measurement
        ``layers`` is ``("last",)``.
    """
    repeats = _check_repeats(quantizer, repeats)
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
    return _summarize(quantizer, ("last",), labels, pred_float, preds, confidence)


def resolve_layers(model: Any, layers: str | Sequence[str]) -> list[str]:
    """Names of the layers to quantize: ``"last"``, ``"all"``, or a list of layer names.

    Raises a ValueError naming the unknown layers and listing the known ones.
    """
    from distortion.experiments.models import last_linear, quantizable_layers

    known = [info.name for info in quantizable_layers(model)]
    if isinstance(layers, str):
        if layers == "all":
            return known
        if layers == "last":
            return [last_linear(model).name]
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: pass 'last', 'all' or a list of layer names")
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; quantizable layers are: {', '.join(known)}")
    return layers


def quantize_model(
    model: torch.nn.Module,
    quantizer: UniformQuantizer | dict[str, UniformQuantizer],
    layers: str | Sequence[str] = "all",
    *,
    seed: int | None = None,
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

    Returns
    -------
    model : torch.nn.Module
        The quantized copy (the input model is not modified).
    quantized : dict of str to QuantizedTensor
    """
    import torch

    from distortion.experiments.models import get_layer

    if isinstance(quantizer, dict):
        names = resolve_layers(model, list(quantizer))
        per_layer = quantizer
    else:
        names = resolve_layers(model, layers)
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
    return qmodel, out


def predict_logits(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int = 500,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "predict",
) -> np.ndarray:
    """Logits of ``model`` on every image of ``dataset`` (n_samples, K), float32."""
    import torch
    from tqdm.auto import tqdm

    model = model.to(device).eval()
    out = []
    total = -(-len(dataset) // batch_size)
    with torch.inference_mode():
        for x, _ in tqdm(
            dataset.batches(batch_size), total=total, desc=desc, disable=not progress, leave=False
        ):
            out.append(model(x.to(device)).float().cpu().numpy())
    return np.concatenate(out)


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
    confidence: float = 0.95,
) -> Measurement:
    """Quantize ``layers`` of ``model``, run it on ``dataset`` and compare with the float model.

    Parameters
    ----------
    model : torch.nn.Module
        The float network (not modified).
    dataset : ImageDataset
        Images and labels (``dataset.batches``, ``dataset.labels``).
    quantizer : UniformQuantizer or dict of layer name to UniformQuantizer
    layers : "all", "last" or list of str
    reference_logits : ndarray of shape (n_samples, K), optional
        Float logits already computed on the same images (saves one pass).
    repeats : int, optional
        Realizations for stochastic rounding and dither (default 10; 1 for nearest).
    seed : int
        Realization ``r`` uses seed ``seed + 1000 r``.
    batch_size, device, progress, confidence

    Returns
    -------
    Measurement
    """
    first = next(iter(quantizer.values())) if isinstance(quantizer, dict) else quantizer
    repeats = _check_repeats(first, repeats)
    labels = np.asarray(dataset.labels)
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
    preds = []
    names: list[str] = []
    for r in range(repeats):
        qmodel, qt = quantize_model(model, quantizer, layers, seed=seed + 1000 * r)
        names = list(qt)
        logits = predict_logits(
            qmodel,
            dataset,
            batch_size=batch_size,
            device=device,
            progress=progress,
            desc=f"{first.bits}-bit",
        )
        preds.append(logits.argmax(axis=1))
    return _summarize(first, names, labels, pred_float, preds, confidence)
