"""Clipping the largest weights: measured flips against three error models (issue 14).

Every quantizable layer of each model is quantized at ``--bits`` (4) bits per output
channel, symmetric, nearest rounding, with each variant

* ``max x<r>`` — narrow codes -7..7, step r * max|w| / 7 for r in 1.03, 1.0, 0.97, 0.933
  (r < 1 clips each channel's largest weights, r > 1 leaves headroom);
* ``full`` — PyTorch's per-channel symmetric convention, codes -8..7, step 2 max|w| / 15
  (the positive maximum is clipped to 14/15 of itself);
* ``mse`` — the range that minimizes each channel's squared error,

and run on the all-layer evaluation images of the default experiment (the first ``--n``
images of the evaluation half of its stratified split, as ``compression_study.py``; nothing
is fitted on them). Per variant: the mean squared error, the measured flips (level 4), the
linearized network moved by the actual error (2L), today's Delta^2/12 noise model (3L) and the
clipping-aware model of ``theory/error_models.md`` eq. E5-E7 (3C: the clipped entries' exact
error as a known logit shift, rounding noise on the others), with the 95 % band of one
realization and whether the measured rate lies in it; then Spearman's rank correlation of
each model's flip rate with the measured one, over all variants and over the acceptance set
(the four ratios and ``full``).

Usage::

    OMP_NUM_THREADS=2 python experiments/clipping_study.py                  # ResNet-20, 2000
    OMP_NUM_THREADS=2 python experiments/clipping_study.py --models resnet20 resnet56
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "experiments"):  # run as a script from anywhere
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

OUT_DIR = ROOT / "experiments" / "results" / "clipping"
#: The variants the acceptance criterion orders (issue 14).
ACCEPTANCE = ("max x1.03", "max x1", "max x0.97", "max x0.933", "full")


def _band(row: pd.Series, level: str) -> str:
    lo, hi = row[f"{level}_flip_rate_low"], row[f"{level}_flip_rate_high"]
    return "-" if pd.isna(lo) else f"[{lo:.4f}, {hi:.4f}]"


def format_table(frame: pd.DataFrame) -> str:
    """The study's table: one line per variant."""
    rows = []
    for _, r in frame.iterrows():
        n = int(r["n_eval"])
        row = {
            "variant": r["variant"],
            "mse": f"{r['error_mean_square_actual']:.4e}",
            "clipped": f"{r['clipped_fraction']:.4f}",
            "flips": f"{int(r['measured_flips'])}/{n}",
            "measured": f"{r['measured_flip_rate']:.4f}",
            "measured_ci": (
                f"[{r['measured_flip_rate_low']:.4f}, {r['measured_flip_rate_high']:.4f}]"
            ),
            "2L": f"{r['L2L_flip_rate']:.4f}",
            "rho": f"{r['noise_energy_ratio']:.2f}",
        }
        for lv in ("L3L", "L3C"):
            row[lv[1:]] = f"{r[f'{lv}_flip_rate']:.4f}"
            row[f"{lv[1:]}_band"] = _band(r, lv)
            row[f"{lv[1:]}_in"] = "yes" if bool(r[f"{lv}_flip_rate_in_band"]) else "no"
        rows.append(row)
    return pd.DataFrame(rows).to_string(index=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20"])
    ap.add_argument("--n", type=int, default=2000, help="evaluation images (default 2000)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)

    from compression_study import evaluation_images

    from distortion.experiments.clipping import clipping_variants, compare_clipping
    from distortion.experiments.models import load_model

    images, seed = evaluation_images(args.n)
    variants = clipping_variants(args.bits, granularity="channel")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        t0 = time.perf_counter()
        model = load_model(name)
        res = compare_clipping(model, images, variants, model_name=name, seed=seed,
                               cache_dir=args.cache_dir, progress=args.progress)  # fmt: skip
        print(f"\n== {name}: all layers, {args.bits} bits per channel, {len(images)} evaluation "
              f"images ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        print(format_table(res.to_frame()))
        for label, subset in (("all variants", None), ("acceptance set", ACCEPTANCE)):
            order = res.order_agreement(subset)
            print(f"\norder agreement with the measured flip rates ({label}, "
                  f"{int(order['variants'].iloc[0])} variants):")  # fmt: skip
            print(order.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        res.comparison.save(args.out, name=f"clipping_{name}")
        print(f"wrote {args.out / f'clipping_{name}.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
