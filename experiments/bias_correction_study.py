"""Issue 16: all layers at 2-4 bits, with and without empirical bias correction.

For each model, granularity and bit-width (symmetric max-range rounding of every layer), on
the first ``--n`` evaluation images of the default study's split, with the first
``--calibration`` images of its fit half as calibration set (disjoint):

* the plain network: measured flip rate, 2L (actual error, linearized), 3L (first order under
  H_U) and its band; and what the actual error's parts do (``theory/multilayer.md`` section 16):
  ``offsets`` (only the per-channel mean errors E u_bar, as biases, through the real network),
  ``hybrid`` (offsets through the real network plus the centred error linearized at the float
  point) and ``hybrid@offset`` (the centred error linearized at the offset network); ``share``
  columns are the fraction of the 2L miss (measured - 2L) each closes;
* the bias-corrected network (eq. L22): measured, 2L and 3L from the centred Grams (eq. L23),
  with the band;
* for both, level 3I: 3L with each layer's second moment inflated by the noise at its input
  (eq. L25-L26), the ratios estimated on the first ``--noise-images`` evaluation images;
* with ``--dither R``, for both: R subtractive-dither quantizations of every layer (H_U exact,
  level 3N) through the real network, their mean flip rate, and the share of them inside the
  3L and 3I bands (``dither_in_*``): the bands' calibration against the linearization alone.

    python experiments/bias_correction_study.py --models resnet20 resnet56 --n 500

Prints one table per model and writes ``bias_correction_study.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _flip(z: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(z.argmax(axis=1) != ref))


def _band(p) -> str:
    return f"[{p.flip_rate_band.low:.3f}, {p.flip_rate_band.high:.3f}]"


def _inside(p, measured: float) -> bool:
    return bool(p.flip_rate_band.low <= measured <= p.flip_rate_band.high)


def study(name: str, n: int, n_cal: int, bits: list[int], cache: str, progress: bool,
          n_noise: int, n_dither: int = 0, seed: int = 0):  # fmt: skip
    from distortion.experiments.bias_correction import (
        apply_bias_correction,
        bias_corrections,
        input_means,
    )
    from distortion.experiments.compare import compare_all_layers, first_order_actual_flips
    from distortion.experiments.data import load_dataset
    from distortion.experiments.measure import measure, predict_logits, quantize_model
    from distortion.experiments.models import get_layer, load_model
    from distortion.experiments.pipeline import fit_evaluate_mask, select_images
    from distortion.quantize import UniformQuantizer

    ds = load_dataset("cifar10")
    fit = fit_evaluate_mask(ds.labels, 10, 0.5, 0)
    ev = select_images(ds, np.flatnonzero(~fit)[:n], f"eval:{n}")
    cal = select_images(ds, np.flatnonzero(fit)[:n_cal], f"calibration:{n_cal}")
    model = load_model(name)
    t0 = time.perf_counter()
    means = input_means(model, cal, progress=progress)
    t_means = time.perf_counter() - t0
    names = list(means.layer_names)
    qs = [UniformQuantizer(bits=b, granularity=g) for g in ("tensor", "channel") for b in bits]
    t0 = time.perf_counter()
    plain = compare_all_layers(model, ev, qs, model_name=name, cache_dir=cache,
                               progress=progress, input_noise_images=n_noise)  # fmt: skip
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    corrected = compare_all_layers(model, ev, qs, model_name=name, cache_dir=cache,
                                   progress=progress, bias_correction=means,
                                   input_noise_images=n_noise)  # fmt: skip
    t_bc = time.perf_counter() - t0
    z0 = predict_logits(model, ev, progress=False)
    ref = z0.argmax(axis=1)
    w0 = {k: get_layer(model, k).weight.detach() for k in names}
    rows = []
    for q, cp, cb in zip(qs, plain.cells, corrected.cells, strict=True):
        _, qt = quantize_model(model, q, names)
        shifts = bias_corrections(w0, {k: t.values for k, t in qt.items()}, means)
        offset_net = apply_bias_correction(copy.deepcopy(model), {k: -v for k, v in shifts.items()})
        z_off = predict_logits(offset_net, ev, progress=False)
        err = {k: q.compress(w0[k], seed=i).detail for i, k in enumerate(names)}
        z, z_lin_c = first_order_actual_flips(model, ev, err, bias_correction=means)
        _, z_at_off = first_order_actual_flips(offset_net, ev, err, bias_correction=means)
        measured = cp.measurement.flip_rate
        l2 = cp.predictions["L2L"].flip_rate
        miss = measured - l2
        row = {
            "model": name, "granularity": q.granularity, "bits": q.bits, "measured": measured,
            "L2L": l2, "L3L": cp.predictions["L3L"].flip_rate,
            "L3L_band": _band(cp.predictions["L3L"]),
            "L3I": cp.predictions["L3I"].flip_rate, "L3I_band": _band(cp.predictions["L3I"]),
            "offsets": _flip(z_off, ref), "hybrid": _flip(z_off + z_lin_c - z, ref),
            "hybrid@offset": _flip(z_at_off, ref),
        }  # fmt: skip
        for k in ("offsets", "hybrid", "hybrid@offset"):
            row[f"share_{k}"] = (row[k] - l2) / miss if abs(miss) > 0 else float("nan")
        b3 = cb.predictions["L3L"]
        bm = cb.measurement.flip_rate
        b3i = cb.predictions["L3I"]
        row.update({
            "bc_measured": bm, "bc_L2L": cb.predictions["L2L"].flip_rate,
            "bc_L3L": b3.flip_rate, "bc_L3L_band": _band(b3),
            "bc_L3I": b3i.flip_rate, "bc_L3I_band": _band(b3i),
            "in_band_L3L": _inside(cp.predictions["L3L"], measured),
            "in_band_L3I": _inside(cp.predictions["L3I"], measured),
            "bc_in_band_L3L": _inside(b3, bm), "bc_in_band_L3I": _inside(b3i, bm),
        })  # fmt: skip
        if n_dither:  # level 3N realizations against the bands (H_U exact: the linearization)
            dq = UniformQuantizer(bits=q.bits, granularity=q.granularity, rounding="dither")
            for pre, cell, bc in (("", cp, None), ("bc_", cb, means)):
                m = measure(model, ev, dq, layers=names, reference_logits=z0, repeats=n_dither,
                            seed=seed + 7919 * q.bits + (0 if bc is None else 104_729),
                            progress=False, bias_correction=bc)  # fmt: skip
                rates = np.asarray(m.flip_rates)
                row[f"{pre}dither_mean"] = float(rates.mean())
                for lvl in ("L3L", "L3I"):
                    b = cell.predictions[lvl].flip_rate_band
                    inside = (rates >= b.low) & (rates <= b.high)
                    row[f"{pre}dither_in_{lvl}"] = float(np.mean(inside))
        rows.append(row)
    times = {"means_s": t_means, "plain_s": t_plain, "bias_corrected_s": t_bc}
    return pd.DataFrame(rows), times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20"])
    p.add_argument("--n", type=int, default=500, help="evaluation images")
    p.add_argument("--calibration", type=int, default=1000, help="calibration images")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    p.add_argument("--cache", default=None, help="cache folder (default $DISTORTION_CACHE)")
    p.add_argument("--out", default=".", help="folder of bias_correction_study.csv")
    p.add_argument("--noise-images", type=int, default=200,
                   help="evaluation images of the input-noise ratios (level L3I)")
    p.add_argument("--dither", type=int, default=0, metavar="R",
                   help="subtractive-dither realizations per cell (level 3N against the bands)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dither realizations")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.dither < 0 or a.dither == 1:
        p.error("--dither must be 0 or >= 2")
    frames = []
    for name in a.models:
        df, times = study(name, a.n, a.calibration, a.bits, a.cache, not a.quiet,
                          a.noise_images, a.dither, a.seed)
        pd.set_option("display.width", 250)
        print(f"\n{name}: n={a.n}, calibration={a.calibration}, " + ", ".join(
            f"{k} {v:.0f}" for k, v in times.items()))  # fmt: skip
        print(df.drop(columns=["model"]).round(3).T.to_string(header=False))
        frames.append(df)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_csv(out / "bias_correction_study.csv", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
