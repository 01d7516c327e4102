r"""Predicted versus measured accuracy loss and flip rate, cell by cell.

A *cell* is one model × problem × layer set × quantizer × bit-width. For each cell the four
levels of prediction of ARCHITECTURE.md stand beside the measurement and the baselines:

- level 1 — Gaussian features, uniform error (H_G + H_U):
  :func:`~distortion.theory.multiclass.multiclass_distortion`;
- level 2 — Gaussian features, the actual error Q(W) − W:
  :func:`~distortion.theory.multiclass.multiclass_distortion_actual`;
- level 3 — empirical features, uniform error:
  :func:`~distortion.theory.multiclass.semiparametric_distortion` (last layer), the
  first-order gradient model of :mod:`distortion.theory.multilayer` (all layers);
- level 4 — measured: :func:`~distortion.experiments.measure.measure_last_layer`,
  :func:`~distortion.experiments.measure.measure`.

The Gaussian model is fitted on one part of the images (``fit``) and everything else is
evaluated on the other (``evaluate``), so that the level-1/2 predictions are not judged on the
data they were fitted to. Per cell the table holds the absolute error of each level's flip rate
and accuracy loss against the measurement, and whether the measured flip rate lies in the
level-3 95 % band for one realization of the error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from distortion.compression import error_second_moment, realization_seed
from distortion.quantize import UniformQuantizer
from distortion.results import Prediction, resolution_tolerance

__all__ = [
    "COLUMN_DICTIONARY",
    "Comparison",
    "ComparisonCell",
    "compare_all_layers",
    "compare_last_layer",
    "first_order_actual_flips",
    "linearized_prediction",
    "quantizer_grid",
]


def quantizer_grid(
    bits: Sequence[int],
    *,
    granularity: Sequence[str] = ("tensor", "channel"),
    scheme: str = "symmetric",
    clipping: str = "max",
    rounding: str = "nearest",
    symmetric_range: str = "narrow",
    clip_ratio: float = 1.0,
) -> list[UniformQuantizer]:
    """Every quantizer of the grid bits × granularity (other settings fixed)."""
    return [
        UniformQuantizer(
            int(b), scheme=scheme, granularity=g, clipping=clipping, rounding=rounding,
            symmetric_range=symmetric_range, clip_ratio=clip_ratio,
        )  # fmt: skip
        for g in granularity
        for b in bits
    ]


#: Columns every comparison table has (more may follow).
KEY_COLUMNS = (
    "model", "problem", "layers", "n_classes", "bits", "scheme", "granularity", "clipping",
    "rounding",
)  # fmt: skip

#: The predictions of a last-layer cell and of an all-layer cell, by column prefix.
LAST_LAYER_LEVELS = {
    "L1": "level 1: Gaussian features (H_G), the error model (H_U for rounding)",
    "L2": "level 2: Gaussian features (H_G), the actual error Q(W) - W",
    "L3": "level 3: the empirical features, the error model (H_U for rounding)",
}
ALL_LAYER_LEVELS = {
    "L2L": "level 2L: the network linearized in its weights, moved by the actual error",
    "L3L": "level 3L: the same first-order model with the error model (H_U for rounding)",
    "L3N": "level 3N: the real network with errors drawn from the error model (subtractive "
    "dither with the real steps, exact H_U), over R seeded realizations",
    "L3I": "level 3L with each layer's second moment inflated by the noise its input carries "
    "from the layers before it (the cross-layer term E_l n_l, theory/multilayer.md eq. L25)",
    "L3S": "level 3L moved by the moment-propagated mean of the logits: the network whose "
    "ReLUs are smoothed by the noise each one sees, minus the float network "
    "(theory/multilayer.md eq. L31)",
}
#: Levels run only on request, whose band coverage the summary reports beside the default's.
OPTIONAL_BAND_LEVELS = ("L3I", "L3S", "L3N")
#: The prediction whose band the summary's coverage column reports, per layer set.
BAND_LEVEL = {"last": "L3", "all": "L3L"}  # any other layer set (several layers, or
# bias-corrected ones) is predicted by the all-layer model: L3L

_QUANTITIES = {
    "flip_rate": "expected flip rate (fraction of changed decisions)",
    "flip_rate_stderr": "standard error of the computation of flip_rate (0 when exact)",
    "flip_rate_low": "lower end of the 95 % band of the flip rate of one realization",
    "flip_rate_high": "upper end of that band",
    "accuracy_loss": "expected accuracy loss (float accuracy minus compressed accuracy)",
    "accuracy_loss_stderr": "standard error of the computation of accuracy_loss",
    "accuracy_loss_low": "lower end of the 95 % band of the accuracy loss of one realization",
    "accuracy_loss_high": "upper end of that band",
    "flip_rate_abs_error": "|predicted - measured| flip rate",
    "accuracy_loss_abs_error": "|predicted - measured| accuracy loss",
    "flip_rate_in_band": "measured flip rate inside the band (to the resolution 1/n_eval)",
    "accuracy_loss_in_band": "measured accuracy loss inside the band (resolution 1/n_eval)",
}

#: What every column of a comparison table means (written to the results folder).
COLUMN_DICTIONARY: dict[str, str] = {
    "model": "network name",
    "problem": "classification problem (10-class, or a sub-problem such as cat-vs-dog)",
    "layers": "'last' (last layer quantized), 'all' (every quantizable layer) or 'all, "
    "bias-corrected' (every layer, each bias shifted by its mean output error, eq. L22)",
    "bias_correction": "whether the quantized network's biases were corrected (eq. L22; "
    "all-layer cells only)",
    "n_classes": "number of classes of the problem",
    "bits": "bit-width (integer) of every quantized layer",
    "scheme": "quantizer scheme (symmetric / asymmetric)",
    "granularity": "one step per tensor or per output channel",
    "clipping": "clipping rule of the quantizer (max / mse)",
    "rounding": "rounding of the quantizer (nearest / stochastic / dither)",
    "n_fit": "images the Gaussian model was fitted on (0 where none is fitted)",
    "n_eval": "images everything else is evaluated on",
    "step_mean": "mean quantization step over layers (and channels)",
    "error_second_moment_mean": "mean of the error model's E[e^2] over layers (and channels)",
    "measured_flip_rate": "measured flip rate (level 4), mean over realizations",
    "measured_flip_rate_stderr": "its standard error",
    "measured_flip_rate_low": "lower end of its 95 % confidence interval",
    "measured_flip_rate_high": "upper end of that interval",
    "measured_accuracy_loss": "measured accuracy loss (level 4)",
    "measured_accuracy_loss_stderr": "its standard error",
    "measured_accuracy_loss_low": "lower end of its 95 % confidence interval",
    "measured_accuracy_loss_high": "upper end of that interval",
    "accuracy_float": "accuracy of the float network on the evaluation images",
    "measured_accuracy": "accuracy of the quantized network on the evaluation images",
    "sakr_flip_rate_bound": "Sakr et al.'s flip-rate bound, clipped at 1 per image",
    "sakr_flip_rate_bound_raw": "Sakr et al.'s bound as published (may exceed 1)",
    "sakr_vacuous": "whether the published bound is >= 1 (says nothing)",
    "sakr_flip_rate_abs_error": "|clipped Sakr bound - measured flip rate|",
    "hawq_v2": "HAWQ-V2 sensitivity (sum over layers of Tr(H)/n * ||Q(W) - W||^2)",
    "hawq_v2_stderr": "its standard error (Hutchinson draws; 0 when the trace is exact)",
    **{
        f"{p}_{q}": f"{desc}: {qd}"
        for levels in (LAST_LAYER_LEVELS, ALL_LAYER_LEVELS)
        for p, desc in levels.items()
        for q, qd in _QUANTITIES.items()
    },
}


@dataclass(frozen=True)
class ComparisonCell:
    """One cell: the predictions of each level and the measurement of one configuration.

    Attributes
    ----------
    key : dict
        The key columns (:data:`KEY_COLUMNS`) and the cell's sizes.
    measurement : Measurement
    predictions : dict of str to Prediction
        By column prefix (``"L1"``, ``"L2"``, ``"L3"`` or ``"L2L"``, ``"L3L"``).
    sakr : SakrBound or None
    hawq : HawqSensitivity or None
    """

    key: dict[str, Any]
    measurement: Any
    predictions: dict[str, Prediction]
    sakr: Any = None
    hawq: Any = None

    def row(self) -> dict[str, Any]:
        """The cell as one table row (columns of :data:`COLUMN_DICTIONARY`)."""
        m = self.measurement
        n = int(self.key["n_eval"])
        tol = resolution_tolerance(n)
        fi, li = m.flip_rate_interval, m.accuracy_loss_interval
        row = dict(self.key)
        row.update(
            measured_flip_rate=m.flip_rate, measured_flip_rate_stderr=m.flip_rate_stderr,
            measured_flip_rate_low=fi.low, measured_flip_rate_high=fi.high,
            measured_accuracy_loss=m.accuracy_loss,
            measured_accuracy_loss_stderr=m.accuracy_loss_stderr,
            measured_accuracy_loss_low=li.low, measured_accuracy_loss_high=li.high,
            accuracy_float=m.accuracy_float, measured_accuracy=m.accuracy,
        )  # fmt: skip
        levels = LAST_LAYER_LEVELS if self.key["layers"] == "last" else ALL_LAYER_LEVELS
        for prefix in levels:
            p = self.predictions.get(prefix)
            if p is None:
                row.update({f"{prefix}_{q}": np.nan for q in _QUANTITIES})
                continue
            row.update(p.as_dict(prefix=f"{prefix}_"))
            row[f"{prefix}_flip_rate_abs_error"] = abs(p.flip_rate - m.flip_rate)
            row[f"{prefix}_accuracy_loss_abs_error"] = abs(p.accuracy_loss - m.accuracy_loss)
            fb, lb = p.flip_rate_band, p.accuracy_loss_band
            row[f"{prefix}_flip_rate_in_band"] = (
                fb.contains(m.flip_rate, tol=tol) if np.isfinite(fb.low) else np.nan
            )
            row[f"{prefix}_accuracy_loss_in_band"] = (
                lb.contains(m.accuracy_loss, tol=tol) if np.isfinite(lb.low) else np.nan
            )
        if self.sakr is not None:
            bound = float(self.sakr.bound_clipped)
            row.update(
                sakr_flip_rate_bound=bound, sakr_flip_rate_bound_raw=float(self.sakr.bound),
                sakr_vacuous=bool(self.sakr.bound >= 1.0),
                sakr_flip_rate_abs_error=abs(bound - m.flip_rate),
            )  # fmt: skip
        if self.hawq is not None:
            row["hawq_v2"] = float(self.hawq.total())
            stderr = getattr(self.hawq, "total_stderr", None)
            row["hawq_v2_stderr"] = float(stderr()) if callable(stderr) else np.nan
        return row


@dataclass(frozen=True)
class Comparison:
    """Predicted and measured quantities, one row per cell.

    Attributes
    ----------
    table : DataFrame
        One row per cell (:meth:`ComparisonCell.row`): the key columns
        (:data:`KEY_COLUMNS`), the measurement (``measured_*``), per prediction level
        ``<prefix>_<quantity>`` with the prefixes of :data:`LAST_LAYER_LEVELS` (last-layer
        rows) or :data:`ALL_LAYER_LEVELS` (all-layer rows) — a prefix means one thing
        everywhere — and the baselines; :data:`COLUMN_DICTIONARY` says what each is.
    cells : tuple of ComparisonCell
        The objects the table was built from (empty after :meth:`load`).
    """

    table: pd.DataFrame
    cells: tuple[ComparisonCell, ...] = field(default=(), repr=False)

    @classmethod
    def from_cells(cls, cells: Sequence[ComparisonCell]) -> Comparison:
        """The table of these cells, one row each."""
        cells = tuple(cells)
        table = pd.DataFrame([c.row() for c in cells])
        if len(table):
            table["bits"] = table["bits"].astype(int)
        return cls(table, cells)

    def to_frame(self) -> pd.DataFrame:
        """A copy of the table."""
        return self.table.copy()

    def summary(self, split_bits: int | None = None) -> pd.DataFrame:
        """Aggregates per model × problem × layer set × granularity (× bit range).

        Mean absolute error of the flip rate and accuracy loss of each level and of Sakr's
        (clipped) bound, the share of cells where that bound is vacuous, the fraction of
        cells whose measured flip rate lies inside the band of the layer set's level-3
        prediction (``band_coverage``: L3 for the last layer, L3L for all layers), the same
        for levels L3I, L3S and L3N where they were run (``band_coverage_L3I``,
        ``band_coverage_L3S``, ``band_coverage_L3N``), and the number of cells.
        The bit range is given by the integer columns ``bits_min`` and ``bits_max``.

        Parameters
        ----------
        split_bits : int, optional
            Also split the cells into bit-widths below ``split_bits`` and from it on:
            first-order models are meant for the upper range, and one range must not hide
            the other.
        """
        t = self.table
        if not len(t):
            return pd.DataFrame()
        groups = ["model", "problem", "layers", "granularity"]
        extra = {
            f"band_coverage_{lvl}": t[f"{lvl}_flip_rate_in_band"].astype(float)
            for lvl in OPTIONAL_BAND_LEVELS
            if f"{lvl}_flip_rate_in_band" in t  # NaN in the cells it was not run for
        }
        t = t.assign(
            bit_range=0 if split_bits is None else np.where(t["bits"] < split_bits, 0, 1),
            band_coverage=[
                row.get(f"{BAND_LEVEL.get(row['layers'], 'L3L')}_flip_rate_in_band", np.nan)
                for row in t.to_dict("records")
            ],
            **extra,
        )
        t["band_coverage"] = t["band_coverage"].astype(float)
        err_cols = [c for c in t.columns if c.endswith("_abs_error")]
        named: dict[str, Any] = {c: (c, "mean") for c in err_cols}
        named["band_coverage"] = ("band_coverage", "mean")
        for col in extra:
            named[col] = (col, "mean")
        if "sakr_vacuous" in t:
            t["sakr_vacuous"] = t["sakr_vacuous"].astype(float)
            named["sakr_vacuous_share"] = ("sakr_vacuous", "mean")
        named["cells"] = ("bits", "count")
        named["bits_min"], named["bits_max"] = ("bits", "min"), ("bits", "max")
        out = t.groupby([*groups, "bit_range"], sort=False).agg(**named).reset_index()
        out["bits_min"] = out["bits_min"].astype(int)
        out["bits_max"] = out["bits_max"].astype(int)
        return out.drop(columns="bit_range")

    @classmethod
    def concat(cls, parts: Sequence[Comparison]) -> Comparison:
        """One comparison from several (rows stacked)."""
        frames = [p.table for p in parts if len(p.table)]
        cells = tuple(c for p in parts for c in p.cells)
        return cls(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), cells)

    def save(self, directory: str | Path, *, name: str = "comparison") -> dict[str, Path]:
        """Write ``<name>.csv``, ``<name>_summary.csv`` and ``<name>.json`` (records)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {
            "csv": d / f"{name}.csv",
            "summary": d / f"{name}_summary.csv",
            "json": d / f"{name}.json",
        }
        self.table.to_csv(paths["csv"], index=False)
        self.summary().to_csv(paths["summary"], index=False)
        paths["json"].write_text(
            json.dumps(json.loads(self.table.to_json(orient="records")), indent=1)
        )
        return paths

    @classmethod
    def load(cls, path: str | Path) -> Comparison:
        """Read a table written by :meth:`save` (the CSV file)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no comparison table at {p}: run `distortion run` first")
        t = pd.read_csv(p)
        if "measured_flip" in t and "measured_flip_rate" not in t:
            raise ValueError(
                f"{p} was written by an older version (column 'measured_flip'); rerun "
                "`distortion run` (the caches make it fast)"
            )
        return cls(t)


def _rows_of(feature_set: Any, classes: Sequence[str] | None) -> np.ndarray:
    names = list(feature_set.class_names)
    if classes is None:
        return np.arange(len(names))
    missing = [c for c in classes if c not in names]
    if missing:
        raise ValueError(f"unknown class(es) {missing}; the model's classes are {names}")
    return np.array([names.index(c) for c in classes])


def _cached_measurement(cache_dir: Any, key: dict[str, Any], compute) -> Any:
    """A measurement from the cache under its content key, else computed and stored."""
    if cache_dir is None:
        return compute()
    from distortion.experiments import _cache

    return _cache.cached_json(
        cache_dir, "measurements", _cache.content_key(key), compute,
        encode=_encode_measurement, decode=_decode_measurement,
    )  # fmt: skip


def _encode_measurement(m: Any) -> dict[str, Any]:
    from distortion.experiments.measure import measurement_to_dict

    return measurement_to_dict(m)


def _decode_measurement(d: dict[str, Any]) -> Any:
    from distortion.experiments.measure import measurement_from_dict

    return measurement_from_dict(d)


def compare_last_layer(
    fit: Any,
    evaluate: Any,
    quantizers: Sequence[UniformQuantizer],
    *,
    model_name: str = "",
    problem: str = "all",
    classes: Sequence[str] | None = None,
    covariance: str = "class",
    n_realizations: int = 400,
    seed: int = 0,
    levels: Sequence[int] = (1, 2, 3),
    error_rule: str = "uniform",
) -> Comparison:
    r"""Compare the levels of prediction with the measurement for the last layer alone.

    Parameters
    ----------
    fit, evaluate : FeatureSet
        Features of disjoint images (see ``FeatureSet.split``), all classes: the Gaussian
        model is fitted on ``fit``; level 3 and the measurement use ``evaluate``.
    quantizers : sequence of UniformQuantizer
        One cell per quantizer. The whole layer ``W`` (K, d) is quantized, as the network's
        would be, then restricted to ``classes``.
    model_name, problem : str
        Labels of the rows.
    classes : sequence of str, optional
        A sub-problem (e.g. ``["cat", "dog"]``): only images of these classes, decided by
        the argmax of their logits.
    covariance : {"class", "pooled"}
        Covariance of the Gaussian model (Ledoit–Wolf shrinkage).
    n_realizations : int
        Simulated error realizations behind the level-3 band.
    seed : int
        The run's seed: the realization of the actual error (the measurement's first one,
        so level 2 and the baselines see the error that was measured), the Monte Carlo and
        the simulated realizations are all derived from it.
    levels : sequence of int
        Which of the levels 1, 2, 3 to compute (the measurement is always made).
    error_rule : {"uniform", "empirical"}
        The second moment levels 1 and 3 use: the quantizer's error model, or the actual
        mean square (:func:`distortion.compression.error_second_moment`).

    Returns
    -------
    Comparison
    """
    from distortion.experiments.measure import measure_last_layer
    from distortion.theory.gaussian import GaussianModel
    from distortion.theory.multiclass import (
        multiclass_distortion,
        multiclass_distortion_actual,
        semiparametric_distortion,
    )

    rows = _rows_of(fit, classes)
    fit_s = fit if classes is None else fit.subset(classes=list(classes))
    ev_s = evaluate if classes is None else evaluate.subset(classes=list(classes))
    W = np.asarray(fit.W, dtype=np.float64)
    b = np.asarray(fit.b, dtype=np.float64)
    Wk, bk = W[rows], b[rows]
    x_ev = np.asarray(ev_s.features, dtype=np.float64)
    y_ev = np.asarray(ev_s.labels)
    gm = GaussianModel.fit(fit_s.features, fit_s.labels, covariance=covariance)
    # Orthant probabilities are exact but cost seconds per cell for K = 10; the seeded logit
    # Monte Carlo (200 000 draws, standard error ~ 3e-4 on a 2 % flip rate) is 20x faster.
    method = "orthant" if len(rows) == 2 else "montecarlo"
    cells = []
    for i, q in enumerate(quantizers):
        # the measurement's first realization (measure_last_layer draws seed + r)
        c = q.compress(W, seed=seed)
        qt = c.detail
        step = qt.step if qt.step.ndim == 0 else qt.step[rows]
        m2 = error_second_moment(c, error_rule)
        m2 = m2 if np.ndim(m2) == 0 else m2[rows]
        W_hat = np.asarray(qt.values, dtype=np.float64)[rows]
        key: dict[str, Any] = {
            "model": model_name,
            "problem": problem,
            "layers": "last",
            "n_classes": len(rows),
            "bits": int(q.bits),
            "scheme": q.labels()["scheme"],
            "granularity": q.granularity,
            "clipping": q.labels()["clipping"],
            "rounding": q.rounding,
            "n_fit": len(fit_s.labels),
            "n_eval": len(y_ev),
            "step_mean": float(np.mean(step)),
            "error_second_moment_mean": float(np.mean(m2)),
        }
        m = measure_last_layer(
            SimpleNamespace(features=x_ev, labels=y_ev, W=W, b=b), q, rows=rows, seed=seed
        )
        preds: dict[str, Prediction] = {}
        cell_seed = seed + i  # each cell its own stream of the run's seed
        if 1 in levels:
            l1 = multiclass_distortion(gm, Wk, bk, variance=m2, method=method, seed=cell_seed)
            preds["L1"] = l1.to_prediction()
        if 2 in levels:
            l2 = multiclass_distortion_actual(gm, Wk, bk, W_hat, method=method, seed=cell_seed)
            preds["L2"] = l2.to_prediction()
        if 3 in levels:
            l3 = semiparametric_distortion(
                x_ev, Wk, bk, variance=m2, labels=y_ev, n_realizations=n_realizations,
                seed=cell_seed,
            )  # fmt: skip
            preds["L3"] = l3.to_prediction()
        sakr = _sakr_last_layer(x_ev, Wk, bk, m2)
        hawq = _hawq_last_layer(x_ev, Wk, bk, c.error[rows])
        cells.append(ComparisonCell(key, m, preds, sakr, hawq))
    return Comparison.from_cells(cells)


def _last_layer_grams(x: np.ndarray, W: np.ndarray, b: np.ndarray):
    r"""Gradient Grams of a linear last layer, in closed form.

    For :math:`z = Wx + b`, :math:`\partial z_k/\partial W_{cm} = \delta_{kc} x_m`, so the
    Gram of the whole layer is :math:`\|x\|^2 I_K` and that of output channel (row) ``c`` is
    :math:`\|x\|^2 e_c e_c^\top` (theory/multilayer.md, eq. L3).
    """
    from distortion.theory.multilayer import GradientGrams

    n, k = x.shape[0], W.shape[0]
    sq = np.einsum("ij,ij->i", x, x)
    grams = sq[:, None, None, None] * np.eye(k)[None, None]
    iu = np.triu_indices(k)
    channel = np.zeros((n, k, iu[0].size), dtype=np.float32)
    for c in range(k):
        channel[:, c, np.flatnonzero((iu[0] == c) & (iu[1] == c))[0]] = sq
    return GradientGrams(
        layer_names=("last",), layer_kinds=("linear",), weight_shapes=(W.shape,),
        logits=x @ W.T + b, grams=grams, channel_grams=channel,
    )  # fmt: skip


def _sakr_last_layer(x: np.ndarray, W: np.ndarray, b: np.ndarray, variance: Any):
    """Sakr et al.'s flip-rate bound for the last layer alone (eq. BL4), a SakrBound."""
    from distortion.theory.baselines import sakr_bound

    return sakr_bound(_last_layer_grams(x, W, b), variances=[variance])


