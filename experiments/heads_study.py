"""Several heads on one backbone, and multi-label sigmoid outputs: predicted against measured.

The network: ResNet-20's backbone (the shared CIFAR-10 weights) with three heads on its
64 features —

* ``class10``: its own 10-class linear layer;
* ``animal_vehicle``: a 2-class softmax head (vehicle = airplane, automobile, ship, truck);
* ``attributes``: a 3-label sigmoid head (vehicle; flies = airplane, bird; four legs = cat,
  deer, dog, horse), each label deciding on its own (z_l > 0).

The two new heads are fitted (L-BFGS, cross-entropy) on the features of the fit half of the
default experiment's stratified split; every prediction (level 3L, all layers, fitted per
output on the evaluation images as ``distortion run`` does) and every measurement is on the
first ``--n`` images of the evaluation half. Every layer, backbone and heads, is quantized.
Prints one row per output and bit-width: predicted flip rate and its 95 % band, measured
flips, and whether the measurement lies in the band; then the coverage per output.

Usage::

    OMP_NUM_THREADS=2 python experiments/heads_study.py --n 500
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from experiments.compression_study import evaluation_images  # noqa: E402

VEHICLE = (0, 1, 8, 9)
FLIES = (0, 2)
FOUR_LEGS = (3, 4, 5, 7)


def attributes(y: np.ndarray) -> np.ndarray:
    """The three 0/1 attributes of CIFAR-10 classes, shape (N, 3)."""
    return np.stack([np.isin(y, s) for s in (VEHICLE, FLIES, FOUR_LEGS)], axis=1).astype(np.int64)


def build(seed: int = 0):
    """The three-head network (eval mode) with its new heads fitted on the fit half."""
    import torch
    from torch import nn

    from distortion.experiments.data import load_dataset
    from distortion.experiments.models import load_model
    from distortion.experiments.pipeline import fit_evaluate_mask

    backbone = load_model("resnet20")
    cls = backbone.linear
    backbone.linear = nn.Identity()
    ds = load_dataset(str(ROOT.parent / "shared" / "data" / "cifar10" / "test.npz"))
    fit = fit_evaluate_mask(ds.labels, len(ds.class_names), 0.5, seed)
    with torch.no_grad():
        f = torch.cat([backbone(x) for x, _ in ds.batches(500)])[torch.as_tensor(fit)]
    y = np.asarray(ds.labels)[fit]
    torch.manual_seed(seed)
    av, ml = nn.Linear(64, 2), nn.Linear(64, 3)
    t_av = torch.as_tensor(np.isin(y, VEHICLE).astype(np.int64))
    t_ml = torch.as_tensor(attributes(y), dtype=torch.float32)
    for head, loss in (
        (av, lambda h: nn.functional.cross_entropy(h(f), t_av)),
        (ml, lambda h: nn.functional.binary_cross_entropy_with_logits(h(f), t_ml)),
    ):
        opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure(head=head, loss=loss, opt=opt):
            opt.zero_grad()
            v = loss(head) + 1e-4 * head.weight.square().sum()
            v.backward()
            return v

        opt.step(closure)

    class ThreeHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.class10, self.animal_vehicle, self.attributes = (
                backbone, cls, av, ml,
            )  # fmt: skip

        def forward(self, x):
            h = self.backbone(x)
            return {"class10": self.class10(h), "animal_vehicle": self.animal_vehicle(h),
                    "attributes": self.attributes(h)}  # fmt: skip

    return ThreeHeads().eval()


def main(argv: list[str] | None = None) -> int:
    import pandas as pd
    import torch

    from distortion.experiments.heads import OutputSpec, compare_outputs
    from distortion.quantize import UniformQuantizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 5, 6, 8])
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "heads")
    args = ap.parse_args(argv)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    model = build()
    images, seed = evaluation_images(args.n)
    x = torch.cat([b for b, _ in images.batches(500)])
    y = np.asarray(images.labels, dtype=np.int64)
    a = attributes(y)
    outputs = [
        OutputSpec("class10", y, head="class10"),
        OutputSpec("animal_vehicle", np.isin(y, VEHICLE).astype(np.int64), head="animal_vehicle"),
        *[OutputSpec(f"attributes[{i}]", a[:, i], head="attributes", label=i) for i in range(3)],
    ]
    qs = [UniformQuantizer(b, granularity=g) for g in ("tensor", "channel") for b in args.bits]
    res = compare_outputs(model, x, outputs, qs, seed=seed, progress=False)
    t = res.to_frame()
    args.out.mkdir(parents=True, exist_ok=True)
    t.to_csv(args.out / "heads.csv", index=False)
    pd.set_option("display.width", 200)
    cols = ["output", "granularity", "bits", "predicted_flip_rate", "predicted_flip_rate_low",
            "predicted_flip_rate_high", "measured_flips", "measured_flip_rate",
            "in_band"]  # fmt: skip
    print(t[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(t.groupby("output", sort=False)["in_band"].agg(["sum", "count"]).to_string())
    print(f"coverage {res.coverage():.3f} over {len(t)} cells, n = {args.n}")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
