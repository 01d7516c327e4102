"""``distortion run``: the default experiment end to end (or the one a TOML file describes).

Example::

    distortion run                                   # experiments/default.toml
    distortion run --config experiments/small.toml --out /tmp/small

Stages: data, per model extraction (cached), hypothesis tests, last-layer and all-layer
predicted vs measured, tables, figures; a summary table is printed at the end.
Light module: torch is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import sys
import time

from distortion.commands._common import add_runtime_args, progress_enabled

__all__ = ["add_parser", "run"]


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
    add_runtime_args(p, device=False, no_cache=False, download=False)
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
        )
    except StageError as exc:
        print(f"distortion run: {exc}", file=sys.stderr)
        return 1
    print((result.out_dir / "summary.txt").read_text(), end="")
    print(f"results in {result.out_dir} ({time.perf_counter() - t0:.0f} s)")
    return 0
