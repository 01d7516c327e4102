"""Prediction cost vs brute-force measurement cost for the same all-layer table, one run.

For one model and N evaluation images, over bits × granularity with every layer quantized:

- prediction: the per-sample gradient Grams (computed once; reported separately, cold) and then
  the closed-form prediction of every cell (``multilayer_distortion``);
- brute force: quantize every layer and run the network on the N images, for every cell.

Prints both costs, their ratio (with and without the one-time Grams), and the fidelity of the
predictions: mean absolute error of the flip rate and the fraction of cells whose measured flip
rate lies in the predicted 95 % band.

Usage::

    python benchmarks/bench_compare.py --model resnet20 --n 2000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--n", type=int, default=2000, help="evaluation images")
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    args = ap.parse_args()
    bits = [int(b) for b in args.bits.split(",")]

    from distortion.experiments import _paths
    from distortion.experiments.compare import quantizer_grid
    from distortion.experiments.data import load_dataset
    from distortion.experiments.measure import measure, predict_logits
    from distortion.experiments.models import get_layer, load_model
    from distortion.experiments.sensitivity import gradient_grams
    from distortion.theory.multilayer import multilayer_distortion

    data = load_dataset(str(_paths.shared_dir() / "data/cifar10/test.npz"), n=args.n)
    model = load_model(args.model)
    quantizers = quantizer_grid(bits)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        grams = gradient_grams(model, data, granularity="channel", cache_dir=cache,
                               progress=False)  # fmt: skip
        t_grams = time.perf_counter() - t0
    names = list(grams.layer_names)
    weights = {n: get_layer(model, n).weight.detach() for n in names}

    t0 = time.perf_counter()
    predictions = []
    for q in quantizers:
        m2 = [q.compress(weights[n]).error_model.second_moment for n in names]  # (eq. E1)
        predictions.append(multilayer_distortion(grams, m2))
    t_predict = time.perf_counter() - t0

    logits = predict_logits(model, data, progress=False)
    t0 = time.perf_counter()
    measured = [
        measure(model, data, q, layers=names, reference_logits=logits, progress=False)
        for q in quantizers
    ]
    t_measure = time.perf_counter() - t0

    err = np.array(
        [abs(p.flip_rate - m.flip_rate) for p, m in zip(predictions, measured, strict=True)]
    )
    inside = np.array(
        [p.flip_band().low <= m.flip_rate <= p.flip_band().high
         for p, m in zip(predictions, measured, strict=True)]
    )  # fmt: skip
    cells = len(quantizers)
    print(f"{args.model}, {args.n} images, {len(names)} layers, {cells} cells "
          f"(bits {bits} x per tensor/channel)")  # fmt: skip
    print(f"gradient Grams (once, cold cache):  {t_grams:8.2f} s")
    print(
        f"prediction of all cells:            {t_predict:8.3f} s "
        f"({1e3 * t_predict / cells:.1f} ms per cell)"
    )
    print(
        f"brute-force measurement, all cells: {t_measure:8.2f} s "
        f"({t_measure / cells:.2f} s per cell)"
    )
    print(f"ratio measurement / prediction:          {t_measure / t_predict:10.1f}x")
    print(f"ratio measurement / (Grams + prediction): {t_measure / (t_grams + t_predict):9.2f}x")
    print(
        f"fidelity: mean |flip error| {100 * err.mean():.2f} pp, "
        f"median {100 * np.median(err):.2f} pp; measured inside band {inside.mean():.0%}"
    )
    for q, p, m in zip(quantizers, predictions, measured, strict=True):
        print(
            f"  {q.granularity:7s} {q.bits} bits: predicted {p.flip_rate:.4f} "
            f"[{p.flip_band().low:.4f}, {p.flip_band().high:.4f}]  measured {m.flip_rate:.4f}"
        )


if __name__ == "__main__":
    main()