def _hawq_last_layer(x: np.ndarray, W: np.ndarray, b: np.ndarray, error: np.ndarray):
    r"""HAWQ-V2's sensitivity of the last layer, with its Hessian trace in closed form.

    The cross-entropy Hessian with respect to ``W`` is
    :math:`(\operatorname{diag}(p) - pp^\top) \otimes xx^\top`, whose trace is
    :math:`\|x\|^2 \sum_k p_k(1 - p_k)`; its mean over the samples replaces the Hutchinson
    estimate (eq. BL6) exactly.
    """
    from distortion.theory.baselines import HessianTrace, hawq_v2_sensitivity

    z = x @ W.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    tr = float(np.mean(np.einsum("ij,ij->i", x, x) * np.sum(p * (1 - p), axis=1)))
    # two identical "draws": the trace is exact, its standard error 0
    trace = HessianTrace(("last",), np.array([W.size]), np.array([[tr], [tr]]), len(x))
    return hawq_v2_sensitivity(trace, [float(np.sum(error**2))])


def _first_images(data: Any, n: int) -> Any:
    """The first ``n`` images of an in-memory ImageDataset (all of them if fewer)."""
    if len(data) <= n or getattr(data, "images", None) is None:
        return data
    from distortion.experiments.data import ImageDataset

    return ImageDataset.from_arrays(
        data.images[:n], data.labels[:n], class_names=data.class_names,
        preprocessing=data.preprocessing, name=f"{data.dataset_id}[:{n}]",
    )  # fmt: skip


