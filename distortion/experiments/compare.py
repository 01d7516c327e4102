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
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from distortion.experiments.measure import measure_last_layer
from distortion.quantize import UniformQuantizer

__all__ = [
    "Comparison",
    "compare_all_layers",
    "compare_last_layer",
    "first_order_actual_flips",
    "quantizer_grid",
]


def quantizer_grid(
    bits: Sequence[int],
    *,
    granularity: Sequence[str] = ("tensor", "channel"),
    scheme: str = "symmetric",
    clipping: str = "max",
    rounding: str = "nearest",
) -> list[UniformQuantizer]:
    """Every quantizer of the grid bits × granularity (other settings fixed)."""
    return [
        UniformQuantizer(int(b), scheme=scheme, granularity=g, clipping=clipping, rounding=rounding)
        for g in granularity
        for b in bits
    ]


#: Columns every comparison table has (more may follow).
KEY_COLUMNS = (
    "model", "problem", "layers", "n_classes", "bits", "scheme", "granularity", "clipping",
    "rounding",
)  # fmt: skip


@dataclass(frozen=True)
class Comparison:
    """Predicted and measured quantities, one row per cell.

    Attributes
    ----------
    table : DataFrame
        One row per cell: the key columns (:data:`KEY_COLUMNS`), then for each level
        ``L{1,2,3}_flip``, ``L{1,2,3}_loss`` and ``L3_flip_lo/hi``, ``L3_loss_lo/hi`` (band
        for one realization), the measurement ``measured_flip``, ``measured_flip_lo/hi``,
        ``measured_loss``, ``measured_loss_lo/hi``, the baselines, and per level the absolute
        errors ``L*_flip_abs_error``, ``L*_loss_abs_error`` and ``L3_flip_in_band``.
    """

    table: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """A copy of the table."""
        return self.table.copy()

    def summary(self, split_bits: int | None = None) -> pd.DataFrame:
        """Aggregates per model × problem × layer set × granularity (× bit range).

        Mean absolute error of the flip rate and loss of each level, the fraction of cells
        whose measured flip rate is inside the level-3 band, and the number of cells.

        Parameters
        ----------
        split_bits : int, optional
            Also split the cells into bit-widths below ``split_bits`` and from it on (column
            ``bits``, e.g. ``"2-3"`` and ``"4-8"``): first-order models are meant for the
            upper range, and one range must not hide the other.
        """
        t = self.table
        groups = ["model", "problem", "layers", "granularity"]
        if split_bits is not None and len(t):
            t = t.assign(bit_range=np.where(t["bits"] < split_bits, 0, 1))
            groups.append("bit_range")
        err_cols = [c for c in t.columns if c.endswith("_abs_error")]
        agg = {c: "mean" for c in err_cols}
        if "L3_flip_in_band" in t:
            agg["L3_flip_in_band"] = "mean"
        agg["cells"] = ("bits", "count")
        named = {k: (k, v) if isinstance(v, str) else v for k, v in agg.items()}
        if split_bits is not None and len(t):
            named["bits_min"], named["bits_max"] = ("bits", "min"), ("bits", "max")
        out = t.groupby(groups, sort=False).agg(**named).reset_index()
        if "bits_min" in out:
            lo, hi = out.pop("bits_min").astype(int), out.pop("bits_max").astype(int)
            out["bits"] = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(lo, hi, strict=True)]
            out = out.drop(columns="bit_range")
        return out

    @classmethod
    def concat(cls, parts: Sequence[Comparison]) -> Comparison:
        """One comparison from several (rows stacked)."""
        frames = [p.table for p in parts if len(p.table)]
        return cls(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())

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
        return cls(pd.read_csv(p))


