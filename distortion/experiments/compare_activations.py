r"""Weights and activations quantized together (W+A) and the real int8 model: predicted
against measured, with the weight / activation split of every cell.

One function, :func:`compare_activations`, serves the study script
(``experiments/activations_study.py``), the ``[activations]`` stage of ``distortion run``
(``experiments/activations.toml``) and the tests. For one float model, calibration images and
evaluation images (disjoint: checked by content), it

1. converts the model to the real int8 model of each backend named (torch.ao FX,
   :func:`~distortion.experiments.activation_grams.int8_reference`), measures float -> int8
   flips and accuracy loss, and predicts them from the float model: weight Grams of the fused
   model and activation Grams at the observers' points (``theory/activations.md`` eq.
   A9-A13), with the band of one realization;
2. for every cell ``(w, a, granularity)`` of a simulated grid (weights ``w`` bits per channel,
   the inputs of every convolution and linear layer ``a`` bits, unsigned min-max affine grids
   per tensor or per channel), measures the fake-quantized network and predicts it (level
   3L, and level 2A: the actual activation error of the float network, linearized, eq. A14);
3. splits every prediction into weight layers and activation points
   (:func:`~distortion.experiments.activation_grams.weight_activation_split`).

Nothing is fitted on the evaluation images. Torch is imported where models run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ACTIVATION_COLUMNS", "ActivationStudy", "DEFAULT_GRID", "compare_activations"]

#: The simulated grid of the issue: (weight bits, activation bits).
DEFAULT_GRID: tuple[tuple[int, int], ...] = ((8, 8), (6, 6), (4, 8), (8, 4), (4, 4))

#: Columns of :attr:`ActivationStudy.table`.
ACTIVATION_COLUMNS: dict[str, str] = {
    "model": "network",
    "cell": "'int8 <backend>' (the real converted model) or 'W<w>A<a> <granularity>'",
    "weight_bits": "bits of the weights (per channel)",
    "activation_bits": "bits of the activations",
    "granularity": "activation scales per 'tensor' or per 'channel' (int8: the backend's)",
    "n": "evaluation images",
    "measured_flips": "images whose decision changed (level 4)",
    "measured_flip_rate": "measured_flips / n",
    "measured_flip_ci_low": "Clopper-Pearson 95 % interval of the flip rate, lower end",
    "measured_flip_ci_high": "its upper end",
    "measured_loss": "measured accuracy loss (float minus quantized top-1)",
    "predicted_flip_rate": "level 3L: first-order W+A prediction (eq. A12)",
    "band_low": "lower end of the 95 % band of one realization (eq. A13)",
    "band_high": "upper end of that band",
    "in_band": "measured_flip_rate inside [band_low, band_high]",
    "predicted_loss": "predicted accuracy loss",
    "weights_alone": "predicted flip rate with the weights alone quantized",
    "activations_alone": "predicted flip rate with the activations alone quantized",
    "activation_noise_share": "share of the logit noise energy that the activations carry",
    "L2A_flip_rate": "level 2A: the float network's actual activation error, linearized (A14)",
    "L2A_in_band": "measured flip rate inside the level-2A band",
    "L3NA_flip_rate": "level 3N for the activations: the error model of eq. A5 drawn in the real "
    "nonlinear network (zeros kept, clipping, uniform errors), mean over the dither runs",
    "L3NA_flip_rate_sd": "standard deviation of that flip rate over the dither runs",
    "simulated_flips": "int8 rows: flips of the toolkit's fake-quantized copy of the int8 grids",
    "points": "activation rounding points",
}


@dataclass(frozen=True)
class ActivationStudy:
    """The cells of :func:`compare_activations` and their weight / activation splits.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per cell (:data:`ACTIVATION_COLUMNS`).
    splits : dict of str to WeightActivationSplit
        Keyed ``"<model> <cell>"``.
    """

    table: pd.DataFrame = field(repr=False)
    splits: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    @staticmethod
    def concat(parts: Sequence[ActivationStudy]) -> ActivationStudy:
        if not parts:
            raise ValueError("nothing to concatenate: pass at least one ActivationStudy")
        splits: dict[str, Any] = {}
        for p in parts:
            splits.update(p.splits)
        return ActivationStudy(pd.concat([p.table for p in parts], ignore_index=True), splits)

    def coverage(self, max_flip_rate: float = 0.20) -> tuple[float, list[str]]:
        """Share of the cells with measured flip rate <= ``max_flip_rate`` whose measurement
        lies in the band, and the names of those that miss."""
        small = self.table[self.table["measured_flip_rate"] <= max_flip_rate]
        if small.empty:
            return float("nan"), []
        miss = small.loc[~small["in_band"].astype(bool)]
        return float(small["in_band"].mean()), (miss["model"] + " " + miss["cell"]).tolist()

    def summary(self) -> str:
        """The printed table: one line per cell, rates in %."""
        t = self.table
        rows = pd.DataFrame({
            "model": t["model"], "cell": t["cell"], "n": t["n"], "flips": t["measured_flips"],
            "measured %": 100 * t["measured_flip_rate"],
            "predicted %": 100 * t["predicted_flip_rate"],
            "band %": [f"[{100 * lo:.2f}, {100 * hi:.2f}]"
                       for lo, hi in zip(t["band_low"], t["band_high"], strict=True)],
            "in band": np.where(t["in_band"], "yes", "NO"),
            "weights %": 100 * t["weights_alone"], "activations %": 100 * t["activations_alone"],
            "L2A %": 100 * t["L2A_flip_rate"],
        })  # fmt: skip
        if t["L3NA_flip_rate"].notna().any():
            rows["3N-A %"] = 100 * t["L3NA_flip_rate"]
        cov, miss = self.coverage()
        text = rows.to_string(index=False, float_format=lambda v: f"{v:.2f}")
        return (
            f"{text}\nband coverage over the cells with measured flip rate <= 20 %: {cov:.3f}"
            f"; misses: {', '.join(miss) or 'none'}"
        )

    def save(self, out: str | Path, *, figures: bool = True) -> Path:
        """Write ``activations.csv``, one ``activations_split_<model>_<cell>.json`` per cell,
        ``activations_summary.txt`` and (``figures``) the split figures; return the folder."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(out / "activations.csv", index=False)
        (out / "activations_summary.txt").write_text(self.summary() + "\n")
        for key, split in self.splits.items():
            stem = "activations_split_" + key.replace(" ", "_")
            (out / f"{stem}.json").write_text(json.dumps(split.to_dict(), indent=1))
            if figures:
                import matplotlib

                matplotlib.use("agg", force=False)
                import matplotlib.pyplot as plt

                from distortion.plotting.activations import plot_weight_activation_split

                ax = plot_weight_activation_split(split)
                ax.set_title(key)
                ax.figure.savefig(out / f"{stem}.pdf", bbox_inches="tight")
                plt.close(ax.figure)
        return out


