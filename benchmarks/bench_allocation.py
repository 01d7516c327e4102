"""Time of one closed-form prediction of a bit allocation vs one brute-force evaluation.

For ResNet-56 on the first ``--n`` CIFAR-10 test images (default 2000), every quantizable
layer (55 convolutions and the last linear layer) gets a bit-width. Measured in the same
run:

* the one-time cost: per-sample Jacobian Grams (K = 10 backward passes per batch), read from
  the cache when present (``--cache-dir``);
* the closed-form prediction of one allocation once the Grams are cached
  (``AccuracyLossEstimator.predict_allocation``, radial orthant method), median of
  ``--repeats`` calls after one warm-up call (which computes and memoizes the steps), with
  and without the band of one realization;
* one brute-force evaluation of the same allocation: quantize the 56 layers and run the
  network on the same images.

Three allocations: pseudo-random per-layer bits in 4..8, uniform 4 bits, and pseudo-random
bits in 2..8 (a stress case: with several 2-bit layers the network collapses and the
first-order model no longer holds; its prediction is printed next to the measurement).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_allocation.py            # ResNet-56, n = 2000
    OMP_NUM_THREADS=1 python benchmarks/bench_allocation.py --model resnet20 --n 500

Run it with one thread per process on a shared machine: oversubscribed BLAS threads slow
torch down by an order of magnitude and make the ratio meaningless.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--memory-mb", type=int, default=1024, help="per-batch Jacobian budget")
    ap.add_argument(
        "--avg-bits",
        type=float,
        default=4.0,
        help="also time allocate(avg_bits=...) over 3..8 bits and measure its allocation",
    )
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from distortion.estimator import AccuracyLossEstimator
    from distortion.experiments import _paths
    from distortion.experiments.data import load_dataset
    from distortion.experiments.measure import predict_logits, quantize_model
    from distortion.experiments.models import load_model
    from distortion.experiments.sensitivity import gradient_grams
    from distortion.quantize import UniformQuantizer

    shared = _paths.shared_dir()
    if shared is None or not (shared / "data" / "cifar10" / "test.npz").is_file():
        raise SystemExit("needs <DISTORTION_DATA>/data/cifar10/test.npz (set DISTORTION_DATA)")
    data = load_dataset(shared / "data" / "cifar10" / "test.npz", n=args.n)
    model = load_model(args.model)
    out: dict[str, object] = {
        "model": args.model,
        "n_images": len(data),
        "torch_threads": torch.get_num_threads(),
    }

    t = time.perf_counter()
    grams = gradient_grams(
        model, data, layers="all", n_realizations=40, cache_dir=args.cache_dir,
        memory_mb=args.memory_mb, progress=not args.quiet,
    )  # fmt: skip
    out["grams_wall_s"] = time.perf_counter() - t
    out["grams_compute_s"] = grams.meta.get("seconds")
    out["grams_from_cache"] = "cache_file" in grams.meta
    out["n_layers"] = grams.n_layers
    out["n_weights"] = int(grams.layer_sizes().sum())

    est = AccuracyLossEstimator(UniformQuantizer(4), n_realizations=40).fit_grams(grams)
    rng = np.random.default_rng(0)
    names = grams.layer_names
    allocations = {
        # 4..8 bits: a typical mixed-precision range
        "mixed4to8": dict(zip(names, rng.integers(4, 9, len(names)).tolist(), strict=True)),
        "uniform4": dict.fromkeys(names, 4),
        # 2..8 bits: a stress case far outside the first-order regime (many 2-bit layers)
        "mixed2to8": dict(zip(names, rng.integers(2, 9, len(names)).tolist(), strict=True)),
    }

    for label, alloc in allocations.items():
        t = time.perf_counter()
        first = est.predict_allocation(alloc, band=False)  # computes and memoizes the steps
        out[f"{label}_first_call_ms"] = 1e3 * (time.perf_counter() - t)
        times, cpu, times_band = [], [], []
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            est.predict_allocation(alloc, band=False)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            t = time.perf_counter()
            with_band = est.predict_allocation(alloc, band=True)
            times_band.append(time.perf_counter() - t)
        out[f"{label}_predict_ms"] = 1e3 * statistics.median(times)
        out[f"{label}_predict_min_ms"] = 1e3 * min(times)
        out[f"{label}_predict_cpu_ms"] = 1e3 * statistics.median(cpu)
        out[f"{label}_predict_with_band_ms"] = 1e3 * statistics.median(times_band)
        out[f"{label}_predicted_flip"] = first.flip_rate
        out[f"{label}_predicted_flip_band"] = list(with_band.flip_band())
        out[f"{label}_predicted_loss"] = first.accuracy_loss

        t, c = time.perf_counter(), time.process_time()
        qmodel, _ = quantize_model(model, {n: UniformQuantizer(b) for n, b in alloc.items()})
        with torch.inference_mode():
            logits = predict_logits(qmodel, data, progress=False)
        brute = time.perf_counter() - t
        out[f"{label}_brute_force_s"] = brute
        out[f"{label}_brute_force_cpu_s"] = time.process_time() - c
        out[f"{label}_speedup"] = brute / (1e-3 * out[f"{label}_predict_ms"])
        out[f"{label}_speedup_cpu"] = out[f"{label}_brute_force_cpu_s"] / (
            1e-3 * out[f"{label}_predict_cpu_ms"]
        )
        pred_f = grams.predictions()
        out[f"{label}_measured_flip"] = float(np.mean(logits.argmax(1) != pred_f))
        out[f"{label}_measured_loss"] = float(
            np.mean(pred_f == grams.labels) - np.mean(logits.argmax(1) == grams.labels)
        )

    if args.avg_bits:
        t = time.perf_counter()
        alloc = est.allocate(avg_bits=args.avg_bits, bits=range(3, 9))
        out["allocate_s"] = time.perf_counter() - t
        out["allocate_avg_bits"] = alloc.avg_bits()
        out["allocate_bits_histogram"] = np.bincount(alloc.bits, minlength=9)[3:].tolist()
        out["allocate_surrogate_flip"] = alloc.surrogate
        out["allocate_predicted_flip"] = alloc.flip_rate
        out["allocate_predicted_flip_band"] = list(alloc.prediction.flip_band())
        qmodel, _ = quantize_model(
            model, {n: UniformQuantizer(int(b)) for n, b in alloc.as_dict().items()}
        )
        with torch.inference_mode():
            logits = predict_logits(qmodel, data, progress=False)
        out["allocate_measured_flip"] = float(np.mean(logits.argmax(1) != grams.predictions()))

    print(json.dumps(out, indent=2))
    for label in allocations:
        print(
            f"{label}: closed form {out[f'{label}_predict_ms']:.1f} ms wall "
            f"({out[f'{label}_predict_cpu_ms']:.1f} ms CPU; "
            f"{out[f'{label}_predict_with_band_ms']:.1f} ms with band) vs brute force "
            f"{out[f'{label}_brute_force_s']:.2f} s wall: {out[f'{label}_speedup']:.0f}x "
            f"faster ({out[f'{label}_speedup_cpu']:.0f}x in CPU time); "
            f"flip predicted {100 * out[f'{label}_predicted_flip']:.2f} % vs measured "
            f"{100 * out[f'{label}_measured_flip']:.2f} %"
        )
    if args.avg_bits:
        print(
            f"allocate(avg_bits={args.avg_bits}, bits 3..8): {out['allocate_s']:.1f} s, "
            f"{out['allocate_avg_bits']:.3f} bits/weight, predicted flip "
            f"{100 * out['allocate_predicted_flip']:.2f} % (additive surrogate "
            f"{100 * out['allocate_surrogate_flip']:.2f} %), measured "
            f"{100 * out['allocate_measured_flip']:.2f} % (uniform 4 bits: "
            f"{100 * out['uniform4_measured_flip']:.2f} %)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
