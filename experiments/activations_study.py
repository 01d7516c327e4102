"""Activation quantization study: W+A grid and the real int8 model, predicted vs measured.

For ResNet-20 and ResNet-56 on CIFAR-10, with 500 calibration images from the fit half of the
default split and ``--n`` evaluation images from the evaluation half (disjoint):

1. the real int8 model of torch.ao FX (x86 backend: quint8 [0, 127] activations with
   HistogramObserver, per-channel symmetric qint8 weights) — measured float -> int8 flips and
   accuracy loss, the toolkit's fake-quantized simulation of the same grids, and the
   prediction from the float model (level 3L: weight Grams of the fused model + activation
   Grams at the observer points, ``theory/activations.md`` eq. A9-A13) with its band and the
   weight / activation split;
2. a simulated W+A grid (W8A8, W6A6, W4A8, W8A4, W4A4; weights per channel, activations per
   tensor and per channel at the input of every convolution and linear layer, unsigned affine
   min-max grids): measured (fake quantization) against predicted.

Nothing is tuned on the evaluation images. Writes ``activations_<model>.csv`` and
``activations_split_<model>.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "results" / "activations"
GRID = [(8, 8), (6, 6), (4, 8), (8, 4), (4, 4)]


def split_images(n_eval: int, n_cal: int = 500):
    """(calibration, evaluation) images: the first ``n_cal`` of the fit half and the first
    ``n_eval`` of the evaluation half of the default experiment's stratified split."""
    from distortion.experiments import _paths
    from distortion.experiments.data import load_dataset
    from distortion.experiments.pipeline import fit_evaluate_mask, select_images

    ds = load_dataset(str(_paths.shared_dir() / "data" / "cifar10" / "test.npz"))
    fit = fit_evaluate_mask(ds.labels, len(ds.class_names), 0.5, 0)
    cal = select_images(ds, np.flatnonzero(fit)[:n_cal], f"cal:{n_cal}")
    ev = select_images(ds, np.flatnonzero(~fit)[:n_eval], f"eval:{n_eval}")
    return cal, ev


def _row(model, cell, meas, pred, extra=None) -> dict:
    fb = pred.flip_band()
    d = {
        "model": model, "cell": cell, "n": meas.n_samples, "measured_flips": meas.flips,
        "measured_flip_rate": meas.flip_rate, "measured_loss": meas.accuracy_loss,
        "predicted_flip_rate": pred.flip_rate, "band_low": fb.low, "band_high": fb.high,
        "in_band": bool(fb.low <= meas.flip_rate <= fb.high),
        "predicted_loss": pred.accuracy_loss,
    }  # fmt: skip
    d.update(extra or {})
    return d


