"""Throughput of penultimate-feature extraction on this CPU (ResNet-20 and -56, CIFAR-10).

Runs :func:`distortion.experiments.features.extract_features` with the cache disabled on the
10 000 shared CIFAR-10 test images and prints, per model: images per second (wall clock and
per CPU-second, the latter less sensitive to other processes sharing the machine), the top-1
accuracy and ``max |W x + b - logits|``. The machine's load average is printed before and
after, since the wall-clock figure is only meaningful on an otherwise idle machine.

Usage::

    python benchmarks/bench_extract.py                      # default torch threads
    python benchmarks/bench_extract.py --models resnet20 --n 2000 --batch-size 128
    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py    # single-threaded

Data: ``$DISTORTION_DATA`` (default ``<repo>/../shared``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,resnet56", help="comma-separated names")
    p.add_argument("--n", type=int, default=None, help="first N images (default: all 10 000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per model (best kept)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import numpy as np
    import torch

    from distortion.experiments.data import load_dataset
    from distortion.experiments.features import extract_features
    from distortion.experiments.models import load_model

    shared = Path(os.environ.get("DISTORTION_DATA", root.parent / "shared"))
    npz = shared / "data" / "cifar10" / "test.npz"
    if not npz.is_file():
        print(f"error: {npz} not found; set DISTORTION_DATA to the shared-data folder")
        return 2
    dataset = load_dataset(npz, n=args.n)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
        f"{os.cpu_count()} CPUs, {len(dataset)} images, batch size {args.batch_size}, "
        f"load average before {os.getloadavg()[0]:.2f}"
    )
    for name in args.models.split(","):
        model = load_model(name, shared / "models" / "cifar10-resnet" / _checkpoint(name))
        with torch.inference_mode():  # warm-up (oneDNN primitive creation)
            model(torch.zeros(16, 3, 32, 32).contiguous(memory_format=torch.channels_last))
        best = None
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            fs = extract_features(
                model, dataset, batch_size=args.batch_size, cache=False, progress=False
            )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if best is None or wall < best[0]:
                best = (wall, cpu)
        wall, cpu = best
        err = float(np.max(np.abs(fs.linear_logits() - fs.logits)))
        print(
            f"{name:9s} {len(fs) / wall:7.0f} images/s wall ({wall:6.1f} s), "
            f"{len(fs) / cpu:7.0f} images per CPU-second; top-1 {100 * fs.accuracy:.2f} %, "
            f"max |W x + b - logits| = {err:.2e}"
        )
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


def _checkpoint(name: str) -> str:
    from distortion.experiments.models import MODELS

    return MODELS[name].checkpoint


if __name__ == "__main__":
    sys.exit(main())