def _rows_of(feature_set: Any, classes: Sequence[str] | None) -> np.ndarray:
    names = list(feature_set.class_names)
    if classes is None:
        return np.arange(len(names))
    missing = [c for c in classes if c not in names]
    if missing:
        raise ValueError(f"unknown class(es) {missing}; the model's classes are {names}")
    return np.array([names.index(c) for c in classes])


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
    levels : sequence of int
        Which of the levels 1, 2, 3 to compute (the measurement is always made).

    Returns
    -------
    Comparison
    """
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
    out = []
    for i, q in enumerate(quantizers):
        qt = q.quantize(W)
        step = qt.step if qt.step.ndim == 0 else qt.step[rows]
        W_hat = np.asarray(qt.values, dtype=np.float64)[rows]
        row: dict[str, Any] = {
            "model": model_name,
            "problem": problem,
            "layers": "last",
            "n_classes": len(rows),
            "bits": q.bits,
            "scheme": q.scheme,
            "granularity": q.granularity,
            "clipping": q.clipping,
            "rounding": q.rounding,
            "n_fit": len(fit_s.labels),
            "n_eval": len(y_ev),
            "step_mean": float(np.mean(step)),
        }
        m = measure_last_layer(
            SimpleNamespace(features=x_ev, labels=y_ev, W=W, b=b), q, rows=rows, seed=seed
        )
        row.update(
            measured_flip=m.flip_rate, measured_flip_lo=m.flip_ci[0], measured_flip_hi=m.flip_ci[1],
            measured_loss=m.loss, measured_loss_lo=m.loss_ci[0], measured_loss_hi=m.loss_ci[1],
            accuracy_float=m.accuracy_float, measured_accuracy=m.accuracy,
        )  # fmt: skip
        if 1 in levels:
            l1 = multiclass_distortion(gm, Wk, bk, step=step, method=method, seed=seed + i)
            row.update(L1_flip=l1.flip_rate, L1_loss=l1.accuracy_loss,
                       L1_accuracy_float=l1.accuracy_float)  # fmt: skip
        if 2 in levels:
            l2 = multiclass_distortion_actual(gm, Wk, bk, W_hat, method=method, seed=seed + i)
            row.update(L2_flip=l2.flip_rate, L2_loss=l2.accuracy_loss)
        if 3 in levels:
            l3 = semiparametric_distortion(
                x_ev, Wk, bk, step=step, labels=y_ev, n_realizations=n_realizations,
                seed=seed + i,
            )  # fmt: skip
            fb, lb = l3.flip_band(), l3.accuracy_loss_band()
            row.update(
                L3_flip=l3.flip_rate, L3_flip_lo=fb.low, L3_flip_hi=fb.high,
                L3_loss=l3.accuracy_loss, L3_loss_lo=lb.low, L3_loss_hi=lb.high,
                L3_flip_in_band=bool(fb.low <= m.flip_rate <= fb.high),
                L3_loss_in_band=bool(lb.low <= m.loss <= lb.high),
            )  # fmt: skip
        row["sakr_flip_bound"] = _sakr_last_layer(x_ev, Wk, bk, step)
        row["hawq_v2"] = _hawq_last_layer(x_ev, Wk, bk, qt.error[rows])
        for lv in (1, 2, 3):
            if f"L{lv}_flip" in row:
                row[f"L{lv}_flip_abs_error"] = abs(row[f"L{lv}_flip"] - m.flip_rate)
                row[f"L{lv}_loss_abs_error"] = abs(row[f"L{lv}_loss"] - m.loss)
        row["sakr_flip_abs_error"] = abs(min(row["sakr_flip_bound"], 1.0) - m.flip_rate)
        out.append(row)
    return Comparison(pd.DataFrame(out))


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


def _sakr_last_layer(x: np.ndarray, W: np.ndarray, b: np.ndarray, step: Any) -> float:
    """Sakr et al.'s flip-probability bound for the last layer alone (eq. BL4)."""
    from distortion.theory.baselines import sakr_bound

    return sakr_bound(_last_layer_grams(x, W, b), [step]).bound


