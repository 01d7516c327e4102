"""One-time cost of the per-sample Grams against the physical floor of the method.

For each model, in one run and on the same first ``--n`` CIFAR-10 test images, each in a
fresh subprocess (so that its peak resident memory is its own):

* ``floor(p)``: one forward pass plus p backward passes with parameter gradients (what
  autograd does for p scalar losses), at the Grams' batch size: p = K = 10 (the full
  Grams' passes) and p = m (the nearest-competitor Grams' margins);
* ``full``: :func:`~distortion.experiments.sensitivity.gradient_grams` with all K classes
  (today's default: K backward passes, the K x K Grams);
* ``m=<m>,P=<P>``: ``gradient_grams(..., competitors=m, tail_probes=P)`` (m + P passes,
  eq. L17-L18 of ``theory/multilayer.md``).

Prints seconds, peak RSS, and the ratios ``full / floor(K)``, ``m / floor(m)`` and
``m / full``, with ``uptime`` before and after (ratios measured side by side in one run;
the absolute times depend on the machine's load).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_grams.py --n 2000
    python benchmarks/bench_grams.py --models resnet20 --n 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int):
    import torch

    from distortion.experiments.data import load_dataset

    data = Path(os.environ.get("DISTORTION_DATA", ROOT.parent / "shared"))
    ds = load_dataset(str(data / "data" / "cifar10" / "test.npz"), n=n)
    x = torch.cat([b[0] for b in ds.batches(500)])
    return x, torch.as_tensor(ds.labels, dtype=torch.int64)


def _worker(model_name: str, n: int, what: str, threads: int) -> dict:
    import torch

    from distortion.experiments.models import load_model
    from distortion.experiments.sensitivity import gradient_grams

    torch.set_num_threads(threads)
    model = load_model(model_name)
    x, y = _images(n)
    kind, _, arg = what.partition(":")
    if kind == "floor":
        passes, batch = (int(v) for v in arg.split(","))
        params = [p for p in model.parameters() if p.requires_grad]
        t = time.perf_counter()
        for i in range(0, n, batch):
            z = model(x[i : i + batch])
            for c in range(passes):
                torch.autograd.grad(z[:, c].sum(), params, retain_graph=c < passes - 1)
        seconds = time.perf_counter() - t
        meta = {"batch_size": batch, "backward_passes": passes}
    else:
        kw = {"cache": False, "progress": False, "n_realizations": 40}
        if kind == "trunc":
            m, p = (int(v) for v in arg.split(","))
            kw.update(competitors=m, tail_probes=p)
        t = time.perf_counter()
        g = gradient_grams(model, (x, y), **kw)
        seconds = time.perf_counter() - t
        meta = {k: g.meta[k] for k in ("batch_size", "backward_passes")}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"seconds": seconds, "peak_rss_mb": rss, **meta}


def _run(model: str, n: int, what: str, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", model, str(n), what, str(threads)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, model, n, what, threads = sys.argv
        print(json.dumps(_worker(model, int(n), what, int(threads))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--m", type=int, default=3, help="competitors kept (default 3)")
    ap.add_argument("--probes", type=int, default=2, help="tail probes (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"before: {_uptime()}")
    for model in args.models:
        res = {"full": _run(model, args.n, "full", args.threads)}
        res[f"m={args.m},P={args.probes}"] = _run(
            model, args.n, f"trunc:{args.m},{args.probes}", args.threads
        )
        res[f"m={args.m},P=0"] = _run(model, args.n, f"trunc:{args.m},0", args.threads)
        bf = res["full"]["batch_size"]
        bt = res[f"m={args.m},P={args.probes}"]["batch_size"]
        res["floor(K)"] = _run(model, args.n, f"floor:10,{bf}", args.threads)
        res["floor(m)"] = _run(model, args.n, f"floor:{args.m},{bt}", args.threads)
        print(f"\n{model}, {args.n} images, {args.threads} threads")
        print(f"{'':14s} {'seconds':>9s} {'passes':>7s} {'batch':>6s} {'peak RSS MB':>12s}")
        for k, r in res.items():
            print(
                f"{k:14s} {r['seconds']:9.2f} {r['backward_passes']:7d} {r['batch_size']:6d} "
                f"{r['peak_rss_mb']:12.0f}"
            )
        full = res["full"]["seconds"]
        fk, fm = res["floor(K)"]["seconds"], res["floor(m)"]["seconds"]
        for k in (f"m={args.m},P={args.probes}", f"m={args.m},P=0"):
            s = res[k]["seconds"]
            print(f"{k}: / floor(m) = {s / fm:.2f}   / full = {s / full:.2f}")
        print(f"full: / floor(K) = {full / fk:.2f}")
    print(f"\nafter: {_uptime()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
