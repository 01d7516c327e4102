"""Sharded feature extraction and gradient Grams of ResNet-20: 1 process against 2.

Launches ``python -m torch.distributed.run --standalone --nproc_per_node P`` on this script
for each P in ``--procs`` (default 1 and 2; gloo on CPU, NCCL on GPUs) with an empty cache,
times :func:`~distortion.experiments.distributed.sharded_extract_features` and
:func:`~distortion.experiments.distributed.sharded_gradient_grams` on the first ``--n``
CIFAR-10 test images (from process start to the merged result, the launch and the imports
excluded), checks that the merged results agree bit for bit between the runs, and prints
the times, the speed-up ``t(1) / t(P)`` and ``uptime`` before and after (the wall-clock
figures only mean something on an otherwise idle machine with at least P free cores).

Usage::

    python benchmarks/bench_distributed.py                 # N = 2000, 1 vs 2 processes
    python benchmarks/bench_distributed.py --n 200 --procs 1,2,4

Every process runs with ``OMP_NUM_THREADS=1`` (torchrun's default) unless ``--threads``.
Data: ``$DISTORTION_DATA`` (default ``<repo>/../shared``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--n", "--images", dest="n", type=int, default=2000, help="first N images (default 2000)"
    )
    p.add_argument("--procs", default="1,2", help="comma-separated process counts")
    p.add_argument("--batch-size", type=int, default=50, help="extraction and Gram batches")
    p.add_argument("--n-realizations", type=int, default=8, help="error draws of the Grams")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:  # pragma: no cover
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _worker(args) -> int:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from distortion.experiments import distributed as D
    from distortion.experiments.data import load_dataset
    from distortion.experiments.models import MODELS, load_model

    ctx = D.init_distributed()
    shared = Path(os.environ.get("DISTORTION_DATA", ROOT.parent / "shared"))
    data = load_dataset(shared / "data" / "cifar10" / "test.npz", n=args.n)
    model = load_model(
        "resnet20", shared / "models" / "cifar10-resnet" / MODELS["resnet20"].checkpoint
    )
    out = Path(args.worker)
    times = {}
    D._barrier(ctx)
    t = time.perf_counter()
    fs = D.sharded_extract_features(
        model, data, cache_dir=out / "cache", batch_size=args.batch_size
    )
    times["features"] = time.perf_counter() - t
    D._barrier(ctx)
    t = time.perf_counter()
    gg = D.sharded_gradient_grams(
        model, data, cache_dir=out / "cache", batch_size=args.batch_size,
        n_realizations=args.n_realizations, load_merged=False,
    )  # fmt: skip
    times["grams"] = time.perf_counter() - t
    if ctx.is_main:
        np.savez(out / "result.npz", features=fs.features, grams=gg.grams,
                 projections=gg.projections)  # fmt: skip
        (out / "times.json").write_text(json.dumps({**times, "world": ctx.world_size}))
    D.shutdown_distributed()
    return 0


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        return _worker(args)
    import numpy as np

    procs = [int(p) for p in args.procs.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    print(f"ResNet-20, {args.n} CIFAR-10 test images, batch size {args.batch_size}, "
          f"R = {args.n_realizations}, {args.threads} thread(s) per process, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(f"uptime before: {_uptime()}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        for p in procs:
            out = Path(tmp) / f"p{p}"
            out.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={p}", __file__, "--images", str(args.n),
                   "--batch-size", str(args.batch_size),
                   "--n-realizations", str(args.n_realizations), "--worker", str(out)]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
                return 1
            times = json.loads((out / "times.json").read_text())
            with np.load(out / "result.npz") as z:
                arrays = {k: z[k] for k in z.files}
            results[p] = (times, arrays)
            print(f"{p} process(es): features {times['features']:7.2f} s, "
                  f"Grams {times['grams']:7.2f} s  [{_uptime()}]", flush=True)  # fmt: skip
    base_t, base_a = results[procs[0]]
    for p in procs[1:]:
        t, a = results[p]
        same = all(np.array_equal(a[k], base_a[k]) for k in base_a)
        print(f"speed-up {procs[0]} -> {p} processes: features "
              f"{base_t['features'] / t['features']:.2f}x, Grams "
              f"{base_t['grams'] / t['grams']:.2f}x; bit for bit equal: {same}")  # fmt: skip
    print(f"uptime after: {_uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
