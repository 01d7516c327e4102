"""Issue 16, a candidate: does the logits' second-order mean shift explain the all-layer miss at
2-3 bits?

For each model, granularity and bit-width, every quantizable layer gets the H_U error model of
symmetric max-range rounding; on the first ``--n`` all-layer evaluation images of the default
experiment (``experiments/default.toml``) the script computes

* the measured flip rate of the really quantized network (level 4);
* level 3L, the first-order model (``theory/multilayer.md`` eq. L4-L7) with its band;
* level 3L + a mean shift of the logits, added as a logit shift: with ``--shift hessian``
  (default) the second-order mean shift of eq. L21, ``1/2 sum sigma^2 tr H`` per image and
  logit (:func:`distortion.experiments.curvature.second_order_weight_shift`, ``--probes``
  Hutchinson probes, forward-over-forward passes); with ``--shift rectifiers`` the mean
  shift of every rectifier under the first-order noise of all layers, eq. L29
  (:func:`distortion.experiments.curvature.weight_noise_rectifier_shift`, ``--probes``
  forward-mode probes of the unit variances, float32); with ``--shift smoothed`` the
  moment-propagated mean of eq. L31, the network whose ReLUs are smoothed by the noise each
  one sees (:func:`distortion.experiments.smoothed.smoothed_shift`, ``--probes`` probes,
  two re-estimates of the noise scales) minus the float network.

With ``--mean-check R`` the mean itself is checked: R subtractive-dither quantizations of every
layer (H_U exact) run through the real network, and the slope ``beta`` of their mean logit move
on the shift (both centred over the classes of each image, which a common move leaves alone)
is printed with its jackknife standard error over the realizations: 1 when the shift is the
real network's mean move, and the R dithered networks' mean flip rate is level 3N (the
nonlinear network under H_U exactly), with the order-statistic band of their flip rates (eq.
L15); the share of them whose flip rate lies inside each band is that band's coverage
against the nonlinear network (95 % if it were exact). With
``--spread`` each dithered network's first-order move (one JVP) is computed too, and the
standard deviation of the flip rate over the realizations is split
(:func:`spread_decomposition`): the first-order moves alone, with the shift, with the mean of
the nonlinear rest, with each realization's own class offset, against the dithered networks
and the band's own realizations.

It prints, per cell, the three flip rates, the rms shift against its standard error, the
share of the first-order miss the shift explains ((3L+shift - 3L) / (measured - 3L)) and the
time of the shift. Writes ``second_order.csv`` to ``--out``. ``--skip S`` takes the evaluation
images S .. S+n-1 instead: images held out from a study run on the first S.

Usage::

    OMP_NUM_THREADS=2 python experiments/second_order_study.py --models resnet20 --n 200
    OMP_NUM_THREADS=2 python experiments/second_order_study.py --shift rectifiers --probes 16
    OMP_NUM_THREADS=2 python experiments/second_order_study.py --shift smoothed --probes 16 \
        --n 500 --bits 3 4 --mean-check 4
    OMP_NUM_THREADS=2 python experiments/second_order_study.py --shift smoothed --probes 16 \
        --n 500 --skip 500 --bits 3 4     # held out from the run above
    OMP_NUM_THREADS=2 python experiments/second_order_study.py --shift smoothed --probes 16 \
        --n 500 --skip 500 --bits 3 --mean-check 50 --spread
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT, HERE):  # run as a script from anywhere; evaluation_images of the study
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from compression_study import evaluation_images  # noqa: E402

OUT_DIR = ROOT / "experiments" / "results" / "second_order"


def mean_slope(moves: np.ndarray, shift: np.ndarray) -> tuple[float, float]:
    """Slope of the mean of ``moves`` (R, N, K) on ``shift`` (N, K), both centred over the
    classes, and its jackknife standard error over the R realizations."""

    def centred(a):
        return a - a.mean(axis=-1, keepdims=True)

    s = centred(shift)
    den = float(np.sum(s * s))
    if den == 0:
        return float("nan"), float("nan")
    m = centred(moves)
    r = len(m)
    beta = float(np.sum(m.mean(0) * s) / den)
    loo = np.array([np.sum(np.delete(m, i, 0).mean(0) * s) / den for i in range(r)])
    return beta, float(np.sqrt((r - 1) / r * np.sum((loo - loo.mean()) ** 2)))


def spread_decomposition(
    z0: np.ndarray, moves: np.ndarray, lins: np.ndarray, shift: np.ndarray, band: np.ndarray
) -> dict[str, float]:
    r"""Where the flip-rate spread of R dithered networks comes from.

    ``moves`` (R, N, K) are their logit moves, ``lins`` (R, N, K) the first-order moves of the
    same errors (:math:`J\,\mathrm{vec}(E)`, one JVP each), ``shift`` (N, K) the predicted
    mean (eq. L31) and ``band`` the flip rates of the Grams' cached realizations moved by it
    (the band of level 3S). The rest :math:`d_r = \text{move}_r - \text{lin}_r` splits into
    its mean over the realizations and each one's own deviation, whose average over the
    images (a class offset common to all of them) is tried on its own. Returns the standard
    deviation over the realizations of the flip rate of each stand-in (``sd_*``) and the
    rms of the parts, all centred over the classes.
    """
    dec = np.argmax(z0, axis=1)

    def sd(moved: np.ndarray) -> float:
        return float(np.std(np.mean(np.argmax(z0 + moved, axis=2) != dec, axis=1), ddof=1))

    def rms(a: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a - a.mean(axis=-1, keepdims=True)) ** 2)))

    rest = moves - lins
    mean_rest = rest.mean(axis=0)
    offset = (rest - mean_rest).mean(axis=1, keepdims=True)
    return {
        "sd_3N": sd(moves), "sd_band_3S": float(np.std(band, ddof=1)), "sd_lin": sd(lins),
        "sd_lin_shift": sd(lins + shift), "sd_lin_mean_rest": sd(lins + mean_rest),
        "sd_lin_mean_rest_offset": sd(lins + mean_rest + offset),
        "rms_lin": rms(lins), "rms_mean_rest": rms(mean_rest),
        "rms_own_rest": rms(rest - mean_rest), "rms_offset": rms(offset),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--n", type=int, default=200, help="evaluation images (default 200)")
    ap.add_argument("--skip", type=int, default=0, metavar="S",
                    help="evaluation images S .. S+n-1 (held out from the first S)")  # fmt: skip
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--granularity", nargs="+", default=["tensor", "channel"])
    ap.add_argument("--shift", choices=["hessian", "rectifiers", "smoothed"], default="hessian",
                    help="which mean shift (eq. L21, L29 or L31)")  # fmt: skip
    ap.add_argument("--probes", type=int, default=8, help="probes of the shift (default 8)")
    ap.add_argument("--mean-check", type=int, default=0, metavar="R",
                    help="check the shift against R dithered networks' mean move")  # fmt: skip
    ap.add_argument("--spread", action="store_true",
                    help="with --mean-check: split the dithered networks' flip-rate spread "
                    "(first-order move of each, its nonlinear rest)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.probes < 2 or args.mean_check < 0 or args.mean_check == 1:
        ap.error("--probes must be >= 2 and --mean-check 0 or >= 2")
    if args.spread and not args.mean_check:
        ap.error("--spread needs --mean-check R")
    if args.skip < 0 or args.n < 1:
        ap.error("--skip must be >= 0 and --n >= 1")

    import torch

    from distortion.experiments.compare import first_order_actual_flips
    from distortion.experiments.curvature import (
        second_order_weight_shift,
        weight_noise_rectifier_shift,
    )
    from distortion.experiments.measure import measure, predict_logits, quantize_model
    from distortion.experiments.models import get_layer, load_model
    from distortion.experiments.sensitivity import gradient_grams
    from distortion.experiments.smoothed import smoothed_shift
    from distortion.quantize import UniformQuantizer
    from distortion.theory._bands import order_statistic_band
    from distortion.theory.multilayer import multilayer_distortion

    images, seed = evaluation_images(args.skip + args.n)
    if args.skip:
        from distortion.experiments.pipeline import select_images

        if len(images) < args.skip + args.n:
            raise SystemExit(f"--skip {args.skip} + --n {args.n} exceeds the {len(images)} "
                             "evaluation images")  # fmt: skip
        images = select_images(images, np.arange(args.skip, args.skip + args.n), "held-out")
    rows = []
    for name in args.models:
        model = load_model(name)
        grams = gradient_grams(model, images, granularity="channel", seed=seed,
                               cache_dir=args.cache_dir, progress=False)  # fmt: skip
        names = list(grams.layer_names)
        weights = {k: get_layer(model, k).weight.detach().numpy() for k in names}
        for gran in args.granularity:
            for bits in args.bits:
                q = UniformQuantizer(bits, granularity=gran)
                m2 = {k: np.asarray(q.compress(weights[k]).second_moment) for k in names}
                var = [m2[k] for k in names]
                t0 = time.perf_counter()
                if args.shift == "hessian":
                    shift, se = second_order_weight_shift(
                        model, images, m2, n_probes=args.probes, seed=seed
                    )
                elif args.shift == "smoothed":
                    shift, _ = smoothed_shift(
                        model, images, m2, n_probes=args.probes, seed=seed,
                        cache_dir=args.cache_dir,
                    )  # fmt: skip
                    se = np.full(shift.shape, np.nan)
                else:
                    shift = weight_noise_rectifier_shift(
                        model, images, m2, n_probes=args.probes, seed=seed, dtype=torch.float32
                    )
                    se = np.full(shift.shape, np.nan)  # no probe-to-probe error: not a mean
                t_shift = time.perf_counter() - t0
                base = multilayer_distortion(grams, var, seed=seed, band=True)
                moved = multilayer_distortion(grams, var, seed=seed, band=True, shift=shift)
                meas = measure(model, images, q, layers=names, progress=False)
                lo, hi = base.flip_band()
                mlo, mhi = moved.flip_band()
                miss = meas.flip_rate - base.flip_rate
                beta = beta_se = l3n = l3n_sd = in_3l = in_3s = nlo = nhi = float("nan")
                spread = {}
                if args.mean_check:
                    z0 = predict_logits(model, images, progress=False)
                    dq = UniformQuantizer(bits, granularity=gran, rounding="dither")
                    moves, lins = [], []
                    for r in range(args.mean_check):
                        qm, qt = quantize_model(model, dq, names, seed=seed + 7919 * (r + 1))
                        moves.append(predict_logits(qm, images, progress=False) - z0)
                        if args.spread:  # the same realization's first-order move (JVP)
                            zf, zl = first_order_actual_flips(model, images, qt)
                            lins.append(zl - zf)
                    beta, beta_se = mean_slope(np.stack(moves), shift)
                    # level 3N: the dithered networks' own flip rate (exact under H_U)
                    dec = np.argmax(z0, axis=1)
                    flips = np.array([np.mean(np.argmax(z0 + m, 1) != dec) for m in moves])
                    l3n, l3n_sd = float(flips.mean()), float(flips.std(ddof=1))
                    nlo, nhi = order_statistic_band(np.rint(flips * len(dec)), len(dec), 0.95)
                    if args.spread:
                        spread = spread_decomposition(
                            z0, np.stack(moves), np.stack(lins), shift,
                            np.asarray(moved.flip_counts) / len(dec),
                        )  # fmt: skip
                    # each dithered network is one realization of H_U: the share inside a
                    # band is that band's coverage against the nonlinear network
                    in_3l = float(np.mean((flips >= lo) & (flips <= hi)))
                    in_3s = float(np.mean((flips >= mlo) & (flips <= mhi)))
                rows.append({
                    "model": name, "granularity": gran, "bits": bits, "n": len(images),
                    "skip": args.skip,
                    "measured": meas.flip_rate, "L3L": base.flip_rate, "L3L_low": lo,
                    "L3L_high": hi, "L3L_shift": moved.flip_rate, "L3L_shift_low": mlo,
                    "L3L_shift_high": mhi,
                    "shift_rms": float(np.sqrt(np.mean(shift**2))),
                    "shift_se_rms": float(np.sqrt(np.mean(se**2))),
                    "share_of_miss": (moved.flip_rate - base.flip_rate) / miss if miss else
                    float("nan"),
                    "shift": args.shift, "probes": args.probes, "shift_s": t_shift,
                    "beta": beta, "beta_se": beta_se, "mean_check": args.mean_check,
                    "L3N": l3n, "L3N_sd": l3n_sd, "L3N_in_L3L_band": in_3l,
                    "L3N_in_shift_band": in_3s, "L3N_low": nlo, "L3N_high": nhi,
                    "measured_in_L3N_band": float(nlo <= meas.flip_rate <= nhi), **spread,
                })  # fmt: skip
                r = rows[-1]
                print(f"{name} {gran} {bits} bits: measured {r['measured']:.3f}  3L "
                      f"{r['L3L']:.3f} [{lo:.3f}, {hi:.3f}]  3L+shift {r['L3L_shift']:.3f} "
                      f"[{mlo:.3f}, {mhi:.3f}]  rms shift {r['shift_rms']:.3g} (se "
                      f"{r['shift_se_rms']:.3g})  share of miss {r['share_of_miss']:.2f}  "
                      f"beta {beta:.3f} ({beta_se:.3f})  3N {l3n:.3f} (in 3L band {in_3l:.2f}, "
                      f"in shifted band {in_3s:.2f}; its band [{nlo:.3f}, {nhi:.3f}])  "
                      f"{t_shift:.0f} s", flush=True)  # fmt: skip
                if spread:
                    print("  flip-rate sd over realizations: " + ", ".join(
                        f"{k[3:]} {v:.3f}" for k, v in spread.items() if k.startswith("sd_")
                    ), flush=True)  # fmt: skip
                # written after every cell: a long run stopped part way keeps what it measured
                args.out.mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_csv(args.out / "second_order.csv", index=False)
    print(f"wrote {args.out / 'second_order.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