def run_model(name: str, cal, ev, out: Path, cache_dir, progress: bool) -> pd.DataFrame:
    from distortion.activations import ActivationQuantizer
    from distortion.estimator import AccuracyLossEstimator
    from distortion.experiments.activation_grams import (
        activation_grams,
        int8_reference,
        measure_quantized,
        weight_activation_split,
    )
    from distortion.experiments.activations import calibrate_activations
    from distortion.experiments.models import load_model
    from distortion.experiments.sensitivity import gradient_grams
    from distortion.quantize import UniformQuantizer
    from distortion.theory.multilayer import multilayer_distortion

    rows = []
    model = load_model(name)
    # -- 1. the real int8 model ---------------------------------------------------------
    t0 = time.perf_counter()
    ref = int8_reference(model, cal, "x86")
    m8 = measure_quantized(ref.fused, ev, int8_model=ref.int8, config="int8 x86")
    sim = measure_quantized(
        ref.fused, ev, weights=ref.weight_quantizer, layers=list(ref.layers),
        activations=ref.qparams, where="output", config="simulated",
    )  # fmt: skip
    tw = time.perf_counter()
    wg = gradient_grams(ref.fused, ev, layers=list(ref.layers), granularity="channel",
                        cache_dir=cache_dir, progress=progress)  # fmt: skip
    tw = time.perf_counter() - tw
    ta = time.perf_counter()
    ag = activation_grams(ref.fused, ev, {"int8": ref.qparams}, where="output",
                          cache_dir=cache_dir, progress=progress)["int8"]  # fmt: skip
    ta = time.perf_counter() - ta
    est = AccuracyLossEstimator(quantizer=ref.weight_quantizer).fit_grams(wg)
    alloc = dict.fromkeys(wg.layer_names, 8)
    pred = est.predict_allocation(alloc, quantizer=ref.weight_quantizer, activations=ag)
    v = est._variances(np.full(wg.n_layers, 8), ref.weight_quantizer)
    split = weight_activation_split(wg, v, ag)
    print(f"\n== {name}: real int8 (torch.ao FX, x86), {len(ref.qparams)} rounding points "
          f"({len(ref.exact_points)} exact), {len(ref.layers)} layers, {m8.n_samples} images")
    print(f"measured int8: {m8.flips} flips ({m8.flip_rate:.4f}, CI {m8.flip_ci[0]:.4f}-"
          f"{m8.flip_ci[1]:.4f}), accuracy loss {m8.accuracy_loss:+.4f}; toolkit simulation "
          f"{sim.flips} flips")
    fb = pred.flip_band()
    print(f"predicted: {pred.flip_rate:.4f} band [{fb.low:.4f}, {fb.high:.4f}] -> "
          f"{'IN' if fb.low <= m8.flip_rate <= fb.high else 'OUT'}; accuracy loss "
          f"{pred.accuracy_loss:+.4f}; weights alone {split.weights_flip_rate:.4f}, "
          f"activations alone {split.activations_flip_rate:.4f}")
    print(f"one-time cost: weight Grams {tw:.1f} s, activation Grams {ta:.1f} s "
          f"(ratio {ta / tw:.2f}; cached runs read both from disk)")
    top = split.parts.sort_values("noise_share", ascending=False).head(8).copy()
    top["rounds"] = [ref.sources.get(n, n) for n in top["name"]]
    print(top.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    rows.append(_row(name, "int8 x86", m8, pred, {"simulated_flips": sim.flips,
                     "weights_alone": split.weights_flip_rate,
                     "activations_alone": split.activations_flip_rate}))  # fmt: skip
    (out / f"activations_split_{name}.json").write_text(json.dumps(split.to_dict(), indent=1))
    import matplotlib

    matplotlib.use("agg")
    from distortion.plotting.activations import plot_weight_activation_split

    ax = plot_weight_activation_split(split)
    ax.figure.savefig(out / f"activations_split_{name}.pdf", bbox_inches="tight")
    print(f"({time.perf_counter() - t0:.0f} s)")
    # -- 2. the simulated W+A grid -------------------------------------------------------
    t0 = time.perf_counter()
    cfgs = {}
    for ab in sorted({a for _, a in GRID}, reverse=True):
        for gran in ("tensor", "channel"):
            q = ActivationQuantizer(ab, granularity=gran)
            cfgs[f"A{ab} {gran}"] = calibrate_activations(model, cal, "all", q, n_images=len(cal))
    wg2 = gradient_grams(model, ev, layers="all", granularity="channel", cache_dir=cache_dir,
                         progress=progress)  # fmt: skip
    ags = activation_grams(model, ev, cfgs, where="input", cache_dir=cache_dir, progress=progress)
    est2 = AccuracyLossEstimator(quantizer=UniformQuantizer(8, granularity="channel"))
    est2.fit_grams(wg2)
    for wb, ab in GRID:
        wq = UniformQuantizer(wb, granularity="channel")
        for gran in ("tensor", "channel"):
            c = f"A{ab} {gran}"
            meas = measure_quantized(model, ev, weights=wq, layers="all",
                                     activations=cfgs[c].qparams, where="input")  # fmt: skip
            p = est2.predict_allocation(dict.fromkeys(wg2.layer_names, wb), quantizer=wq,
                                        activations=ags[c])  # fmt: skip
            # level 2 for the activations: their actual error, linearized (eq. A14)
            v2 = est2._variances(np.full(wg2.n_layers, wb), wq)
            p2 = multilayer_distortion(wg2, v2, shift=ags[c].actual_shift(), seed=est2.seed)
            b2 = p2.flip_band()
            rows.append(_row(name, f"W{wb}A{ab} {gran}", meas, p, {
                "L2A_flip_rate": p2.flip_rate, "L2A_low": b2.low, "L2A_high": b2.high,
                "L2A_in_band": bool(b2.low <= meas.flip_rate <= b2.high),
            }))  # fmt: skip
    print(f"\n== {name}: simulated W+A grid ({time.perf_counter() - t0:.0f} s)")
    t = pd.DataFrame(rows)
    print(t.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    t.to_csv(out / f"activations_{name}.csv", index=False)
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--n", type=int, default=2000, help="evaluation images (default 2000)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    cal, ev = split_images(args.n)
    from distortion.experiments.activation_grams import check_disjoint

    check_disjoint(cal, ev)  # calibration and evaluation images never overlap
    args.out.mkdir(parents=True, exist_ok=True)
    frames = [run_model(m, cal, ev, args.out, args.cache_dir, args.progress) for m in args.models]
    t = pd.concat(frames)
    small = t[t["measured_flip_rate"] <= 0.20]
    miss = small.loc[~small["in_band"]]
    names = ", ".join(miss["model"] + " " + miss["cell"]) or "none"
    print(f"\nband coverage over the {len(small)} cells with measured flip rate <= 20 %: "
          f"{small['in_band'].mean():.3f}; misses: {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