def first_order_actual_flips(
    model: Any,
    data: Any,
    quantized: dict[str, Any],
    *,
    batch_size: int = 250,
    bias_correction: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Logits of the network linearized in its weights, moved by the actual error.

    :math:`z(x) + \sum_\ell J_\ell(x)\,\mathrm{vec}(E_\ell)` with :math:`E_\ell` the actual
    quantization error of each layer — one forward-mode (JVP) pass. Compared with the
    first-order model under H_U (level 3) it isolates the uniform-error hypothesis; compared
    with the measurement it isolates the linearization.

    With ``bias_correction`` (an :class:`~distortion.experiments.bias_correction.InputMeans`)
    each layer's output also moves by :math:`-E_\ell \bar u_\ell` (eq. L22), linear in the
    error: the tangent of the bias-corrected network.

    Returns
    -------
    z, z_lin : arrays of shape (n_samples, K)
        Float logits and linearized quantized logits.
    """
    import torch
    from torch.func import functional_call, jvp

    from distortion.experiments.models import get_layer

    model = model.eval()
    params = {f"{name}.weight": get_layer(model, name).weight.detach() for name in quantized}
    tangents = {
        f"{name}.weight": torch.as_tensor(q.error, dtype=params[f"{name}.weight"].dtype)
        for name, q in quantized.items()
    }

    def f(p, x):
        return functional_call(model, p, (x,))

    handles = []
    if bias_correction is not None:
        from distortion.experiments.bias_correction import corrected_output

        for name in quantized:
            w0 = params[f"{name}.weight"]
            m = torch.as_tensor(bias_correction.mean(name), dtype=w0.dtype)
            handles.append(get_layer(model, name).register_forward_hook(
                lambda mod, args, out, w0=w0, m=m: corrected_output(out, mod.weight, w0, m)
            ))  # fmt: skip
    zs, dzs = [], []
    try:
        with torch.no_grad():
            for x, _ in data.batches(batch_size):
                z, dz = jvp(lambda p, x=x: f(p, x), (params,), (tangents,))
                zs.append(z.double().numpy())
                dzs.append(dz.double().numpy())
    finally:
        for h in handles:
            h.remove()
    z = np.concatenate(zs)
    return z, z + np.concatenate(dzs)


def _dither_reference(
    model, data, q, names, logits, repeats, seed, cache_dir, data_key, progress,
    bias_correction=None,
) -> Prediction:  # fmt: skip
    """Level 3N of one cell of the study (cached): see :func:`dithered_prediction`."""
    if isinstance(repeats, bool) or not isinstance(repeats, int | np.integer) or repeats < 2:
        raise ValueError(f"n_dither_realizations must be 0 or an integer >= 2, got {repeats!r}")
    dq = replace(q, rounding="dither")
    dseed = realization_seed(seed, 3, q.bits)
    m = _cached_measurement(
        cache_dir,
        {**data_key, "quantizer": repr(dq), "seed": dseed, "repeats": int(repeats), "kind": "3N",
         **_bc_key(bias_correction)},
        lambda: _dither_measurement(
            model, data, dq, names, logits, repeats, dseed, progress, bias_correction
        ),
    )  # fmt: skip
    return _dither_prediction(m, int(repeats), 0.95)


def _dither_measurement(model, data, quantizer, layers, logits, repeats, seed, progress, bc):
    from distortion.experiments.measure import measure

    return measure(
        model, data, quantizer, layers=layers, reference_logits=logits, repeats=int(repeats),
        seed=seed, progress=progress, bias_correction=bc,
    )  # fmt: skip


def _dither_prediction(m: Any, repeats: int, coverage: float) -> Prediction:
    """The Prediction of level 3N from the measurement of ``repeats`` dithered networks: the
    mean over them, and the order-statistic band of their counts (eq. L15)."""
    from distortion.theory._bands import order_statistic_band

    n = int(m.n)
    flips = np.rint(np.asarray(m.flip_rates) * n)
    losses = m.accuracy_float - np.asarray(m.accuracies)
    return Prediction(
        level="3N", flip_rate=m.flip_rate, flip_rate_stderr=m.flip_rate_stderr,
        flip_rate_band=order_statistic_band(flips, n, coverage), accuracy_loss=m.accuracy_loss,
        accuracy_loss_stderr=m.accuracy_loss_stderr,
        accuracy_loss_band=order_statistic_band(np.rint(losses * n), n, coverage),
        accuracy_float=m.accuracy_float, accuracy_compressed=m.accuracy, n_samples=n,
        coverage=coverage, method=f"dither x {int(repeats)}",
    )  # fmt: skip


def dithered_prediction(
    model: Any,
    data: Any,
    quantizer: Any,
    *,
    layers: str | Sequence[str] = "all",
    repeats: int = 40,
    seed: int = 0,
    coverage: float = 0.95,
    reference_logits: np.ndarray | None = None,
    progress: bool = True,
    bias_correction: Any = None,
) -> Prediction:
    r"""Level 3N: ``repeats`` networks whose every quantized layer carries a subtractive-dither
    error of its real step, run through the real (nonlinear) network.

    Under subtractive dither the error is exactly uniform and independent of the weights
    (H_U holds by construction, ``theory/error_models.md``), so the mean flip rate of these
    networks is the prediction of the error model with nothing linearized, and the order
    statistics of their flip counts are a band for one more realization (eq. L15) that is
    calibrated by construction. At 2-3 bits it is the band to read beside level 3S, whose own
    band is too narrow there (``theory/multilayer.md`` §17); its cost is ``repeats`` forward
    passes over ``data``.

    Parameters
    ----------
    model : torch.nn.Module
        The float network (not modified).
    data
        Labelled samples (as :func:`~distortion.experiments.measure.measure` takes them).
    quantizer : UniformQuantizer or dict of layer name to UniformQuantizer
        The compression whose steps the dither uses (its rounding is replaced by dither).
    layers : "all", "last" or list of str
        Ignored when ``quantizer`` is a dict.
    repeats : int
        Dithered networks; a 95 % band needs at least 39 (``min_realizations`` of eq. L15).
    seed : int
        Seed of the dither draws.
    coverage : float
        Nominal coverage of the band.
    reference_logits, progress, bias_correction
        As in :func:`~distortion.experiments.measure.measure`.

    Returns
    -------
    Prediction
        Level ``"3N"``, with ``flip_rate_band`` and ``accuracy_loss_band``.
    """
    from distortion.results import check_confidence_level
    from distortion.theory._bands import min_realizations

    coverage = check_confidence_level(coverage, "coverage")
    if isinstance(repeats, bool) or not isinstance(repeats, int | np.integer):
        raise ValueError(f"repeats must be an integer, got {repeats!r}")
    if repeats < min_realizations(coverage):
        raise ValueError(
            f"repeats={repeats} cannot give a {coverage:.0%} band: it needs at least "
            f"{min_realizations(coverage)} dithered networks"
        )
    per_layer = isinstance(quantizer, dict)
    qs = quantizer if per_layer else {None: quantizer}
    if not qs:
        raise ValueError("quantizer is an empty dict: name at least one layer")
    for q in qs.values():
        if not isinstance(q, UniformQuantizer):
            raise ValueError(
                f"quantizer must be a UniformQuantizer or a dict of them, got {type(q).__name__}"
            )
    dq = {k: replace(q, rounding="dither") for k, q in qs.items()}
    m = _dither_measurement(
        model, data, dq if per_layer else dq[None], layers, reference_logits, repeats, seed,
        progress, bias_correction,
    )  # fmt: skip
    return _dither_prediction(m, int(repeats), coverage)


def _bc_key(bias_correction: Any) -> dict[str, str]:
    """The measurement cache's key part for bias correction (nothing without it)."""
    return {} if bias_correction is None else {"bias_correction": bias_correction.key}


def linearized_prediction(
    model: Any,
    data: Any,
    errors: dict[str, Any],
    reference_predictions: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 250,
    bias_correction: Any = None,
) -> tuple[Prediction, np.ndarray]:
    r"""Level 2L: the network linearized in its weights, moved by the actual ``errors``
    (and, with ``bias_correction``, by the bias shifts that follow them, eq. L22).

    Returns the :class:`Prediction` (exact on these images: zero stderr, no band) and the
    first-order logit perturbation :math:`\sum_\ell J_\ell\,\mathrm{vec}(E_\ell)`,
    shape (n_samples, K).
    """
    z, z_lin = first_order_actual_flips(
        model, data, errors, batch_size=batch_size, bias_correction=bias_correction
    )
    pred_lin = z_lin.argmax(axis=1)
    acc_f = float(np.mean(reference_predictions == labels))
    acc_lin = float(np.mean(pred_lin == labels))
    p = Prediction(
        level="2L", flip_rate=float(np.mean(pred_lin != reference_predictions)),
        flip_rate_stderr=0.0, accuracy_loss=acc_f - acc_lin, accuracy_loss_stderr=0.0,
        accuracy_float=acc_f, accuracy_compressed=acc_lin, n_samples=len(labels),
        method="jvp",
    )  # fmt: skip
    return p, z_lin - z


def _bit_set(bits: Any, name: str) -> set[int] | None:
    """The bit-widths of an optional level's cells (None: every cell)."""
    if bits is None:
        return None
    if isinstance(bits, str | bytes) or not all(
        isinstance(b, int | np.integer) and not isinstance(b, bool) for b in bits
    ):
        raise ValueError(f"{name} must be a list of bit-widths, got {bits!r}")
    return {int(b) for b in bits}


def compare_all_layers(
    model: Any,
    data: Any,
    quantizers: Sequence[UniformQuantizer],
    *,
    model_name: str = "",
    layers: str | Sequence[str] = "all",
    cache_dir: Any = None,
    n_realizations: int = 40,
    hessian_draws: int = 8,
    hessian_n: int = 500,
    seed: int = 0,
    progress: bool = True,
    error_rule: str = "uniform",
    hessian: str = "gauss-newton",
    n_dither_realizations: int = 0,
    competitors: int | None = None,
    bias_correction: Any = None,
    input_noise_images: int = 0,
    smoothed_probes: int = 0,
    smoothed_bits: Sequence[int] | None = None,
    dither_bits: Sequence[int] | None = None,
) -> Comparison:
    r"""Compare the predictions with the measurement when every layer is quantized.

    Parameters
    ----------
    model : torch.nn.Module
        The float network.
    data : ImageDataset
        Evaluation images (labels known).
    quantizers : sequence of UniformQuantizer
        One cell per quantizer; all ``layers`` get the same bit-width.
    model_name : str
    layers : "all" or sequence of str
    cache_dir : path, optional
        Gradient Grams, Hessian traces and measurements are cached there.
    n_realizations : int
        Error realizations cached with the Grams, for the level-3L band.
    hessian : {"gauss-newton", "hutchinson"}
        How HAWQ-V2's per-layer Hessian traces are obtained: exactly from the Grams already
        computed (eq. BL7: exact for each layer's block when the network is piecewise linear
        in that layer's weights — ReLU networks with batch norm in eval mode, as here — and
        free), or by per-layer Hutchinson probing (any network; one double backward per draw
        and layer, :func:`~distortion.experiments.sensitivity.hessian_trace`).
    hessian_draws : int
        Rademacher draws of the Hutchinson trace.
    hessian_n : int
        Images of the Hutchinson trace (the first ones of ``data``).
    seed : int
        The run's seed: the realization of the actual error is the measurement's first one
        (layer ``i`` drawn with ``seed + i``), so level 2L, Sakr and HAWQ see the error that
        was measured; everything else random is derived from it too.
    progress : bool
    error_rule : {"uniform", "empirical"}
        The second moment level 3L uses (:func:`distortion.compression.error_second_moment`).
    competitors : int, optional
        Grams of the m nearest competitors only (many classes, ``theory/multilayer.md``
        eq. L17-L20); None: all K.
    bias_correction : InputMeans, optional
        Compare the bias-corrected networks (:mod:`~distortion.experiments.bias_correction`):
        measured with the corrected biases, predicted from the centred Grams (eq. L23); the
        cells carry ``bias_correction=True`` and the layer set ``"all, bias-corrected"``.
    input_noise_images : int
        Also predict level ``L3I`` (the second moments inflated by the noise at each layer's
        input, eq. L25-L26), with the ratios estimated on the first ``input_noise_images``
        evaluation images (:func:`~distortion.experiments.input_noise.input_noise`, two draws
        per layer, cached). 0: no level L3I.
    smoothed_probes : int
        Also predict level ``L3S``: level 3L moved by the moment-propagated mean of the logits
        (eq. L31, :func:`~distortion.experiments.smoothed.smoothed_shift` with this many
        forward-mode probes, two re-estimates of the noise scales, cached per quantizer).
        Not with ``bias_correction`` (the correction removes part of that mean). 0: no level
        L3S.
    smoothed_bits : sequence of int, optional
        The bit-widths whose cells get level L3S (None: every cell); its columns are NaN in
        the others.
    n_dither_realizations : int
        Also level ``L3N`` (0: none; at least 39 for its 95 % band): this many networks
        whose every layer carries a subtractive-dither error of its real step, run through
        the real network (:func:`dithered_prediction`; H_U exact, nothing linearized, its
        band calibrated by construction).
    dither_bits : sequence of int, optional
        The bit-widths whose cells get level L3N (None: every cell).

    Returns
    -------
    Comparison
        Level ``3L`` is the first-order model with the error model
        (:func:`multilayer_distortion`); level ``2L`` is the same linearization moved by the
        actual error (:func:`first_order_actual_flips`), so 2L vs 3L isolates the error
        model (H_U) and 2L vs measured the linearization. Levels 1–3 (Gaussian features of
        the last layer) do not apply to inner layers.
    """
    from distortion.experiments.measure import measure, predict_logits
    from distortion.experiments.models import get_layer
    from distortion.experiments.sensitivity import gradient_grams, hessian_trace
    from distortion.theory.baselines import gauss_newton_trace, hawq_v2_sensitivity, sakr_bound
    from distortion.theory.multilayer import multilayer_distortion

    k_noise = input_noise_images  # checked before any expensive work
    if isinstance(k_noise, bool) or not isinstance(k_noise, int | np.integer) or k_noise < 0:
        raise ValueError(f"input_noise_images must be an integer >= 0, got {k_noise!r}")
    k_sm = smoothed_probes
    if isinstance(k_sm, bool) or not isinstance(k_sm, int | np.integer) or k_sm < 0 or k_sm == 1:
        raise ValueError(f"smoothed_probes must be 0 or an integer >= 2, got {k_sm!r}")
    if k_sm and bias_correction is not None:
        raise ValueError(
            "smoothed_probes (level L3S) predicts the uncorrected network: the bias correction "
            "removes part of the mean it models; pass smoothed_probes=0 with bias_correction"
        )
    smoothed_bits = _bit_set(smoothed_bits, "smoothed_bits")
    dither_bits = _bit_set(dither_bits, "dither_bits")
    need_channel = any(q.granularity == "channel" for q in quantizers)
    grams = gradient_grams(
        model, data, layers=layers, granularity="channel" if need_channel else "tensor",
        n_realizations=n_realizations, seed=seed, cache_dir=cache_dir, progress=progress,
        competitors=competitors, input_means=bias_correction,
    )  # fmt: skip
    names = list(grams.layer_names)
    if hessian == "gauss-newton":
        trace = gauss_newton_trace(grams)
    elif hessian == "hutchinson":
        trace = hessian_trace(
            model, _first_images(data, hessian_n), layers=names, n_draws=hessian_draws,
            seed=seed, cache_dir=cache_dir, progress=progress,
        )  # fmt: skip
    else:
        raise ValueError(f"hessian must be 'gauss-newton' or 'hutchinson', got {hessian!r}")
    logits = predict_logits(model, data, progress=progress, desc="float")
    labels = np.asarray(data.labels)
    pred = logits.argmax(axis=1)
    n = len(labels)
    from distortion.experiments.sensitivity import _data_info, _model_hash

    noise = {}
    if input_noise_images:
        from distortion.experiments.input_noise import input_noise

        sub = _first_images(data, int(input_noise_images))
        for g in dict.fromkeys(q.granularity for q in quantizers):
            noise[g] = input_noise(
                model, sub, layers=names, granularity=g, bias_correction=bias_correction,
                seed=seed, cache_dir=cache_dir, progress=progress,
            )  # fmt: skip

    data_key = {"model": _model_hash(model), "data": _data_info(data)[2], "layers": names}
    cells = []
    for q in quantizers:
        # the measurement's first realization: quantize_model(seed=seed) draws layer i with
        # seed + i (nearest rounding ignores it)
        comp = {
            name: q.compress(get_layer(model, name).weight.detach(), seed=seed + i)
            for i, name in enumerate(names)
        }
        m2 = [error_second_moment(comp[name], error_rule) for name in names]
        steps = [comp[name].detail.step for name in names]
        m = _cached_measurement(
            cache_dir,
            {**data_key, "quantizer": repr(q), "seed": seed, "kind": "all-layers",
             **_bc_key(bias_correction)},
            lambda q=q: measure(
                model, data, q, layers=names, reference_logits=logits, seed=seed,
                progress=progress, bias_correction=bias_correction,
            ),
        )  # fmt: skip
        l3 = multilayer_distortion(grams, m2, seed=seed, band=grams.projections is not None)
        l2, _ = linearized_prediction(model, data, {k: c.detail for k, c in comp.items()},
                                      pred, labels, bias_correction=bias_correction)  # fmt: skip
        sakr = sakr_bound(grams, variances=m2)
        hawq = hawq_v2_sensitivity(trace, [float(np.sum(comp[k].error ** 2)) for k in names])
        key = {
            "model": model_name, "problem": "10-class" if logits.shape[1] == 10 else
            f"{logits.shape[1]}-class", "layers": "all", "n_classes": logits.shape[1],
            "bits": int(q.bits), "scheme": q.labels()["scheme"], "granularity": q.granularity,
            "clipping": q.labels()["clipping"], "rounding": q.rounding, "n_fit": 0, "n_eval": n,
            "step_mean": float(np.mean([np.mean(s) for s in steps])),
            "error_second_moment_mean": float(np.mean([np.mean(v) for v in m2])),
        }  # fmt: skip
        key["bias_correction"] = bias_correction is not None
        if bias_correction is not None:  # its own layer set: summaries and figures apart
            key["layers"] = "all, bias-corrected"
        preds = {"L2L": l2, "L3L": l3.to_prediction()}
        if noise:
            preds["L3I"] = multilayer_distortion(
                grams, noise[q.granularity].inflate(m2), seed=seed,
                band=grams.projections is not None,
            ).to_prediction()  # fmt: skip
            preds["L3I"] = replace(preds["L3I"], level="3I")
        if smoothed_probes and (smoothed_bits is None or int(q.bits) in smoothed_bits):
            from distortion.experiments.smoothed import smoothed_shift

            shift, _ = smoothed_shift(
                model, data, dict(zip(names, m2, strict=True)), n_probes=int(smoothed_probes),
                seed=seed, cache_dir=cache_dir,
            )  # fmt: skip
            preds["L3S"] = multilayer_distortion(
                grams, m2, seed=seed, band=grams.projections is not None, shift=shift
            ).to_prediction()
            preds["L3S"] = replace(preds["L3S"], level="3S")
        if n_dither_realizations and (dither_bits is None or int(q.bits) in dither_bits):
            preds["L3N"] = _dither_reference(
                model, data, q, names, logits, n_dither_realizations, seed, cache_dir,
                data_key, progress, bias_correction,
            )  # fmt: skip
        cells.append(ComparisonCell(key, m, preds, sakr, hawq))
    return Comparison.from_cells(cells)
