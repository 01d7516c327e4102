"""Prediction from cached Grams vs one brute-force evaluation, one configuration per family.

For ResNet-56 (every layer compressed) and N evaluation images, per compression family one
configuration is

- predicted: compress every layer and evaluate the first-order model with the error models
  (what :func:`~distortion.experiments.compare_compression.predict_compression` does: the
  compressors, then ``multilayer_distortion`` with its band) from the Grams already
  cached — median of ``--repeats`` (20) runs, the compression and the closed form timed
  apart, and the first run on its own (``first``: for SVD it computes the decompositions,
  which later configurations of the same weights reuse). Each run is priced as a new
  configuration: the Grams' per-channel contractions, which a repeated (or proportional)
  variance vector would reuse, are cleared before it (``--reuse-contractions`` keeps them,
  the cost of re-predicting the same configuration);
- measured by brute force, once: the same compression, the compressed network run on the
  same N images.

Prints both, their ratio, and the machine's load (``uptime``) before and after, since the
timings of a shared machine depend on it. The Grams are computed (or read from the cache,
``--cache-dir``) first and their time reported separately.

Usage::

    python benchmarks/bench_compression.py --model resnet56 --n 2000
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:  # pragma: no cover
        return "uptime unavailable"


def configurations(model, names):
    from distortion.compressors import (
        Compose,
        KMeansQuantizer,
        LowRank,
        MagnitudePruner,
        NonUniformQuantizer,
        ResidualExpansion,
    )
    from distortion.experiments.models import get_layer
    from distortion.quantize import UniformQuantizer

    nm = MagnitudePruner(None, pattern="n:m")
    fits = {k: nm for k in names if get_layer(model, k).weight[0].numel() % 4 == 0}
    return [
        ("prune-layer 50%", MagnitudePruner(0.5)),
        ("prune-global 50%", MagnitudePruner(0.5, scope="global")),
        ("prune-2:4", fits),
        ("prune-filter 30%", MagnitudePruner(0.3, pattern="filter")),
        ("svd-energy 0.9", LowRank(energy=0.9)),
        ("kmeans 16", KMeansQuantizer(16)),
        ("power 4 bits", NonUniformQuantizer(4, grid="power", granularity="channel")),
        ("log2 4 bits", NonUniformQuantizer(4, grid="log2", granularity="channel")),
        ("nf4", NonUniformQuantizer(4, grid="nf4", granularity="channel")),
        ("rex 3 bits x 2", ResidualExpansion(3, order=2, granularity="channel")),
        ("prune50+uniform4", Compose(MagnitudePruner(0.5), UniformQuantizer(4))),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--n", type=int, default=2000, help="evaluation images")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--reuse-contractions", action="store_true",
                    help="keep the per-channel contractions between repeats")  # fmt: skip
    args = ap.parse_args()

    from distortion.experiments import _paths
    from distortion.experiments.compare_compression import (
        compress_layers,
        compressed_model,
    )
    from distortion.experiments.data import load_dataset
    from distortion.experiments.measure import predict_logits
    from distortion.experiments.models import get_layer, load_model
    from distortion.experiments.sensitivity import gradient_grams
    from distortion.theory.multilayer import multilayer_distortion

    print("load before:", _uptime())
    data = load_dataset(str(_paths.shared_dir() / "data/cifar10/test.npz"), n=args.n)
    model = load_model(args.model)
    t0 = time.perf_counter()
    grams = gradient_grams(model, data, granularity="channel", cache_dir=args.cache_dir,
                           progress=False)  # fmt: skip
    t_grams = time.perf_counter() - t0
    t0 = time.perf_counter()
    grams = gradient_grams(model, data, granularity="channel", cache_dir=args.cache_dir,
                           progress=False)  # fmt: skip
    t_load = time.perf_counter() - t0
    names = list(grams.layer_names)
    weights = {k: get_layer(model, k).weight.detach() for k in names}
    logits = predict_logits(model, data, progress=False)
    pred = logits.argmax(1)
    print(
        f"{args.model}, {args.n} images, {len(names)} layers; Grams {t_grams:.1f} s "
        f"(first call: computed, or read if cached), read from the cache {t_load:.2f} s"
    )
    header = (
        f"{'configuration':18s} {'first':>8s} {'compress':>9s} {'closed form':>11s} "
        f"{'predict':>9s} {'brute force':>11s} {'ratio':>7s} {'pred. flip':>10s} "
        f"{'meas. flip':>10s}"
    )
    print(header)  # fmt: skip
    for label, comp in configurations(model, names):
        t_comp, t_pred = [], []
        for _ in range(args.repeats):
            if not args.reuse_contractions:
                grams._contractions.clear()  # a new configuration streams its channels
            t0 = time.perf_counter()
            compressed = compress_layers(comp, weights)
            t1 = time.perf_counter()
            m2 = [compressed[k].error_model.second_moment for k in names]
            res = multilayer_distortion(grams, m2, band=grams.projections is not None)
            t2 = time.perf_counter()
            t_comp.append(t1 - t0)
            t_pred.append(t2 - t0)  # compression + closed form
        t0 = time.perf_counter()
        compressed = compress_layers(comp, weights)
        cm = compressed_model(model, compressed)
        measured = float((predict_logits(cm, data, progress=False).argmax(1) != pred).mean())
        t_brute = time.perf_counter() - t0
        c, p = statistics.median(t_comp), statistics.median(t_pred)
        print(f"{label:18s} {t_pred[0]:7.3f}s {c:8.3f}s {p - c:10.3f}s {p:8.3f}s "
              f"{t_brute:10.2f}s {t_brute / p:6.1f}x {res.flip_rate:10.4f} "
              f"{measured:10.4f}")  # fmt: skip
    print("load after: ", _uptime())


if __name__ == "__main__":
    main()
