"""Many classes at a cost independent of K: the nearest-competitor truncation (eq. L17-L20).

Two checks of :func:`~distortion.experiments.sensitivity.gradient_grams` with
``competitors=m`` against the full K x K Grams, on the same images in the same run:

1. **K = 10.** ResNet-20 and ResNet-56, all layers, the all-layer evaluation images of the
   default experiment (the first ``--n`` of its evaluation half), per tensor and per channel,
   bits 2..8: the predicted flip rate with m = 2, 3, 5 against the full Grams' (relative
   difference), the mean tail bound (eq. L19), and the one-time cost of each cache.
2. **K = 1 000.** ResNet-20's backbone with a 1 000-class linear head trained on its own
   features (the labels are 1 000 k-means clusters of the fit half's features, so the margins
   are those of a trained classifier); the layers of the last residual block and the head
   (the full K x K computation over all layers would not fit this machine's memory at
   K = 1 000); on ``--n1000`` evaluation images: the full Grams (1 000 backward passes per
   batch; the flip rate of the full Gaussian model by seeded Monte Carlo, since the radial
   integration in 999 dimensions does not fit in memory) against m = 3, 5, 10 (m + 2
   passes, radial integration on the kept classes), predicted flip rates and one-time costs.

Usage::

    OMP_NUM_THREADS=2 python experiments/truncation_study.py --n 500 --n1000 40
    python experiments/truncation_study.py --quick      # ResNet-20 only, few images
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from experiments.compression_study import evaluation_images  # noqa: E402


def _variances(grams, bits: int, granularity: str) -> list:
    from distortion.quantize import UniformQuantizer

    q = UniformQuantizer(bits, granularity=granularity)
    return [np.asarray(q.error_model(w).second_moment) for w in grams.weights]


def _predict(grams, bits: int, granularity: str):
    from distortion.theory.multilayer import multilayer_distortion

    return multilayer_distortion(grams, _variances(grams, bits, granularity), band=False)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def ten_classes(models: list[str], n: int, ms: list[int], bits: list[int]) -> pd.DataFrame:
    """Part 1: K = 10, full Grams against m nearest competitors."""
    from distortion.experiments.models import load_model
    from distortion.experiments.sensitivity import gradient_grams

    images, seed = evaluation_images(n)
    rows = []
    for name in models:
        model = load_model(name)
        for gran in ("tensor", "channel"):
            kw = {"granularity": gran, "n_realizations": 0, "cache": False, "progress": False}
            full, t_full = _timed(lambda: gradient_grams(model, images, **kw))  # noqa: B023
            caches = {}
            for m in ms:
                caches[m] = _timed(lambda: gradient_grams(model, images, competitors=m, **kw))  # noqa: B023
            for b in bits:
                rf = _predict(full, b, gran)
                for m, (g, t_m) in caches.items():
                    rt = _predict(g, b, gran)
                    rows.append({
                        "model": name, "granularity": gran, "bits": b, "m": m,
                        "flip_full": rf.flip_rate, "flip_truncated": rt.flip_rate,
                        "stderr_full": rf.flip_rate_stderr, "stderr_truncated": rt.flip_rate_stderr,
                        "rel_diff": (rt.flip_rate - rf.flip_rate) / rf.flip_rate,
                        "tail_bound": rt.truncation_bound,
                        "seconds_full": t_full, "seconds_truncated": t_m,
                        "passes_full": full.meta["backward_passes"],
                        "passes_truncated": g.meta["backward_passes"],
                    })  # fmt: skip
    return pd.DataFrame(rows)


def thousand_class_model(n_fit: int = 5000, k: int = 1000, seed: int = 0):
    """ResNet-20 with a 1 000-class linear head trained on k-means clusters of its features."""
    import torch
    from sklearn.cluster import MiniBatchKMeans
    from torch import nn

    from distortion.experiments.data import load_dataset
    from distortion.experiments.models import load_model
    from distortion.experiments.pipeline import fit_evaluate_mask

    model = load_model("resnet20")
    ds = load_dataset(str(ROOT.parent / "shared" / "data" / "cifar10" / "test.npz"))
    fit = fit_evaluate_mask(ds.labels, len(ds.class_names), 0.5, seed)
    feats = []
    hook = model.linear.register_forward_hook(lambda m, a, o: feats.append(a[0].detach()))
    with torch.no_grad():
        for x, _ in ds.batches(500):
            model(x)
    hook.remove()
    f = torch.cat(feats)[torch.as_tensor(fit)][:n_fit]
    labels = MiniBatchKMeans(k, random_state=seed, n_init=3, batch_size=2048).fit_predict(f.numpy())
    head = nn.Linear(f.shape[1], k)
    torch.manual_seed(seed)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    y = torch.as_tensor(labels, dtype=torch.int64)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(f), y) + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = float((head(f).argmax(1) == y).float().mean())
    model.linear = head
    return model.eval(), acc


def _monte_carlo_flip(grams, variances, *, n_draws: int = 4000, seed: int = 0):
    """Flip rate of the full-K Gaussian first-order model by seeded Monte Carlo (reference).

    The radial orthant integration of eq. L8-L10 in K - 1 = 999 dimensions needs Haar
    rotations of 999 x 999 per image (gigabytes); the reference draws the logit noise
    N(0, C_i) of eq. L4 instead and counts changed decisions; its standard error is that of
    the mean of N independent per-image Bernoulli averages.
    """
    from distortion.theory.multilayer import noise_covariance

    cov = noise_covariance(grams, variances)
    rng = np.random.default_rng([seed, 881])
    pred = grams.predictions()
    p = np.empty(grams.n_samples)
    for i in range(grams.n_samples):
        lam, vec = np.linalg.eigh(cov[i])
        root = vec * np.sqrt(np.clip(lam, 0.0, None))
        dz = rng.standard_normal((n_draws, root.shape[0])) @ root.T
        p[i] = np.mean(np.argmax(grams.logits[i] + dz, axis=1) != pred[i])
    se = float(np.sqrt(np.sum(p * (1 - p) / n_draws))) / grams.n_samples
    return float(np.mean(p)), se


def thousand_classes(n: int, ms: list[int], bits: list[int]) -> pd.DataFrame:
    """Part 2: K = 1 000 on the last block and the head."""
    from distortion.experiments.sensitivity import gradient_grams

    model, acc = thousand_class_model()
    print(f"1000-class head: training accuracy on its clusters {acc:.3f}")
    images, _ = evaluation_images(n)
    layers = ["layer3.2.conv1", "layer3.2.conv2", "linear"]
    kw = {"layers": layers, "n_realizations": 0, "cache": False, "progress": False}
    from distortion.experiments.distributed import merge_grams, shard_dataset

    def full_grams(chunk: int = 2):
        # a few images per call: the K x n Jacobians of one image are ~1 GB at K = 1 000
        return [
            gradient_grams(model, shard_dataset(images, a, min(a + chunk, n)), **kw)
            for a in range(0, n, chunk)
        ]

    parts, t_full = _timed(full_grams)
    full = merge_grams(parts)
    rows = []
    caches = {m: _timed(lambda: gradient_grams(model, images, competitors=m, **kw)) for m in ms}  # noqa: B023
    for b in bits:
        flip_full, se_full = _monte_carlo_flip(full, _variances(full, b, "tensor"), seed=b)
        for m, (g, t_m) in caches.items():
            rt = _predict(g, b, "tensor")
            rows.append({
                "bits": b, "m": m, "flip_full": flip_full, "flip_truncated": rt.flip_rate,
                "stderr_full": se_full, "stderr_truncated": rt.flip_rate_stderr,
                "rel_diff": (rt.flip_rate - flip_full) / flip_full,
                "tail_bound": rt.truncation_bound, "seconds_full": t_full, "seconds_truncated": t_m,
                "passes_full": full.meta["backward_passes"],
                "passes_truncated": g.meta["backward_passes"],
            })  # fmt: skip
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--n", type=int, default=500, help="K = 10 evaluation images")
    ap.add_argument("--n1000", type=int, default=40, help="K = 1 000 evaluation images")
    ap.add_argument("--skip-1000", action="store_true")
    ap.add_argument("--only-1000", action="store_true", help="part 2 only")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "truncation")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.n, args.n1000 = ["resnet20"], 50, 8
    args.out.mkdir(parents=True, exist_ok=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"load: {load}")
    pd.set_option("display.width", 200)
    if args.only_1000:
        t1k = thousand_classes(args.n1000, [3, 5, 10], [3, 4, 5, 6, 8])
        t1k.to_csv(args.out / "k1000.csv", index=False)
        print(t1k.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return 0
    t10 = ten_classes(args.models, args.n, [2, 3, 5], [2, 3, 4, 5, 6, 7, 8])
    t10.to_csv(args.out / "k10.csv", index=False)
    cols = ["model", "granularity", "bits", "m", "flip_full", "flip_truncated", "rel_diff",
            "tail_bound"]  # fmt: skip
    print(t10[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    cost = t10.groupby(["model", "granularity", "m"])[
        ["seconds_full", "seconds_truncated", "passes_full", "passes_truncated"]
    ].first()
    cost["ratio"] = cost.seconds_truncated / cost.seconds_full
    print(cost.to_string(float_format=lambda v: f"{v:.2f}"))
    for m in (2, 3, 5):
        s = t10[t10.m == m]
        worst = s.loc[s.rel_diff.abs().idxmax()]
        print(
            f"K=10, m={m}: max |rel diff| {s.rel_diff.abs().max():.4f} "
            f"({worst.model} {worst.granularity} {worst.bits} bits); cells within 2 %: "
            f"{int((s.rel_diff.abs() <= 0.02).sum())}/{len(s)}; at >= 4 bits: "
            f"{int((s[s.bits >= 4].rel_diff.abs() <= 0.02).sum())}/{int((s.bits >= 4).sum())}"
        )
    if not args.skip_1000:
        t1k = thousand_classes(args.n1000, [3, 5, 10], [3, 4, 5, 6, 8])
        t1k.to_csv(args.out / "k1000.csv", index=False)
        print(t1k.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
