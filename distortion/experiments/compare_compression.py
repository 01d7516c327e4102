r"""Predicted versus measured flip rate for any compressor, every layer compressed.

The all-layer comparison of :func:`~distortion.experiments.compare.compare_all_layers`,
for every compressor of :mod:`distortion.compressors` (pruning, low rank, codebooks,
non-uniform grids, residual expansion, compositions) and not only uniform rounding. A
*configuration* is ``(family, strength, compressor)``; for each one every layer is
compressed (jointly, through ``compress_many``, when the compressor has it: global
magnitude pruning) and the levels of ARCHITECTURE.md, "Phase 2", stand beside the
measurement:

- level 2L — the network linearized in its weights, moved by the *actual* perturbation
  :math:`E_\ell = \hat W_\ell - W_\ell` (one JVP pass,
  :func:`~distortion.experiments.compare.first_order_actual_flips`);
- level 3L — the same first-order model with the compressor's *error model* as noise,
  :math:`\sigma^2_{\ell c} = E[e^2]` per tensor or output channel
  (:func:`~distortion.theory.multilayer.multilayer_distortion`), with the band of one
  realization when the Grams hold cached realizations;
- level 4 — the compressed network, measured (:func:`measure_compressed`).

2L against the measurement isolates the linearization; 3L against 2L isolates the error
model — whether the compressor's error, seen through the Jacobians, acts like noise of its
second moment. That is the hypothesis to test per compressor (the analogue of H_U for
rounding); each row reports three statistics of it (:data:`COMPRESSION_COLUMNS`):

``noise_check``
    :math:`|p_{3L} - p_{2L}| / \max(p_{2L}, 1/n)`: the relative error of the noise model
    against the actual perturbation, both at first order.
``noise_in_band``
    Whether :math:`p_{2L}` lies in the 3L band of one realization (to the resolution
    :math:`1/n`): under the noise hypothesis the actual error is one realization of the
    modelled noise, so its first-order flip rate falls in that band 95 % of the time.
``noise_energy_ratio``
    :math:`\rho = \sum_i \sum_{j\ne r_i} (\delta m_{ij})^2 / \sum_i \sum_{j \ne r_i}
    \operatorname{Var}_{3L}(\delta m_{ij})` with :math:`\delta m_{ij} = \delta z_{i r_i} -
    \delta z_{ij}` the first-order margin perturbations of the actual error (:math:`r_i` the
    float decision) and :math:`\operatorname{Var}_{3L}` their variance under the error
    model (:func:`~distortion.theory.multilayer.noise_covariance`). The flip rate is a
    function of the margins' perturbation, and for noise with these second moments
    :math:`E[\delta m^2] = \operatorname{Var}_{3L}(\delta m)` exactly, so :math:`\rho = 1`
    up to the realization's fluctuation; :math:`\rho \gg 1` means the error is aligned with
    the directions the decisions depend on (correlated, structured), :math:`\rho \ll 1`
    that it is aligned away from them. Unlike the two flip-rate checks it is informative
    also where almost nothing flips.

numpy at import; torch where models run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from distortion.compression import realization_seed
from distortion.experiments.compare import Comparison, ComparisonCell
from distortion.results import resolution_tolerance

__all__ = [
    "COMPRESSION_COLUMNS",
    "CompressionCell",
    "compare_compression",
    "COMPRESSION_FAMILIES",
    "compress_layers",
    "compressed_model",
    "compression_grid",
    "compression_summary",
    "compressor_settings",
    "measure_compressed",
    "noise_energy_ratio",
    "predict_compression",
]

#: The columns a compression comparison has beyond those of compare.COLUMN_DICTIONARY.
COMPRESSION_COLUMNS: dict[str, str] = {
    "family": "compression family (e.g. 'prune-layer', 'svd-energy', 'kmeans', 'rex')",
    "strength": "the family's strength parameter (sparsity, energy kept, clusters, bits, ...)",
    "relative_error_energy": "sum over layers of ||W_hat - W||^2 over sum of ||W||^2",
    "error_mean_square_actual": "mean over layers of the actual mean square of W_hat - W",
    "error_model_random": "whether every layer's error model is random (rounding-like)",
    "noise_check": "|L3L - L2L| / max(L2L, 1/n_eval) of the flip rate: the error model as "
    "noise against the actual perturbation, both at first order",
    "noise_in_band": "L2L flip rate inside the L3L band of one realization (resolution "
    "1/n_eval): the actual error behaves like one realization of the modelled noise",
    "noise_energy_ratio": "mean squared first-order margin perturbation of the actual error "
    "over its variance under the error model (1 for noise of the modelled second moment)",
}

_DASH = "-"


# ----------------------------------------------------------------------------- settings
def compressor_settings(compressor: Any) -> dict[str, Any]:
    """The key columns bits / scheme / granularity / clipping / rounding of a compressor.

    ``bits`` is an integer: the bit-width of a quantizer (per term for residual expansion),
    :math:`\\lceil\\log_2 K\\rceil` for a codebook of K clusters, the largest over the stages
    of a composition, 0 where none applies (pruning, low rank). A setting that does not apply
    reads ``"-"``; ``scheme`` names the kind (the quantizer's scheme, the grid, the pruning
    pattern, ``"svd"``, ``"kmeans"``), stages of a composition joined by ``"+"``.
    """
    from distortion.compressors import (
        Compose,
        KMeansQuantizer,
        LowRank,
        MagnitudePruner,
        NonUniformQuantizer,
        ResidualExpansion,
    )
    from distortion.quantize import UniformQuantizer

    c = compressor
    if isinstance(c, dict):  # a mixed configuration: the settings of its first compressor
        return compressor_settings(next(v for v in c.values() if v is not None))
    if isinstance(c, UniformQuantizer):
        lab = c.labels()  # "symmetric-full", "max*0.97"; the defaults read as before
        return dict(bits=int(c.bits), scheme=lab["scheme"], granularity=c.granularity,
                    clipping=lab["clipping"], rounding=c.rounding)  # fmt: skip
    if isinstance(c, NonUniformQuantizer):
        return dict(bits=int(c.bits), scheme=c.grid, granularity=c.granularity,
                    clipping="max", rounding="nearest")  # fmt: skip
    if isinstance(c, ResidualExpansion):
        return dict(bits=int(c.bits), scheme=f"rex{c.order}", granularity=c.granularity,
                    clipping="max", rounding="nearest")  # fmt: skip
    if isinstance(c, KMeansQuantizer):
        return dict(bits=max(int(math.ceil(math.log2(c.n_clusters))), 0), scheme="kmeans",
                    granularity=c.granularity, clipping=_DASH, rounding="nearest")  # fmt: skip
    if isinstance(c, MagnitudePruner):
        pattern = f"{c.n}:{c.m}" if c.pattern == "n:m" else c.pattern
        return dict(bits=0, scheme=pattern, granularity=c.scope, clipping=_DASH,
                    rounding=_DASH)  # fmt: skip
    if isinstance(c, LowRank):
        return dict(bits=0, scheme="svd", granularity=_DASH, clipping=_DASH, rounding=_DASH)
    if isinstance(c, Compose):
        parts = [compressor_settings(s) for s in c.compressors]
        out: dict[str, Any] = {"bits": max(p["bits"] for p in parts)}
        for k in ("scheme", "granularity", "clipping", "rounding"):
            vals = [p[k] for p in parts if p[k] != _DASH]
            out[k] = "+".join(vals) if vals else _DASH
        return out
    return dict(bits=int(getattr(c, "bits", 0) or 0), scheme=type(c).__name__,
                granularity=str(getattr(c, "granularity", _DASH)), clipping=_DASH,
                rounding=_DASH)  # fmt: skip


# ----------------------------------------------------------------------------- compress
def compress_layers(compressor: Any, weights: dict[str, Any], *, seed: int | None = 0) -> dict:
    """Compress every layer's weight: through ``compress_many`` when the compressor has one
    (global magnitude pruning ranks all the layers jointly), else layer ``i`` with seed
    ``seed + i`` (the seeds :func:`~distortion.experiments.measure.quantize_model` uses).

    ``compressor`` may also be a dict of layer name to compressor (or None): a mixed
    configuration, the layers it does not name (or maps to None) kept in float.

    Returns
    -------
    dict of str to Compressed, in the order of ``weights``
    """
    if isinstance(compressor, dict):
        unknown = sorted(set(compressor) - set(weights))
        if unknown:
            raise ValueError(f"no layer(s) {unknown} among {list(weights)}")
        out = {}
        for i, (name, w) in enumerate(weights.items()):
            c = compressor.get(name)
            out[name] = (
                _uncompressed(w) if c is None
                else c.compress(w, seed=None if seed is None else seed + i)
            )  # fmt: skip
        return out
    many = getattr(compressor, "compress_many", None)
    if callable(many):
        return many(dict(weights), seed=seed)
    return {
        name: compressor.compress(w, seed=None if seed is None else seed + i)
        for i, (name, w) in enumerate(weights.items())
    }


def _uncompressed(w: Any):
    """A layer kept in float: zero error, a deterministic zero error model."""
    from distortion.compression import Compressed
    from distortion.quantize import _to_numpy
    from distortion.theory.error_models import ErrorModel

    w64, _ = _to_numpy(w)
    model = ErrorModel(np.zeros(()), 0.0, granularity="tensor", random=False, rule="float")
    return Compressed(w, np.zeros(w64.shape), model, None, None)


def compressed_model(model: Any, compressed: dict[str, Any], *, bias_correction: Any = None) -> Any:
    """A copy of ``model`` whose layers in ``compressed`` have the weights ``values``;
    with ``bias_correction`` (an :class:`~distortion.experiments.bias_correction.InputMeans`)
    their biases are shifted by the output mean error on the calibration inputs (eq. L22)."""
    import torch

    from distortion.experiments.models import get_layer

    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, c in compressed.items():
            w = get_layer(out, name).weight
            w.copy_(torch.as_tensor(c.values, dtype=w.dtype, device=w.device))
    if bias_correction is not None:
        from distortion.experiments.bias_correction import correct_compressed

        correct_compressed(model, out, {n: c.values for n, c in compressed.items()},
                           bias_correction)  # fmt: skip
    return out


def measure_compressed(
    model: Any,
    data: Any,
    compressed: dict[str, Any],
    *,
    compressor: Any = None,
    reference_logits: np.ndarray | None = None,
    predictions: np.ndarray | None = None,
    batch_size: int = 500,
    progress: bool = True,
    confidence_level: float = 0.95,
    bias_correction: Any = None,
):
    """Level 4 for any compressor: the compressed network run on ``data``.

    Parameters
    ----------
    model : torch.nn.Module
        The float network (not modified).
    data : ImageDataset or the minimal protocol (``batches``, ``labels``)
    compressed : dict of layer name to Compressed
    compressor : optional
        Recorded as the measurement's ``quantizer`` (default: the first layer's).
    reference_logits : ndarray of shape (N, K), optional
        Float logits of the same images.
    predictions : ndarray of shape (N,), optional
        The compressed network's decisions when already known (from a cache): nothing runs.
    bias_correction : InputMeans, optional
        Measure the bias-corrected network (see :func:`compressed_model`).

    Returns
    -------
    Measurement
        One realization: Clopper–Pearson interval of the flip rate, the exact paired interval
        of the accuracy loss. ``quantizer`` / ``quantizers`` hold the compressor (which need
        not be a UniformQuantizer, so ``Measurement.to_frame`` does not apply);
        ``bits_per_weight`` is NaN.
    """
    from distortion.experiments.measure import _summarize, predict_logits

    labels = np.asarray(data.labels)
    if reference_logits is None:
        reference_logits = predict_logits(model, data, progress=progress, desc="float")
    pred_float = np.asarray(reference_logits).argmax(axis=1)
    if predictions is None:
        cmodel = compressed_model(model, compressed, bias_correction=bias_correction)
        logits = predict_logits(
            cmodel, data, batch_size=batch_size, progress=progress, desc="compressed"
        )
        predictions = logits.argmax(axis=1)
        del cmodel
    names = list(compressed)
    comp = compressor if compressor is not None else compressed[names[0]].compressor
    return _summarize(
        dict.fromkeys(names, comp), names, labels, pred_float, [np.asarray(predictions)],
        confidence_level, float("nan"),
    )  # fmt: skip


def predict_compression(grams: Any, weights: dict[str, Any], compressor: Any, *,
                        seed: int = 0, band: bool | None = None):  # fmt: skip
    """Level 3L of one configuration from cached Grams: compress every layer, then
    :func:`~distortion.theory.multilayer.multilayer_distortion` with the error models.

    Returns
    -------
    compressed : dict of str to Compressed
    prediction : MultilayerDistortion
    """
    from distortion.theory.multilayer import multilayer_distortion

    names = list(grams.layer_names)
    comp = compress_layers(compressor, {k: weights[k] for k in names}, seed=seed)
    m2 = [comp[k].error_model.second_moment for k in names]
    band = grams.projections is not None if band is None else band
    return comp, multilayer_distortion(grams, m2, seed=realization_seed(seed, 0), band=band)


def noise_energy_ratio(grams: Any, variances: Sequence[Any], dz: np.ndarray) -> float:
    r""":math:`\rho`: actual squared first-order margin perturbations over their variance
    under the error model (the module docstring); NaN when that variance is 0.

    Parameters
    ----------
    grams : GradientGrams
    variances : sequence of length L
        The error model's second moments (as for ``multilayer_distortion``).
    dz : ndarray of shape (N, K)
        First-order logit perturbation :math:`\sum_\ell J_\ell\,\mathrm{vec}(E_\ell)`.
    """
    from distortion.theory.multilayer import noise_covariance

    cov = noise_covariance(grams, variances)  # (N, K, K)
    n, k = dz.shape
    r = grams.predictions()
    idx = np.arange(n)
    dm = dz[idx, r][:, None] - dz  # (N, K), 0 at j = r
    diag = np.einsum("ijj->ij", cov)
    var = diag[idx, r][:, None] + diag - 2.0 * cov[idx, r, :]
    mask = np.ones((n, k), dtype=bool)
    mask[idx, r] = False
    den = float(np.sum(var[mask]))
    return float(np.sum(dm[mask] ** 2) / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------- the cells
@dataclass(frozen=True)
class CompressionCell(ComparisonCell):
    """A :class:`ComparisonCell` of a compression configuration, with its diagnostics.

    ``diagnostics`` holds the columns of :data:`COMPRESSION_COLUMNS` that are not key
    columns (``noise_check``, ``noise_in_band``, ``noise_energy_ratio``, ...). The
    first-order levels 2L and 3L apply to any layer set, ``"last"`` included.
    """

    diagnostics: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        base = ComparisonCell(
            {**self.key, "layers": "all"}, self.measurement, self.predictions, self.sakr,
            self.hawq,
        ).row()  # fmt: skip
        base["layers"] = self.key["layers"]
        for k in ("L3N",):  # no dither reference for a general compressor
            for c in [c for c in base if c.startswith(f"{k}_")]:
                del base[c]
        base.update(self.diagnostics)
        return base


def compare_compression(
    model: Any,
    data: Any,
    compressors: Sequence[tuple[str, float, Any]],
    *,
    model_name: str = "",
    layers: str | Sequence[str] = "all",
    cache_dir: Any = None,
    n_realizations: int = 40,
    seed: int = 0,
    progress: bool = True,
    baselines: bool = True,
    batch_size: int = 250,
    bias_correction: Any = None,
) -> Comparison:
    r"""Compare levels 2L and 3L with the measurement, for any compressors.

    Parameters
    ----------
    model : torch.nn.Module
        The float network.
    data : ImageDataset (or ``batches``, ``labels``, ``fingerprint``, ``__len__``)
        Evaluation images, labels known.
    compressors : sequence of (family, strength, compressor)
        One cell each; ``family`` (str) and ``strength`` (float) label the row, the
        compressor compresses every layer of ``layers`` (jointly with ``compress_many``
        where it has one); a dict of layer name to compressor (or None) compresses the
        layers it names and keeps the others in float (:func:`compress_layers`).
    model_name : str
    layers : "all", "last" or sequence of str
        The compressed layers (a sequence is labelled ``"<n> layers"`` in the table).
    cache_dir : path, optional
        The Gradient Grams (per output channel, with ``n_realizations`` realizations) and
        the measured decisions of every configuration are cached there.
    n_realizations : int
        Cached error realizations behind the 3L band (0: no band).
    seed : int
        Layer ``i`` is compressed with ``seed + i`` (random compressors: the one realization
        that is measured and that level 2L sees); everything else random derives from it.
    progress : bool
    baselines : bool
        Also Sakr et al.'s bound and HAWQ-V2's sensitivity (from the Grams, free).
    batch_size : int
        Images per JVP batch of level 2L.
    bias_correction : InputMeans, optional
        The bias-corrected networks (:mod:`~distortion.experiments.bias_correction`, eq.
        L22): measured with corrected biases, 2L along the corrected tangent, 3L from the
        centred Grams (eq. L23); the layer set is labelled ``"<layers>, bias-corrected"``.

    Returns
    -------
    Comparison
        One row per configuration: the key columns of
        :data:`~distortion.experiments.compare.KEY_COLUMNS` (from
        :func:`compressor_settings`), ``family``, ``strength``, the measurement, levels 2L
        and 3L (prefixes ``L2L_``, ``L3L_``), the baselines and the columns of
        :data:`COMPRESSION_COLUMNS`.
    """
    from distortion.experiments import _cache
    from distortion.experiments.compare import linearized_prediction
    from distortion.experiments.measure import predict_logits
    from distortion.experiments.models import get_layer
    from distortion.experiments.sensitivity import _data_info, _model_hash, gradient_grams
    from distortion.theory.baselines import gauss_newton_trace, hawq_v2_sensitivity, sakr_bound
    from distortion.theory.multilayer import multilayer_distortion

    configs = list(compressors)
    for i, cfg in enumerate(configs):
        if not (isinstance(cfg, tuple | list) and len(cfg) == 3 and isinstance(cfg[0], str)):
            raise ValueError(
                f"compressors[{i}] must be a (family, strength, compressor) tuple, got {cfg!r}"
            )
        parts = list(cfg[2].values()) if isinstance(cfg[2], dict) else [cfg[2]]
        if not any(p is not None for p in parts) or not all(
            p is None or callable(getattr(p, "compress", None)) for p in parts
        ):
            raise ValueError(f"compressors[{i}][2] is not a compressor (or a dict of them), "
                             f"got {cfg[2]!r}")  # fmt: skip
    grams = gradient_grams(
        model, data, layers=layers, granularity="channel", n_realizations=n_realizations,
        seed=seed, cache_dir=cache_dir, progress=progress, input_means=bias_correction,
    )  # fmt: skip
    names = list(grams.layer_names)
    layer_label = layers if isinstance(layers, str) else f"{len(names)} layers"
    if bias_correction is not None:
        layer_label = f"{layer_label}, bias-corrected"
    weights = {k: get_layer(model, k).weight.detach() for k in names}
    w_energy = float(sum(float(np.sum(np.asarray(w, dtype=np.float64) ** 2))
                         for w in (v.cpu().numpy() for v in weights.values())))  # fmt: skip
    trace = gauss_newton_trace(grams) if baselines else None
    logits = predict_logits(model, data, progress=progress, desc="float")
    labels = np.asarray(data.labels)
    pred = logits.argmax(axis=1)
    n = len(labels)
    k_classes = logits.shape[1]
    data_key = {"model": _model_hash(model), "data": _data_info(data)[2], "layers": names}
    cells = []
    for i, (family, strength, comp) in enumerate(configs):
        compressed = compress_layers(comp, weights, seed=seed)
        m2 = [compressed[k].error_model.second_moment for k in names]
        key = {**data_key, "compressor": repr(comp), "seed": seed, "kind": "compressed"}
        if bias_correction is not None:  # absent otherwise: the old keys do not change
            key["bias_correction"] = bias_correction.key

        def compute(compressed=compressed):
            cm = compressed_model(model, compressed, bias_correction=bias_correction)
            return predict_logits(cm, data, progress=progress, desc="compressed").argmax(1)

        if cache_dir is None:
            decisions = compute()
        else:
            decisions = _cache.cached_json(
                cache_dir, "measurements", _cache.content_key(key), compute,
                encode=lambda p: {"format": "distortion.CompressedDecisions", "version": 1,
                                  "predictions": [int(v) for v in p]},
                decode=_decode_decisions(n),
            )  # fmt: skip
        m = measure_compressed(
            model, data, compressed, compressor=comp, reference_logits=logits,
            predictions=decisions,
        )  # fmt: skip
        band = grams.projections is not None
        l3 = multilayer_distortion(grams, m2, seed=realization_seed(seed, i), band=band)
        l2, dz = linearized_prediction(model, data, compressed, pred, labels,
                                       batch_size=batch_size,
                                       bias_correction=bias_correction)  # fmt: skip
        l3p = l3.to_prediction()
        sq = [float(np.sum(compressed[k].error ** 2)) for k in names]
        sakr = sakr_bound(grams, variances=m2) if baselines else None
        hawq = hawq_v2_sensitivity(trace, sq) if baselines else None
        tol = resolution_tolerance(n)
        fb = l3p.flip_rate_band
        in_band = fb.contains(l2.flip_rate, tol=tol) if np.isfinite(fb.low) else np.nan
        diagnostics = {
            "relative_error_energy": sum(sq) / w_energy if w_energy > 0 else float("nan"),
            "error_mean_square_actual": float(
                np.mean([np.mean(compressed[k].error ** 2) for k in names])
            ),
            "error_model_random": bool(all(compressed[k].error_model.random for k in names)),
            "noise_check": abs(l3p.flip_rate - l2.flip_rate) / max(l2.flip_rate, 1.0 / n),
            "noise_in_band": in_band,
            "noise_energy_ratio": noise_energy_ratio(grams, m2, dz),
        }
        cell_key = {
            "model": model_name,
            "problem": "10-class" if k_classes == 10 else f"{k_classes}-class",
            "layers": layer_label, "n_classes": k_classes,
            **compressor_settings(comp),
            "family": str(family), "strength": float(strength),
            "n_fit": 0, "n_eval": n, "step_mean": float("nan"),
            "error_second_moment_mean": float(np.mean([np.mean(v) for v in m2])),
        }  # fmt: skip
        cells.append(CompressionCell(cell_key, m, {"L2L": l2, "L3L": l3p}, sakr, hawq, diagnostics))
    return Comparison.from_cells(cells)


def _decode_decisions(n: int):
    def decode(d: Any) -> np.ndarray:
        if not isinstance(d, dict) or d.get("format") != "distortion.CompressedDecisions":
            raise ValueError("not a record of compressed decisions")
        p = np.asarray(d["predictions"], dtype=np.int64)
        if p.shape != (n,):
            raise ValueError(f"expected {n} decisions, got {p.shape}")
        return p

    return decode


# ----------------------------------------------------------------------------- summary
def compression_summary(comparison: Comparison, *, max_flip_rate: float = 0.2) -> pd.DataFrame:
    r"""Per model × layer set × family: how well 2L and 3L predict, and where they break.

    Over the cells whose measured flip rate is at most ``max_flip_rate`` (first-order
    models are meant for small perturbations; the cap is the ``max_flip_rate`` column):
    ``band_coverage`` (measured flip rate in the
    3L band), the mean absolute flip-rate error of 2L and 3L, the share of cells where the
    noise check passes (``noise_in_band``) and the median ``noise_energy_ratio``. Over all
    the family's cells, ordered from the least to the most perturbing
    (``relative_error_energy``), the strength of the first cell where

    * ``breaks_at``: the measured flip rate leaves the 3L band;
    * ``noise_breaks_at``: the 2L flip rate leaves the 3L band (the error model fails as
      noise);
    * ``linear_breaks_at``: the 2L flip rate leaves the measurement's 95 % confidence
      interval (the linearization fails);

    NaN where it never happens.
    """
    t = comparison.table
    if not len(t):
        return pd.DataFrame()
    tol_of = 0.5 / t["n_eval"].astype(float)
    t = t.assign(
        _in=t["L3L_flip_rate_in_band"].astype(float),
        _lin_ok=(
            (t["L2L_flip_rate"] >= t["measured_flip_rate_low"] - tol_of)
            & (t["L2L_flip_rate"] <= t["measured_flip_rate_high"] + tol_of)
        ),
    )
    rows = []
    for (model, layers, family), g in t.groupby(["model", "layers", "family"], sort=False):
        g = g.sort_values("relative_error_energy", kind="stable")
        ok = g[g["measured_flip_rate"] <= max_flip_rate]

        def first(mask: pd.Series, g=g) -> float:
            hit = g.loc[mask.to_numpy(), "strength"]
            return float(hit.iloc[0]) if len(hit) else float("nan")

        nib = g["noise_in_band"].astype(float)
        rows.append({
            "model": model, "layers": layers, "family": family, "cells": len(g),
            "cells_used": len(ok), "max_flip_rate": float(max_flip_rate),
            "band_coverage": float(ok["_in"].mean()) if len(ok) else np.nan,
            "L2L_flip_rate_abs_error": float(ok["L2L_flip_rate_abs_error"].mean())
            if len(ok) else np.nan,
            "L3L_flip_rate_abs_error": float(ok["L3L_flip_rate_abs_error"].mean())
            if len(ok) else np.nan,
            "noise_in_band_share": float(ok["noise_in_band"].astype(float).mean())
            if len(ok) else np.nan,
            "noise_energy_ratio_median": float(ok["noise_energy_ratio"].median())
            if len(ok) else np.nan,
            "breaks_at": first(g["_in"] == 0.0),
            "noise_breaks_at": first(nib == 0.0),
            "linear_breaks_at": first(~g["_lin_ok"]),
        })  # fmt: skip
    return pd.DataFrame(rows)


#: The families of :func:`compression_grid` (the study of issue 13), in its order.
COMPRESSION_FAMILIES: tuple[str, ...] = (
    "prune-layer", "prune-global", "prune-2:4", "prune-filter", "svd-energy", "kmeans",
    "power", "log2", "nf4", "rex-o1", "rex-o2", "rex-o3", "prune50+uniform4",
)  # fmt: skip


def compression_grid(
    model: Any, names: Sequence[str], families: Sequence[str] | None = None
) -> list[tuple[str, float, Any]]:
    """The (family, strength, compressor) configurations of the compression study.

    * ``prune-layer`` / ``prune-global``: unstructured magnitude pruning, sparsity 0.1..0.9,
      per layer or one global ranking;
    * ``prune-2:4``: 2:4 along the input dimension, on every layer whose rows have a multiple
      of 4 entries (the others stay float);
    * ``prune-filter``: output channels by L1 norm, 0.1..0.5 of the filters of every layer;
    * ``svd-energy``: truncated SVD keeping 0.3..0.9, 0.95, 0.99 of the energy;
    * ``kmeans``: weight sharing with 4..64 clusters per layer;
    * ``power`` / ``log2``: non-uniform grids per channel, 3..8 bits; ``nf4``: 4 bits;
    * ``rex-o<K>``: residual expansion of order K = 1..3 with 2..4-bit per-channel terms;
    * ``prune50+uniform4``: 50 % unstructured pruning, then 4-bit symmetric rounding.

    Parameters
    ----------
    model : torch.nn.Module
        The float network (to see which layers 2:4 fits).
    names : sequence of str
        The compressed layers.
    families : sequence of str, optional
        Only these (default all of :data:`COMPRESSION_FAMILIES`).
    """
    from distortion.compressors import (
        Compose,
        KMeansQuantizer,
        LowRank,
        MagnitudePruner,
        NonUniformQuantizer,
        ResidualExpansion,
    )
    from distortion.experiments.models import get_layer
    from distortion.quantize import UniformQuantizer

    wanted = COMPRESSION_FAMILIES if families is None else tuple(families)
    unknown = [f for f in wanted if f not in COMPRESSION_FAMILIES]
    if unknown or not wanted:
        raise ValueError(f"unknown compression families {unknown}; choose from "
                         f"{', '.join(COMPRESSION_FAMILIES)}")  # fmt: skip
    sparsity = [round(0.1 * i, 1) for i in range(1, 10)]
    out: list[tuple[str, float, Any]] = []
    out += [("prune-layer", s, MagnitudePruner(s)) for s in sparsity]
    out += [("prune-global", s, MagnitudePruner(s, scope="global")) for s in sparsity]
    if "prune-2:4" in wanted:
        nm = MagnitudePruner(None, pattern="n:m", n=2, m=4)
        fits = {k: nm for k in names
                if int(np.prod(get_layer(model, k).weight.shape[1:])) % 4 == 0}  # fmt: skip
        out.append(("prune-2:4", 0.5, fits))
    out += [("prune-filter", s, MagnitudePruner(s, pattern="filter"))
            for s in (0.1, 0.2, 0.3, 0.4, 0.5)]  # fmt: skip
    out += [("svd-energy", e, LowRank(energy=e))
            for e in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)]  # fmt: skip
    out += [("kmeans", k, KMeansQuantizer(k)) for k in (4, 8, 16, 32, 64)]
    for g in ("power", "log2"):
        out += [(g, b, NonUniformQuantizer(b, grid=g, granularity="channel")) for b in range(3, 9)]
    out.append(("nf4", 4, NonUniformQuantizer(4, grid="nf4", granularity="channel")))
    for order in (1, 2, 3):
        out += [(f"rex-o{order}", b, ResidualExpansion(b, order=order, granularity="channel"))
                for b in (2, 3, 4)]  # fmt: skip
    out.append(("prune50+uniform4", 0.5, Compose(MagnitudePruner(0.5), UniformQuantizer(4))))
    return [c for c in out if c[0] in wanted]
