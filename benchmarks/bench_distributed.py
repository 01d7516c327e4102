"""Sharded feature extraction and gradient Grams of ResNet-20, and the ImageNet path of
``distortion run --distributed``: 1 process against 2.

Launches ``python -m torch.distributed.run --standalone --nproc_per_node P`` on this script
for each P in ``--procs`` (default 1 and 2; gloo on CPU, NCCL on GPUs) with an empty cache,
times :func:`~distortion.experiments.distributed.sharded_extract_features` and
:func:`~distortion.experiments.distributed.sharded_gradient_grams` on the first ``--n``
CIFAR-10 test images (from process start to the merged result, the launch and the imports
excluded), checks that the merged results agree bit for bit between the runs, and prints
the times, the speed-up ``t(1) / t(P)`` and ``uptime`` before and after (the wall-clock
figures only mean something on an otherwise idle machine with at least P free cores).

Then (unless ``--no-imagenet``) the ImageNet path end to end: a generated ImageFolder of
1 000 class folders (16x16 PNG images: ``--imagenet-per-class`` in each of the first ten
classes, those of ``experiments/imagenet.toml``'s problems, one in each other), a
torchvision ResNet-18 with random weights saved to a file, and
``distortion run --config <imagenet.toml cut to the first --imagenet-n images> --distributed``
under 1 and P processes, timed from launch to exit (imports included), the two
``comparison.csv`` compared.

Usage::

    python benchmarks/bench_distributed.py                 # N = 2000, 1 vs 2 processes
    python benchmarks/bench_distributed.py --n 200 --procs 1,2,4 --no-imagenet

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
    p.add_argument("--no-imagenet", action="store_true", help="skip the ImageNet-path run")
    p.add_argument("--imagenet-n", type=int, default=400, help="images of the ImageNet run")
    p.add_argument("--imagenet-per-class", type=int, default=20,
                   help="images of each of the first ten classes")  # fmt: skip
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
    if not args.no_imagenet:
        status = _imagenet(args, procs, env)
        if status:
            return status
    print(f"uptime after: {_uptime()}")
    return 0


#: The first ten ImageNet classes (WordNet ids), the classes of imagenet.toml's problems.
_FIRST_TEN = (
    "n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
    "n01496331", "n01498041", "n01514668", "n01514859", "n01518878",
)  # fmt: skip


def _imagenet_config(path: Path, n: int) -> Path:
    """experiments/imagenet.toml with ResNet-18 only, the first ``n`` images, bits 4 and 8,
    H_U tested on the last layer."""
    import re

    text = (ROOT / "experiments" / "imagenet.toml").read_text()
    for pattern, repl in (
        (r"^n = 0 .*$", f"n = {n}"), (r'^names = .*$', 'names = ["resnet18"]'),
        (r"^bits = \[.*\]$", "bits = [4, 8]"), (r'^layers = "all"$', 'layers = "last"'),
    ):  # fmt: skip
        text = re.sub(pattern, repl, text, flags=re.M)
    path.write_text(text)
    return path


def _imagenet(args, procs: list[int], env: dict[str, str]) -> int:
    import pandas as pd
    import torch
    import torchvision

    from distortion.experiments.data import make_image_folder

    per = args.imagenet_per_class
    if args.imagenet_n < 10 * per:
        print(f"--imagenet-n must cover the first ten classes: at least {10 * per} images")
        return 2
    print(f"ImageNet path: ResNet-18 (random weights from a file), 1000 class folders "
          f"({per} images in each of the first ten, 1 in the others), the first "
          f"{args.imagenet_n} images, distortion run --distributed")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-imagenet-") as tmp:
        t = Path(tmp)
        names = list(_FIRST_TEN) + [f"n9{k:07d}" for k in range(990)]
        make_image_folder(t / "val", names, per_class=[per] * 10 + [1] * 990, size=16)
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), t / "resnet18.pth")
        cfg = _imagenet_config(t / "imagenet-tiny.toml", args.imagenet_n)
        tables, times = {}, {}
        for p in procs:
            launch = [sys.executable] if p == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={p}",
            ]  # fmt: skip
            cmd = [*launch, "-m", "distortion", "run", "--config", str(cfg), "--distributed",
                   "--data", str(t / "val"), "--weights", f"resnet18={t / 'resnet18.pth'}",
                   "--out", str(t / f"out{p}"), "--cache-dir", str(t / f"cache{p}"),
                   "--quiet", "--no-figures"]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            times[p] = time.perf_counter() - t0
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
                return 1
            tables[p] = pd.read_csv(t / f"out{p}" / "comparison.csv")
            stages = json.loads((t / f"out{p}" / "run.json").read_text())["timings_s"]
            shown = ", ".join(f"{k.split(': ')[-1]} {v:.1f} s" for k, v in stages.items())
            print(f"{p} process(es): distortion run {times[p]:7.2f} s ({shown})  "
                  f"[{_uptime()}]", flush=True)  # fmt: skip
        for p in procs[1:]:
            same = tables[p].equals(tables[procs[0]])
            rows = len(tables[p])
            print(f"speed-up {procs[0]} -> {p} processes: distortion run "
                  f"{times[procs[0]] / times[p]:.2f}x; comparison.csv ({rows} rows) equal: "
                  f"{same}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
