"""``distortion compare``: print the predicted-vs-measured table of a finished run.

Example::

    distortion compare experiments/results/default --model resnet20 --layers last
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "compare",
        help="show predicted vs measured accuracy loss from a finished run",
        description="Print the cells or the summary of comparison.csv written by `distortion run`.",
    )
    p.add_argument(
        "results",
        nargs="?",
        default="experiments/results/default",
        help="results folder of a run (default experiments/results/default)",
    )
    p.add_argument("--model", help="keep this model")
    p.add_argument("--problem", help="keep this problem (e.g. 10-class, cat-vs-dog)")
    p.add_argument("--layers", choices=("last", "all"), help="keep this layer set")
    p.add_argument("--granularity", choices=("tensor", "channel"))
    p.add_argument("--summary", action="store_true", help="aggregates instead of cells")
    return p


#: Columns printed, in this order, where the table has them (the names of
#: distortion.experiments.compare.COLUMN_DICTIONARY; the last line: results of older versions).
COLUMNS = ("model", "problem", "layers", "granularity", "bits", "measured_flip_rate",
           "L1_flip_rate", "L2_flip_rate", "L3_flip_rate", "L3_flip_rate_low",
           "L3_flip_rate_high", "L2L_flip_rate", "L3L_flip_rate", "L3L_flip_rate_low",
           "L3L_flip_rate_high", "sakr_flip_rate_bound", "measured_accuracy_loss",
           "L3_accuracy_loss", "L3L_accuracy_loss",
           "measured_flip", "L1_flip", "L2_flip", "L3_flip", "L3_flip_lo", "L3_flip_hi",
           "sakr_flip_bound", "measured_loss", "L3_loss")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Print the filtered table."""
    from distortion.experiments.compare import Comparison
    from distortion.experiments.pipeline import summary_table

    comp = Comparison.load(Path(args.results) / "comparison.csv")
    t = comp.table
    for key in ("model", "problem", "layers", "granularity"):
        value = getattr(args, key)
        if value is not None:
            if value not in set(t[key].astype(str)):
                raise ValueError(f"no cells with {key}={value!r}; present: {sorted(set(t[key]))}")
            t = t[t[key].astype(str) == value]
    if args.summary:
        print(summary_table(Comparison(t)))
        return 0
    cols = [c for c in COLUMNS if c in t and (c in ("model", "problem") or t[c].notna().any())]
    print(t[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0
