"""Which layer of ResNet-20 is most sensitive? Predicted vs measured, one layer at a time.

Each quantizable layer of ResNet-20 (19 convolutions and the last linear layer) is quantized
alone at 3 and at 4 bits (symmetric, per tensor, max range, round to nearest), the network
is run on the first ``--n`` CIFAR-10 test images, and the flip rate (decisions that change
against the float network) is measured. Three per-layer predictions are ranked against it:

* ours — the first-order model of ``theory/multilayer.md`` (flip rate with that layer's
  error variance :math:`\\Delta^2/12`, eq. L4-L7), from per-sample Jacobian Grams;
* Sakr et al. (ICML 2017) — the mismatch-probability bound :math:`\\Delta_\\ell^2 E_\\ell`
  (``theory/baselines.md``, eq. BL4), from the same Grams;
* HAWQ-V2 (NeurIPS 2020) — :math:`\\Omega_\\ell = \\operatorname{Tr}(H_\\ell)/n_\\ell
  \\cdot \\|Q(W_\\ell) - W_\\ell\\|^2` (eq. BL5) with a Hutchinson trace (eq. BL6) on
  ``--hessian-n`` images, and with the exact Gauss-Newton trace from the same Grams on all
  ``--n`` images (eq. BL7; exact for ResNets, which are piecewise linear in each layer).

With ``--rectifier``, ours is also given with the mean shift of the rectifier right after each
layer (``theory/multilayer.md`` eq. L27-L28): the columns ``rect_flip`` and its band.
``--dither D`` runs D subtractive-dither quantizations of each layer through the real network
(H_U exact): the share inside each band is its calibration against the linearization alone.
``--skip S`` takes the test images S .. S+n-1 (held out from the first ones).

Usage::

    OMP_NUM_THREADS=2 python experiments/layerwise_resnet20.py            # n = 2000
    OMP_NUM_THREADS=2 python experiments/layerwise_resnet20.py --n 500    # quicker

Prints the per-layer table, the Spearman correlations (per bit-width and pooled over the
two), the timings, and writes ``experiments/results/layerwise_resnet20/table.csv``. The
gradient Grams and the Hessian trace are cached (``--cache-dir``, default
``$DISTORTION_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from distortion.experiments import _paths  # noqa: E402
from distortion.quantize import UniformQuantizer  # noqa: E402
from distortion.theory.baselines import (  # noqa: E402
    gauss_newton_trace,
    hawq_v2_sensitivity,
    sakr_bound,
)
from distortion.theory.multilayer import multilayer_distortion  # noqa: E402

OUT_DIR = ROOT / "experiments" / "results" / "layerwise_resnet20"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--n", type=int, default=2000, help="test images (default 2000)")
    ap.add_argument(
        "--skip", type=int, default=0, metavar="S",
        help="use the test images S .. S+n-1 instead of the first n (held-out images)",
    )  # fmt: skip
    ap.add_argument("--bits", default="3,4", help="bit-widths (default 3,4)")
    ap.add_argument(
        "--hessian-n", type=int, default=500,
        help="images of the Hessian trace (0: no Hutchinson HAWQ-V2 column)",
    )  # fmt: skip
    ap.add_argument("--hessian-draws", type=int, default=32, help="Rademacher draws")
    ap.add_argument(
        "--realizations", type=int, default=40, help="simulated error realizations (bands)"
    )
    ap.add_argument(
        "--dither", type=int, default=0, metavar="D",
        help="also run each layer under D subtractive-dither quantizations (H_U exact) through "
        "the real network: the share of them inside the band is the band's calibration against "
        "the linearization alone (level 3N, one layer at a time)",
    )  # fmt: skip
    ap.add_argument(
        "--rectifier", action="store_true",
        help="also predict with the mean shift of the rectifier after each layer (theory/"
        "multilayer.md eq. L27-L28; one forward-mode pass per layer and bit-width, float32)",
    )  # fmt: skip
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument(
        "--bias-correction", type=int, default=0, metavar="N",
        help="quantize with bias correction (theory/multilayer.md eq. L22), calibrated on the "
        "N test images after the first --n (disjoint); predict from the centred Grams (L23)",
    )  # fmt: skip
    ap.add_argument("--out", default=None, help=f"output folder (default {OUT_DIR})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--reuse-measured",
        action="store_true",
        help="reuse the measured decisions saved by a previous run (same model and n)",
    )
    args = ap.parse_args(argv)
    if args.dither < 0 or args.hessian_n < 0 or args.skip < 0:
        ap.error("--dither, --hessian-n and --skip must be >= 0")

    import torch

    from distortion.experiments.curvature import rectified_layers, rectifier_weight_shift
    from distortion.experiments.data import load_dataset
    from distortion.experiments.measure import predict_logits, quantize_model
    from distortion.experiments.models import get_layer, load_model
    from distortion.experiments.sensitivity import gradient_grams, hessian_trace

    progress = not args.quiet
    shared = _paths.shared_dir()
    if shared is None or not (shared / "data" / "cifar10" / "test.npz").is_file():
        raise SystemExit("needs <DISTORTION_DATA>/data/cifar10/test.npz (set DISTORTION_DATA)")
    bits_list = [int(b) for b in args.bits.split(",")]
    from distortion.experiments.pipeline import select_images

    if args.skip:
        full = load_dataset(shared / "data" / "cifar10" / "test.npz")
        if args.skip + args.n > len(full):
            raise SystemExit(f"--skip {args.skip} + --n {args.n} exceeds the {len(full)} test "
                             "images")  # fmt: skip
        data = select_images(full, np.arange(args.skip, args.skip + args.n), "held-out")
    else:
        data = load_dataset(shared / "data" / "cifar10" / "test.npz", n=args.n)
    model = load_model(args.model)
    timings: dict[str, float] = {}
    out_dir = Path(args.out) if args.out else OUT_DIR
    means = None
    if args.bias_correction:
        from distortion.experiments.bias_correction import input_means

        full = load_dataset(shared / "data" / "cifar10" / "test.npz")
        end = args.skip + len(data)
        if end + args.bias_correction > len(full):
            raise SystemExit(f"--skip + --n {end} + --bias-correction {args.bias_correction} "
                             f"exceeds the {len(full)} test images")  # fmt: skip
        cal = select_images(full, np.arange(end, end + args.bias_correction), "cal")
        means = input_means(model, cal, progress=progress)

    t = time.perf_counter()
    grams = gradient_grams(
        model, data, layers="all", n_realizations=args.realizations, cache_dir=args.cache_dir,
        progress=progress, input_means=means,
    )  # fmt: skip
    timings["gradient_grams_s"] = time.perf_counter() - t
    timings["gradient_grams_computed_s"] = grams.meta.get("seconds", float("nan"))
    names = list(grams.layer_names)
    rectified = set(rectified_layers(model)) if args.rectifier else set()

    t = time.perf_counter()
    trace = hdata = None
    if args.hessian_n:
        hdata = load_dataset(shared / "data" / "cifar10" / "test.npz", n=args.hessian_n)
        trace = hessian_trace(
            model, hdata, layers=names, n_draws=args.hessian_draws, seed=args.seed,
            cache_dir=args.cache_dir, progress=progress,
        )  # fmt: skip
    timings["hessian_trace_s"] = time.perf_counter() - t
    gn_trace = gauss_newton_trace(grams)

    t = time.perf_counter()
    float_logits = predict_logits(model, data, progress=False)
    timings["float_forward_s"] = time.perf_counter() - t
    pred_float = float_logits.argmax(axis=1)
    labels = np.asarray(data.labels)

    # measured decisions of each (bits, layer), saved so that a rerun can skip the forward
    # passes (--reuse-measured): the same model, images and quantizer give the same decisions
    bc = f"-bc{args.bias_correction}" if args.bias_correction else ""
    sk = f"-skip{args.skip}" if args.skip else ""
    pred_file = out_dir / f"measured-{args.model}-n{len(data)}{sk}{bc}.npz"
    reused: dict[tuple[int, str], np.ndarray] = {}
    if args.reuse_measured and pred_file.is_file():
        with np.load(pred_file) as z:
            reused = {(int(k.split(":")[0]), k.split(":")[1]): z[k] for k in z.files}
    rows, dither_rows = [], []
    sims: dict[int, list[np.ndarray]] = {b: [] for b in bits_list}
    t_measure = t_predict = t_dither = t_rect = 0.0
    for bits in bits_list:
        q = UniformQuantizer(bits)
        dq = UniformQuantizer(bits, rounding="dither")
        comp = {n: q.compress(get_layer(model, n).weight.detach()) for n in names}
        qt = {n: c.detail for n, c in comp.items()}
        sq_err = [float(np.sum(qt[n].error ** 2)) for n in names]
        hawq = None if trace is None else hawq_v2_sensitivity(trace, sq_err)
        hawq_gn = hawq_v2_sensitivity(gn_trace, sq_err)
        for li, name in enumerate(names):
            var = [0.0] * len(names)
            var[li] = float(comp[name].error_model.second_moment)  # the error model (eq. E1)
            t = time.perf_counter()
            ours = multilayer_distortion(grams, var, seed=args.seed, band=args.realizations > 0)
            var_emp = [0.0] * len(names)
            var_emp[li] = float(np.mean(qt[name].error ** 2))  # actual mean square error
            ours_emp = multilayer_distortion(grams, var_emp, seed=args.seed, band=False)
            sakr = sakr_bound(grams, variances=var)
            t_predict += time.perf_counter() - t
            rect = ours  # layers without a rectifier right after them: no shift
            if name in rectified:
                t = time.perf_counter()
                mu = rectifier_weight_shift(
                    model, data, name, comp[name].error_model.second_moment,
                    input_mean=None if means is None else means.mean(name), dtype=torch.float32,
                )  # fmt: skip
                rect = multilayer_distortion(
                    grams, var, seed=args.seed, band=args.realizations > 0, shift=mu
                )
                t_rect += time.perf_counter() - t
            t = time.perf_counter()
            if (bits, name) in reused:
                pq = reused[(bits, name)]
            else:
                qmodel, _ = quantize_model(model, q, [name], bias_correction=means)
                with torch.inference_mode():
                    pq = predict_logits(qmodel, data, progress=False).argmax(axis=1)
            t_measure += time.perf_counter() - t
            reused[(bits, name)] = pq
            band, rband = ours.flip_band(), rect.flip_band()
            dflips, verdicts, rverdicts = [], [], []
            t = time.perf_counter()
            for draw in range(args.dither):  # seeded from the run's seed, layer and draw
                seed = args.seed + 1_000_003 * (draw + 1) + 1009 * li
                dmodel, _ = quantize_model(model, dq, [name], bias_correction=means, seed=seed)
                with torch.inference_mode():
                    dp = predict_logits(dmodel, data, progress=False).argmax(axis=1)
                dflips.append(float(np.mean(dp != pred_float)))
                verdicts.append(band.low <= dflips[-1] <= band.high)
                rverdicts.append(rband.low <= dflips[-1] <= rband.high)
                dither_rows.append({"bits": bits, "layer": name, "draw": draw,
                                    "flip": dflips[-1], "in_band": verdicts[-1],
                                    "in_band_rect": rverdicts[-1]})  # fmt: skip
            t_dither += time.perf_counter() - t
            if args.realizations:
                sims[bits].append(ours.flip_counts / ours.n_samples)
            rows.append(
                {
                    "bits": bits,
                    "layer": name,
                    "n_weights": int(grams.layer_sizes()[li]),
                    "measured_flip": float(np.mean(pq != pred_float)),
                    "measured_loss": float(np.mean(pred_float == labels) - np.mean(pq == labels)),
                    "ours_flip": ours.flip_rate,
                    "ours_loss": ours.accuracy_loss,
                    "ours_emp_flip": ours_emp.flip_rate,
                    "ours_flip_low": band.low,
                    "ours_flip_high": band.high,
                    "rect_flip": rect.flip_rate,
                    "rect_flip_low": rband.low,
                    "rect_flip_high": rband.high,
                    "sakr_bound": sakr.bound,
                    "hawq_omega": np.nan if hawq is None else float(hawq.omega[li]),
                    "hawq_omega_se": np.nan if hawq is None else float(hawq.omega_stderr[li]),
                    "hawq_gn_omega": float(hawq_gn.omega[li]),
                    "dither_flip_mean": float(np.mean(dflips)) if dflips else np.nan,
                    "dither_in_band": float(np.mean(verdicts)) if verdicts else np.nan,
                    "dither_in_band_rect": float(np.mean(rverdicts)) if rverdicts else np.nan,
                }  # fmt: skip
            )
    timings["measure_all_s"] = t_measure
    timings["dither_all_s"] = t_dither
    timings["predict_all_s"] = t_predict
    timings["rectifier_shift_all_s"] = t_rect
    table = pd.DataFrame(rows)

    def spearman(frame: pd.DataFrame, col: str) -> float:
        return float(stats.spearmanr(frame[col], frame["measured_flip"]).statistic)

    summary = []
    for label, part in [*((f"{b} bits", table[table.bits == b]) for b in bits_list),
                        ("pooled", table)]:  # fmt: skip
        summary.append(
            {
                "set": label,
                "n_points": len(part),
                "spearman_ours": spearman(part, "ours_flip"),
                "spearman_ours_empirical_var": spearman(part, "ours_emp_flip"),
                "spearman_hawq_v2": spearman(part, "hawq_omega"),
                "spearman_hawq_v2_gn": spearman(part, "hawq_gn_omega"),
                "spearman_sakr": spearman(part, "sakr_bound"),
            }
        )
    summary = pd.DataFrame(summary)
    # Noise ceiling: Spearman of our expected flip rates against ONE simulated realization
    # of the error per layer (linear model, exact H_U) -- what an exact model would score
    # against a single measured quantization; median and 5-95 % range over realizations.
    if args.realizations:
        ceil = {}
        for b in bits_list:
            part = table[table.bits == b]
            sim = np.stack(sims[b])  # (L, R)
            rho = [
                stats.spearmanr(part["ours_flip"], sim[:, r]).statistic for r in range(sim.shape[1])
            ]
            ceil[f"{b} bits"] = np.percentile(rho, [5, 50, 95])
            in_band = (part["ours_flip_low"] <= part["measured_flip"]) & (
                part["measured_flip"] <= part["ours_flip_high"]
            )
            ceil[f"{b} bits in band"] = float(in_band.mean())
            ceil[f"{b} bits in band rect"] = float(
                ((part.rect_flip_low <= part.measured_flip)
                 & (part.measured_flip <= part.rect_flip_high)).mean()
            )  # fmt: skip
        summary["ceiling_p05"] = [ceil.get(k, [np.nan] * 3)[0] for k in summary["set"]]
        summary["ceiling_median"] = [ceil.get(k, [np.nan] * 3)[1] for k in summary["set"]]
        summary["ceiling_p95"] = [ceil.get(k, [np.nan] * 3)[2] for k in summary["set"]]
        summary["measured_in_band"] = [ceil.get(f"{k} in band", np.nan) for k in summary["set"]]
        if args.rectifier:
            summary["measured_in_band_rect"] = [
                ceil.get(f"{k} in band rect", np.nan) for k in summary["set"]
            ]
    if dither_rows:  # the band against H_U realizations through the real network
        dith = pd.DataFrame(dither_rows)
        share = {f"{b} bits": float(dith[dith.bits == b].in_band.mean()) for b in bits_list}
        share["pooled"] = float(dith.in_band.mean())
        summary["dither_in_band"] = [share.get(k, np.nan) for k in summary["set"]]
        if args.rectifier:
            rs = {f"{b} bits": float(dith[dith.bits == b].in_band_rect.mean()) for b in bits_list}
            rs["pooled"] = float(dith.in_band_rect.mean())
            summary["dither_in_band_rect"] = [rs.get(k, np.nan) for k in summary["set"]]
        summary["dither_replications"] = [
            int((dith.bits == int(k.split()[0])).sum()) if k != "pooled" else len(dith)
            for k in summary["set"]
        ]
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(pred_file, **{f"{b}:{n}": v for (b, n), v in reused.items()})
    table.to_csv(out_dir / "table.csv", index=False)
    if dither_rows:
        pd.DataFrame(dither_rows).to_csv(out_dir / "dither.csv", index=False)
    summary.to_csv(out_dir / "spearman.csv", index=False)
    info = {
        "model": args.model, "n_images": len(data), "skip": args.skip,
        "hessian_images": 0 if hdata is None else len(hdata),
        "hessian_draws": args.hessian_draws, "float_accuracy": float(np.mean(pred_float == labels)),
        "bias_correction": args.bias_correction,
        **timings,
    }  # fmt: skip
    (out_dir / "info.json").write_text(json.dumps(info, indent=2))
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print()
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
