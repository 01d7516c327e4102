"""``distortion run``: the default experiment end to end (or the one a TOML file describes).

Example::

    distortion run                                   # experiments/default.toml
    distortion run --config experiments/small.toml --out /tmp/small
    distortion run --config experiments/imagenet.toml --data /data/imagenet/val \
        --weights resnet18=resnet18-f37072fd.pth --weights resnet50=resnet50-0676ba61.pth
    torchrun --standalone --nproc_per_node 4 -m distortion run --config ... --distributed

Stages: data, per model extraction (cached), hypothesis tests, last-layer and all-layer
predicted vs measured, tables, figures; a summary table is printed at the end.
Light module: torch is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from distortion.commands._common import add_runtime_args, progress_enabled

__all__ = ["add_parser", "launched_distributed", "run"]


def launched_distributed(environ: dict[str, str] | None = None) -> bool:
    """Whether a launcher started several processes: torchrun's ``WORLD_SIZE`` (or, under
    ``srun`` without torchrun, ``SLURM_NTASKS`` with ``MASTER_ADDR`` exported) above 1."""
    env = os.environ if environ is None else environ

    def count(name: str) -> int:
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    if "RANK" in env:
        return count("WORLD_SIZE") > 1
    return "SLURM_PROCID" in env and "MASTER_ADDR" in env and count("SLURM_NTASKS") > 1


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand to ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "run",
        help="run an experiment end to end (default: experiments/default.toml)",
        description=(
            "Extract features, test the hypotheses, predict and measure the accuracy loss of "
            "quantized networks, and write tables, figures and a summary."
        ),
    )
    p.add_argument(
        "--config", metavar="FILE", help="experiment TOML (default experiments/default.toml)"
    )
    p.add_argument(
        "--data",
        metavar="PATH",
        help="data file or folder (default $DISTORTION_DATA, then ../shared)",
    )
    p.add_argument(
        "--weights",
        metavar="MODEL=FILE",
        action="append",
        default=[],
        help="checkpoint of a model, e.g. resnet20=/path/resnet20.th (repeatable)",
    )
    p.add_argument(
        "--out", metavar="DIR", help="results folder (default experiments/results/<name>)"
    )
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument(
        "--distributed",
        action="store_true",
        help=(
            "shard extraction, all-layer Grams and measurements over the processes of a "
            "torchrun / srun job (implied when torchrun's WORLD_SIZE > 1); rank 0 writes"
        ),
    )
    add_runtime_args(p, device=False, no_cache=False, download=True)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the experiment and print the summary; stage failures exit with status 1."""
    from distortion.experiments.pipeline import (
        DEFAULT_CONFIG,
        ExperimentConfig,
        StageError,
        run_experiment,
    )

    config = ExperimentConfig.from_toml(args.config or DEFAULT_CONFIG)
    weights = {}
    for item in args.weights:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--weights takes MODEL=FILE, got {item!r}")
        if name in weights:
            raise ValueError(f"--weights names {name} twice")
        weights[name] = path
    t0 = time.perf_counter()
    try:
        result = run_experiment(
            config,
            data=args.data,
            weights=weights,
            out_dir=args.out,
            cache_dir=args.cache_dir,
            figures=not args.no_figures,
            progress=progress_enabled(args),
            download=args.download,
            distributed=args.distributed or launched_distributed(),
        )
    except StageError as exc:
        print(f"distortion run: {exc}", file=sys.stderr)
        return 1
    if result.comparison is None and result.activations is None and result.compression is None:
        return 0
    print((result.out_dir / "summary.txt").read_text(), end="")
    print(f"results in {result.out_dir} ({time.perf_counter() - t0:.0f} s)")
    return 0
