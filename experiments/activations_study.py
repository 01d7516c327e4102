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

Nothing is tuned on the evaluation images. Writes, per model, ``activations.csv``,
``activations_summary.txt`` and the split of every cell (JSON and PDF) under ``--out/<model>``.
The same study runs as ``distortion run --config experiments/activations.toml``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "results" / "activations"
GRID = [(8, 8), (6, 6), (4, 8), (8, 4), (4, 4)]  # the default of compare_activations


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


def run_model(name: str, cal, ev, out: Path, cache_dir, progress: bool, dither: int = 0):
    """One model: :func:`distortion.experiments.compare_activations.compare_activations`
    (the function of ``distortion run --config experiments/activations.toml``), printed and
    saved under ``out/<name>``."""
    from distortion.experiments.compare_activations import compare_activations
    from distortion.experiments.models import load_model

    t0 = time.perf_counter()
    st = compare_activations(load_model(name), cal, ev, model_name=name, grid=GRID,
                             n_dither=dither, cache_dir=cache_dir, progress=progress)  # fmt: skip
    print(f"\n== {name} ({time.perf_counter() - t0:.0f} s)")
    print(st.summary())
    for key, split in st.splits.items():
        if "int8" in key:
            top = split.parts.sort_values("noise_share", ascending=False).head(8)
            print(f"\n{key}: the eight largest parts of the logit noise")
            print(top.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    st.save(out / name)
    return st


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--n", type=int, default=2000, help="evaluation images (default 2000)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--dither", type=int, default=0, metavar="R",
                    help="runs of level 3N for the activations per grid cell (default 0)")
    args = ap.parse_args(argv)
    cal, ev = split_images(args.n)
    from distortion.experiments.activation_grams import check_disjoint

    check_disjoint(cal, ev)  # calibration and evaluation images never overlap
    args.out.mkdir(parents=True, exist_ok=True)
    from distortion.experiments.compare_activations import ActivationStudy

    st = ActivationStudy.concat(
        [run_model(m, cal, ev, args.out, args.cache_dir, args.progress, args.dither)
         for m in args.models]
    )
    cov, miss = st.coverage()
    print(f"\nband coverage over the cells with measured flip rate <= 20 %: {cov:.3f}; "
          f"misses: {', '.join(miss) or 'none'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