def _hawq_last_layer(x: np.ndarray, W: np.ndarray, b: np.ndarray, error: np.ndarray) -> float:
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
    return float(hawq_v2_sensitivity(trace, [float(np.sum(error**2))]).omega[0])


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
    model: Any, data: Any, quantized: dict[str, Any], *, batch_size: int = 250
) -> tuple[np.ndarray, np.ndarray]:
    r"""Logits of the network linearized in its weights, moved by the actual error.

    :math:`z(x) + \sum_\ell J_\ell(x)\,\mathrm{vec}(E_\ell)` with :math:`E_\ell` the actual
    quantization error of each layer — one forward-mode (JVP) pass. Compared with the
    first-order model under H_U (level 3) it isolates the uniform-error hypothesis; compared
    with the measurement it isolates the linearization.

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

    zs, dzs = [], []
    with torch.no_grad():
        for x, _ in data.batches(batch_size):
            z, dz = jvp(lambda p, x=x: f(p, x), (params,), (tangents,))
            zs.append(z.double().numpy())
            dzs.append(dz.double().numpy())
    z = np.concatenate(zs)
    return z, z + np.concatenate(dzs)


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
        Gradient Grams and Hessian traces are cached there.
    n_realizations : int
        Error realizations cached with the Grams, for the level-3 band.
    hessian_draws : int
        Rademacher draws of the Hutchinson trace (HAWQ-V2).
    hessian_n : int
        Images of the Hutchinson trace (the first ones of ``data``); each draw costs a
        double back-propagation over them, the dominant cost of this function otherwise.
    seed : int
    progress : bool

    Returns
    -------
    Comparison
        Level 3 is the first-order model under H_U (:func:`multilayer_distortion`);
        "level 2" here is the same linearization moved by the actual error
        (:func:`first_order_actual_flips`), so L2 vs L3 isolates H_U and L2 vs measured the
        linearization; level 1 (Gaussian features) does not apply to inner layers (NaN).
    """
    from distortion.experiments.measure import measure, predict_logits
    from distortion.experiments.models import get_layer
    from distortion.experiments.sensitivity import gradient_grams, hessian_trace
    from distortion.theory.baselines import hawq_v2_sensitivity, sakr_bound
    from distortion.theory.multilayer import multilayer_distortion

    need_channel = any(q.granularity == "channel" for q in quantizers)
    grams = gradient_grams(
        model, data, layers=layers, granularity="channel" if need_channel else "tensor",
        n_realizations=n_realizations, seed=seed, cache_dir=cache_dir, progress=progress,
    )  # fmt: skip
    names = list(grams.layer_names)
    trace = hessian_trace(
        model, _first_images(data, hessian_n), layers=names, n_draws=hessian_draws, seed=seed,
        cache_dir=cache_dir, progress=progress,
    )  # fmt: skip
    logits = predict_logits(model, data, progress=progress, desc="float")
    labels = np.asarray(data.labels)
    pred = logits.argmax(axis=1)
    out = []
    for q in quantizers:
        qt = {n: q.quantize(get_layer(model, n).weight.detach()) for n in names}
        steps = [qt[n].step for n in names]
        variances = [s**2 / 12.0 for s in steps]
        m = measure(model, data, q, layers=names, reference_logits=logits, progress=progress)
        l3 = multilayer_distortion(grams, variances, seed=seed)
        fb, lb = l3.flip_band(), l3.accuracy_loss_band()
        _, z_lin = first_order_actual_flips(model, data, qt)
        pred_lin = z_lin.argmax(axis=1)
        sakr = sakr_bound(grams, steps)
        hawq = hawq_v2_sensitivity(trace, [float(np.sum(qt[n].error ** 2)) for n in names])
        row = {
            "model": model_name, "problem": "10-class" if logits.shape[1] == 10 else
            f"{logits.shape[1]}-class", "layers": "all", "n_classes": logits.shape[1],
            "bits": q.bits, "scheme": q.scheme, "granularity": q.granularity,
            "clipping": q.clipping, "rounding": q.rounding, "n_fit": 0, "n_eval": len(labels),
            "step_mean": float(np.mean([np.mean(s) for s in steps])),
            "measured_flip": m.flip_rate, "measured_flip_lo": m.flip_ci[0],
            "measured_flip_hi": m.flip_ci[1], "measured_loss": m.loss,
            "measured_loss_lo": m.loss_ci[0], "measured_loss_hi": m.loss_ci[1],
            "accuracy_float": m.accuracy_float, "measured_accuracy": m.accuracy,
            "L1_flip": np.nan, "L1_loss": np.nan,
            "L2_flip": float(np.mean(pred_lin != pred)),
            "L2_loss": float(np.mean(pred == labels) - np.mean(pred_lin == labels)),
            "L3_flip": l3.flip_rate, "L3_flip_lo": fb.low, "L3_flip_hi": fb.high,
            "L3_loss": l3.accuracy_loss, "L3_loss_lo": lb.low, "L3_loss_hi": lb.high,
            "L3_flip_in_band": bool(fb.low <= m.flip_rate <= fb.high),
            "L3_loss_in_band": bool(lb.low <= m.loss <= lb.high),
            "sakr_flip_bound": sakr.bound, "hawq_v2": hawq.total(),
        }  # fmt: skip
        for lv in (2, 3):
            row[f"L{lv}_flip_abs_error"] = abs(row[f"L{lv}_flip"] - m.flip_rate)
            row[f"L{lv}_loss_abs_error"] = abs(row[f"L{lv}_loss"] - m.loss)
        row["L1_flip_abs_error"] = row["L1_loss_abs_error"] = np.nan
        row["sakr_flip_abs_error"] = abs(min(sakr.bound, 1.0) - m.flip_rate)
        out.append(row)
    return Comparison(pd.DataFrame(out))