def _row(model: str, cell: str, meas: Any, pred: Any, split: Any, **extra: Any) -> dict:
    fb = pred.flip_band()
    acts = split.parts[split.parts["kind"] == "activations"]
    return {
        "model": model, "cell": cell, "n": meas.n_samples, "measured_flips": meas.flips,
        "measured_flip_rate": meas.flip_rate, "measured_flip_ci_low": meas.flip_ci[0],
        "measured_flip_ci_high": meas.flip_ci[1], "measured_loss": meas.accuracy_loss,
        "predicted_flip_rate": pred.flip_rate, "band_low": fb.low, "band_high": fb.high,
        "in_band": bool(fb.low <= meas.flip_rate <= fb.high),
        "predicted_loss": pred.accuracy_loss, "weights_alone": split.weights_flip_rate,
        "activations_alone": split.activations_flip_rate,
        "activation_noise_share": float(acts["noise_share"].sum()),
    } | extra  # fmt: skip


def _check_grid(grid: Any, granularities: Any) -> tuple[list[tuple[int, int]], list[str]]:
    cells = []
    for item in grid:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"grid cells are (weight bits, activation bits) pairs, got {item!r}")
        w, a = item
        for what, b in (("weight", w), ("activation", a)):
            if isinstance(b, bool) or not isinstance(b, int | np.integer) or not 2 <= b <= 16:
                raise ValueError(f"{what} bits must be an integer in 2..16, got {b!r} in {item}")
        cells.append((int(w), int(a)))
    grans = [granularities] if isinstance(granularities, str) else list(granularities)
    for g in grans:
        if g not in ("tensor", "channel"):
            raise ValueError(f"activation granularity must be 'tensor' or 'channel', got {g!r}")
    return cells, grans


