"""One-time cost of the activation Grams against the weight Grams, and a W+A prediction.

In one run, on the same first ``--n`` evaluation images of the default split (and 500
calibration images of its fit half), for each model:

* ``weight grams``: :func:`~distortion.experiments.sensitivity.gradient_grams` (all layers,
  per channel, 40 realizations), no cache;
* ``activation grams``: :func:`~distortion.experiments.activation_grams.activation_grams` of
  the inputs of every layer, for ``--configs`` grid configurations at once (A8 per tensor,
  A4 per tensor, ...), no cache;
* ``predict W+A``: one W8A8 configuration (all layers) predicted from the two caches
  (``AccuracyLossEstimator.predict_allocation(..., activations=...)``, radial orthant, band
  of 40 realizations), median of 20 calls, against ``measure``: one brute-force evaluation
  of the same configuration on the same images (weights quantized, activations
  fake-quantized by hooks).

Prints seconds and the ratios, with ``uptime`` before and after.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_activations.py --n 500
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--configs", type=int, default=2, help="grid configurations (1-6)")
    args = ap.parse_args(argv)
    import torch
    from activations_study import split_images

    from distortion.activations import ActivationQuantizer
    from distortion.estimator import AccuracyLossEstimator
    from distortion.experiments.activation_grams import activation_grams, measure_quantized
    from distortion.experiments.activations import calibrate_activations
    from distortion.experiments.models import load_model
    from distortion.experiments.sensitivity import gradient_grams
    from distortion.quantize import UniformQuantizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(
        "uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    )
    cal, ev = split_images(args.n)
    grid = [(8, "tensor"), (4, "tensor"), (8, "channel"), (4, "channel"), (6, "tensor"),
            (6, "channel")][: args.configs]  # fmt: skip
    for name in args.models:
        model = load_model(name)
        cfgs = {
            f"A{b} {g}": calibrate_activations(
                model, cal, "all", ActivationQuantizer(b, granularity=g), n_images=len(cal)
            )
            for b, g in grid
        }
        t = time.perf_counter()
        wg = gradient_grams(model, ev, layers="all", granularity="channel", cache=False,
                            progress=False)  # fmt: skip
        tw = time.perf_counter() - t
        t = time.perf_counter()
        ags = activation_grams(model, ev, cfgs, cache=False, progress=False)
        ta = time.perf_counter() - t
        wq = UniformQuantizer(8, granularity="channel")
        est = AccuracyLossEstimator(quantizer=wq).fit_grams(wg)
        alloc = dict.fromkeys(wg.layer_names, 8)
        ag = ags[next(iter(ags))]
        est.predict_allocation(alloc, activations=ag)  # warm the memoized steps
        times = []
        for _ in range(20):
            t = time.perf_counter()
            est.predict_allocation(alloc, activations=ag)
            times.append(time.perf_counter() - t)
        tp = float(np.median(times))
        t = time.perf_counter()
        measure_quantized(model, ev, weights=wq, layers="all",
                          activations=cfgs[next(iter(cfgs))].qparams, progress=False)  # fmt: skip
        tm = time.perf_counter() - t
        print(f"\n{name}, {len(ev)} images, {wg.n_layers} layers, {len(ag.point_names)} points")
        print(f"  weight grams      {tw:8.2f} s")
        print(
            f"  activation grams  {ta:8.2f} s  ({len(cfgs)} configurations)  "
            f"ratio to the weight grams {ta / tw:.2f}"
        )
        print(f"  predict W8A8      {tp * 1e3:8.2f} ms (median of 20)")
        print(f"  measure W8A8      {tm:8.2f} s   ratio measure / predict {tm / tp:.0f}")
    print(
        "\nuptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
