"""``distortion extract``: penultimate features of a network on a dataset, saved to a file.

Example::

    distortion extract --model resnet20 --data cifar10 --out features/resnet20.npz
    distortion extract --model resnet56 --classes cat,dog --per-class 500 --out catdog.npz

Without ``--data``, the model's own dataset is used (found under ``$DISTORTION_DATA``);
without ``--weights``, the model's checkpoint is looked up in ``$DISTORTION_WEIGHTS`` and
``<DISTORTION_DATA>/models/``. Light module: torch is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import sys

from distortion.commands._common import (
    add_model_args,
    add_runtime_args,
    add_subset_args,
    extract_features_from_args,
    load_model_and_dataset,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``extract`` subcommand to ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "extract",
        help="extract penultimate features, logits and the last layer of a network",
        description=(
            "Run a trained network over a dataset and save its penultimate features, logits, "
            "labels and last linear layer (W, b) as a FeatureSet .npz file (cached on disk)."
        ),
    )
    add_model_args(p)
    p.add_argument("--split", choices=("test", "train"), default="test", help="CIFAR split")
    add_subset_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the --per-class draw")
    add_runtime_args(p, batch_size=True)
    p.add_argument("--out", required=True, metavar="FILE", help="output .npz file")
    return p


def run(args: argparse.Namespace) -> int:
    """Extract and save; raises ValueError / FileNotFoundError for the CLI to print."""
    if not str(args.out).endswith(".npz"):
        raise ValueError(f"--out must name a .npz file, got {args.out!r}")
    from distortion.experiments import _paths

    _paths.check_output_file(args.out, "--out")  # before minutes of extraction
    _, dataset, model = load_model_and_dataset(args, split=args.split, seed=args.seed)
    fs = extract_features_from_args(args, model, dataset)
    path = fs.save(args.out)
    print(
        f"{args.model} on {dataset.dataset_id}: {len(fs)} images, {fs.n_features} features, "
        f"{fs.n_classes} classes, top-1 {100 * fs.accuracy:.2f} % "
        f"(cache {fs.provenance.get('cache')}) -> {path}",
        file=sys.stdout,
    )
    return 0