def compare_activations(
    model: Any,
    calibration: Any,
    evaluation: Any,
    *,
    model_name: str = "model",
    grid: Sequence[tuple[int, int]] = DEFAULT_GRID,
    granularities: Sequence[str] = ("tensor", "channel"),
    int8_backends: Sequence[str] = ("x86",),
    n_realizations: int = 40,
    n_dither: int = 0,
    seed: int = 0,
    cache_dir: Any = None,
    progress: bool = True,
) -> ActivationStudy:
    r"""Predicted against measured flips of W+A cells and of real int8 models (see module).

    Parameters
    ----------
    model : torch.nn.Module
        The float classifier (not modified).
    calibration, evaluation : ImageDataset or (x, y)
        Calibration images (activation ranges, int8 observers) and evaluation images; they
        must not share an image (:func:`~distortion.experiments.activation_grams.
        check_disjoint`).
    model_name : str
    grid : sequence of (weight bits, activation bits)
        Simulated cells (weights per channel, symmetric, max range; empty: none).
    granularities : sequence of {"tensor", "channel"}
        Activation scales of the simulated cells.
    int8_backends : sequence of str
        torch.ao backends whose real int8 model is measured and predicted (empty: none).
    n_realizations : int
        Cached weight realizations behind the bands.
    n_dither : int
        Runs of level 3N for the activations per grid cell (0: none): the activation error
        model drawn in the real network, the weights rounded as measured. 3N against the
        measurement tests the error model, the first order against 3N the linearization.
    seed : int
    cache_dir : path, optional
        Where the weight and activation Grams are cached.
    progress : bool

    Returns
    -------
    ActivationStudy
    """
    from distortion.activations import ActivationQuantizer
    from distortion.estimator import AccuracyLossEstimator
    from distortion.experiments.activation_grams import (
        activation_grams,
        check_disjoint,
        int8_reference,
        measure_quantized,
    )
    from distortion.experiments.activations import calibrate_activations
    from distortion.experiments.sensitivity import gradient_grams
    from distortion.quantize import UniformQuantizer
    from distortion.theory.multilayer import multilayer_distortion

    cells, grans = _check_grid(grid, granularities)
    backends = [int8_backends] if isinstance(int8_backends, str) else list(int8_backends)
    if not cells and not backends:
        raise ValueError("nothing to compare: give grid cells or int8 backends")
    check_disjoint(calibration, evaluation)
    rows, splits = [], {}
    gkw = {"n_realizations": n_realizations, "seed": seed, "cache_dir": cache_dir,
           "progress": progress}  # fmt: skip
    for backend in backends:
        ref = int8_reference(model, calibration, backend)
        m8 = measure_quantized(ref.fused, evaluation, int8_model=ref.int8,
                               config=f"int8 {backend}", progress=progress)  # fmt: skip
        sim = measure_quantized(
            ref.fused, evaluation, weights=ref.weight_quantizer, layers=list(ref.layers),
            activations=ref.qparams, where="output", config="simulated", progress=progress,
        )  # fmt: skip
        wg = gradient_grams(ref.fused, evaluation, layers=list(ref.layers),
                            granularity="channel", **gkw)  # fmt: skip
        ag = activation_grams(ref.fused, evaluation, {"int8": ref.qparams}, where="output",
                              cache_dir=cache_dir, progress=progress)["int8"]  # fmt: skip
        est = AccuracyLossEstimator(quantizer=ref.weight_quantizer, seed=seed).fit_grams(wg)
        pred = est.predict_allocation(dict.fromkeys(wg.layer_names, 8), activations=ag)
        split = est.weight_activation_split(8, ag)
        cell = f"int8 {backend}"
        splits[f"{model_name} {cell}"] = split
        rows.append(_row(model_name, cell, m8, pred, split, weight_bits=8, activation_bits=8,
                         granularity=backend, simulated_flips=sim.flips,
                         points=len(ref.qparams)))  # fmt: skip
    if cells:
        cfgs = {}
        for ab in sorted({a for _, a in cells}, reverse=True):
            for g in grans:
                q = ActivationQuantizer(ab, granularity=g)
                cfgs[f"A{ab} {g}"] = calibrate_activations(model, calibration, "all", q,
                                                           n_images=len(calibration), seed=seed)
        wg = gradient_grams(model, evaluation, layers="all", granularity="channel", **gkw)
        ags = activation_grams(model, evaluation, cfgs, where="input", cache_dir=cache_dir,
                               progress=progress)  # fmt: skip
        est = AccuracyLossEstimator(quantizer=UniformQuantizer(8, granularity="channel"),
                                    seed=seed).fit_grams(wg)  # fmt: skip
        for wb, ab in cells:
            wq = UniformQuantizer(wb, granularity="channel")
            alloc = dict.fromkeys(wg.layer_names, wb)
            v = est._variances(np.full(wg.n_layers, wb), wq)  # level 2A's weight term
            for g in grans:
                c = f"A{ab} {g}"
                meas = measure_quantized(model, evaluation, weights=wq, layers="all",
                                         activations=cfgs[c].qparams, where="input",
                                         config=f"W{wb}A{ab} {g}", progress=progress)  # fmt: skip
                pred = est.predict_allocation(alloc, quantizer=wq, activations=ags[c])
                p2 = multilayer_distortion(wg, v, shift=ags[c].actual_shift(), seed=seed)
                b2 = p2.flip_band()
                dith = [
                    measure_quantized(model, evaluation, weights=wq, layers="all",
                                      activations=cfgs[c].qparams, where="input",
                                      activation_error="dither", seed=seed + 7919 * r,
                                      progress=False).flip_rate
                    for r in range(n_dither)
                ]  # fmt: skip
                split = est.weight_activation_split(wb, ags[c], quantizer=wq)
                cell = f"W{wb}A{ab} {g}"
                splits[f"{model_name} {cell}"] = split
                rows.append(_row(
                    model_name, cell, meas, pred, split, weight_bits=wb, activation_bits=ab,
                    granularity=g, L2A_flip_rate=p2.flip_rate,
                    L2A_in_band=bool(b2.low <= meas.flip_rate <= b2.high),
                    L3NA_flip_rate=float(np.mean(dith)) if dith else np.nan,
                    L3NA_flip_rate_sd=float(np.std(dith, ddof=1)) if n_dither > 1 else np.nan,
                    points=len(ags[c].point_names),
                ))  # fmt: skip
    table = pd.DataFrame(rows)
    for col in ACTIVATION_COLUMNS:
        if col not in table:
            table[col] = np.nan
    return ActivationStudy(table[list(ACTIVATION_COLUMNS)], splits)
