"""Beyond uniform rounding: every compression family, all layers, predicted and measured.

For each model, every quantizable layer is compressed by each configuration of the grid
below and the compressed network is run on the all-layer evaluation images of the default
experiment (``experiments/default.toml``: the first ``--n`` images of the evaluation half of
its stratified split, so the gradient Grams are those of ``distortion run``). Per
configuration: the measured flip rate and accuracy loss (level 4), the linearized network
moved by the actual perturbation (2L), the first-order model with the compressor's error
model as noise (3L, with the band of one realization) and the noise checks of
:mod:`distortion.experiments.compare_compression`.

The grid (families and their strength parameter):

* ``prune-layer`` / ``prune-global`` — unstructured magnitude pruning, sparsity 0.1..0.9,
  per layer or one global ranking;
* ``prune-2:4`` — 2:4 semi-structured, on every layer whose rows have a multiple of 4
  entries (the first convolution's 27 do not: it stays float);
* ``prune-filter`` — output-channel (L1) pruning, 0.1..0.5 of the filters of every layer;
* ``svd-energy`` — truncated SVD keeping 0.3..0.9 (and 0.95, 0.99) of the energy;
* ``kmeans`` — weight sharing with 4..64 clusters per layer;
* ``power`` / ``log2`` / ``nf4`` — non-uniform grids, per channel, 3..8 bits (NF4: 4);
* ``rex-o<K>`` — residual expansion of order K = 1..3 with 2..4-bit per-channel terms
  (strength: bits);
* ``prune50+uniform4`` — 50 % unstructured pruning, then 4-bit symmetric per-tensor rounding.

Prints, per model and family, the band coverage and the mean absolute flip-rate error of 2L
and 3L over the cells whose measured flip rate is at most ``--max-flip`` (20 %), and where the
family breaks (:func:`~distortion.experiments.compare_compression.compression_summary`);
writes the table (``compression.csv``/``.json``), the summary and ``columns.md`` to
``--out``.

Usage::

    OMP_NUM_THREADS=2 python experiments/compression_study.py --models resnet20 --n 500
    python experiments/compression_study.py --quick          # 3 configurations, smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from distortion.experiments import _paths  # noqa: E402

OUT_DIR = ROOT / "experiments" / "results" / "compression"


def grid(model, names: list[str], *, quick: bool = False) -> list[tuple[str, float, object]]:
    """The (family, strength, compressor) configurations of the study
    (:func:`~distortion.experiments.compare_compression.compression_grid`)."""
    from distortion.compressors import KMeansQuantizer, LowRank, MagnitudePruner
    from distortion.experiments.compare_compression import compression_grid

    if quick:
        return [
            ("prune-layer", 0.5, MagnitudePruner(0.5)),
            ("svd-energy", 0.9, LowRank(energy=0.9)),
            ("kmeans", 16, KMeansQuantizer(16)),
        ]
    return compression_grid(model, names)


def evaluation_images(n: int, calibration: int = 0):
    """The all-layer evaluation images of the default experiment (its first ``n``); with
    ``calibration``, also the first ``calibration`` images of its fit part (disjoint)."""
    from distortion.experiments.data import load_dataset
    from distortion.experiments.pipeline import _evaluation_images, fit_evaluate_mask

    cfg = tomllib.loads((ROOT / "experiments" / "default.toml").read_text())
    data = cfg["data"]
    source = Path(data["source"])
    if not source.is_absolute():
        source = _paths.shared_dir() / source
    ds = load_dataset(str(source), n=data.get("n"))
    first = fit_evaluate_mask(
        ds.labels, len(ds.class_names), data.get("fit_fraction", 0.5), data.get("seed", 0)
    )
    images = _evaluation_images(ds, ~first, n)
    if not calibration:
        return images, int(data.get("seed", 0))
    from distortion.experiments.pipeline import select_images

    cal = select_images(ds, np.flatnonzero(first)[:calibration], f"calibration:{calibration}")
    return images, int(data.get("seed", 0)), cal


def _print_cells(t: pd.DataFrame) -> None:
    cols = [
        "family", "strength", "relative_error_energy", "measured_flip_rate", "L2L_flip_rate",
        "L3L_flip_rate", "L3L_flip_rate_low", "L3L_flip_rate_high", "L3L_flip_rate_in_band",
        "noise_in_band", "noise_energy_ratio",
    ]  # fmt: skip
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(t[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--n", type=int, default=500, help="evaluation images (default 500)")
    ap.add_argument("--quick", action="store_true", help="3 configurations, a smoke run")
    ap.add_argument("--families", nargs="+", help="only these families (default: all)")
    ap.add_argument("--max-flip", type=float, default=0.2, help="summary: measured flip <= this")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument(
        "--bias-correction", type=int, default=0, metavar="N",
        help="compress with bias correction (theory/multilayer.md eq. L22), calibrated on the "
        "first N images of the default split's fit part",
    )  # fmt: skip
    args = ap.parse_args(argv)

    from distortion.experiments.compare import COLUMN_DICTIONARY, Comparison
    from distortion.experiments.compare_compression import (
        COMPRESSION_COLUMNS,
        compare_compression,
        compression_summary,
    )
    from distortion.experiments.models import load_model
    from distortion.experiments.sensitivity import gradient_grams

    images, seed, *cal = evaluation_images(args.n, args.bias_correction)
    parts = []
    for name in args.models:
        t0 = time.perf_counter()
        model = load_model(name)
        means = None
        if cal:
            from distortion.experiments.bias_correction import input_means

            means = input_means(model, cal[0], progress=args.progress)
        grams = gradient_grams(model, images, granularity="channel", seed=seed,
                               cache_dir=args.cache_dir, progress=args.progress,
                               input_means=means)  # fmt: skip
        t_grams = time.perf_counter() - t0
        configs = grid(model, list(grams.layer_names), quick=args.quick)
        if args.families:
            configs = [c for c in configs if c[0] in args.families]
        t0 = time.perf_counter()
        res = compare_compression(
            model, images, configs, model_name=name, cache_dir=args.cache_dir, seed=seed,
            progress=args.progress, bias_correction=means,
        )  # fmt: skip
        t_cells = time.perf_counter() - t0
        print(f"\n== {name}: {len(grams.layer_names)} layers, {len(images)} images, "
              f"{len(configs)} configurations; Grams {t_grams:.1f} s (cached or not), "
              f"cells {t_cells:.1f} s")  # fmt: skip
        _print_cells(res.table)
        parts.append(res)
        Comparison.concat(parts).save(args.out, name="compression")
    comparison = Comparison.concat(parts)
    paths = comparison.save(args.out, name="compression")
    summary = compression_summary(comparison, max_flip_rate=args.max_flip)
    summary.to_csv(args.out / "compression_summary.csv", index=False)
    lines = ["| column | meaning |", "|---|---|"] + [
        f"| `{k}` | {v} |" for k, v in {**COLUMN_DICTIONARY, **COMPRESSION_COLUMNS}.items()
    ]
    (args.out / "columns.md").write_text("\n".join(lines) + "\n")
    print(f"\n== summary over cells with measured flip rate <= {args.max_flip:g}")
    with pd.option_context("display.width", 220, "display.max_rows", 500):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nwrote {paths['csv']} and {args.out / 'compression_summary.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
