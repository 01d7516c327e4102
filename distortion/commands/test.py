"""``distortion test``: test the Gaussian-feature and uniform-error hypotheses on a network.

Example::

    distortion test --model resnet20 --data cifar10 --out results/hyp-resnet20 --bits 2-8
    distortion test --model resnet56 --per-class 500 --layers last --out results/hyp56

Writes ``hypotheses*.csv`` (tidy and per table) and PNG figures into ``--out`` and prints the
verdict tables. Light module: torch is imported inside :func:`run`.
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
    parse_bits,
    progress_enabled,
)

__all__ = ["add_parser", "parse_bits", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``test`` subcommand to ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "test",
        help="test the Gaussian-feature and uniform-error hypotheses on a network",
        description=(
            "Test H_G (class-conditional Gaussian features, on the features and on the logit "
            "margins) and H_U (uniform quantization error, per layer x bit-width x "
            "quantizer), with effect sizes and verdicts; write CSV tables and figures."
        ),
    )
    add_model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_subset_args(p)
    p.add_argument("--bits", default="2-8", help="bit-widths, e.g. 2-8 or 4,8 (default 2-8)")
    p.add_argument(
        "--layers",
        default="all",
        help="'all', 'last', or comma-separated layer names (default all)",
    )
    p.add_argument(
        "--granularity",
        default="tensor,channel",
        help="quantizer granularities to test: tensor, channel or both (default both)",
    )
    p.add_argument("--n-components", type=int, default=10, help="PCs for multivariate tests")
    p.add_argument("--alpha", type=float, default=0.05, help="level gating the verdicts")
    p.add_argument("--seed", type=int, default=0, help="seed (--per-class draw, rounding)")
    p.add_argument("--no-figures", action="store_true", help="write the CSV files only")
    add_runtime_args(p, batch_size=True, device_help="torch device for feature extraction")
    return p


def run(args: argparse.Namespace) -> int:
    """Extract features (cached), run the tests, write and print the results."""
    import pandas as pd

    from distortion.experiments import _paths
    from distortion.experiments.hypotheses import run_hypothesis_tests
    from distortion.quantize import UniformQuantizer

    bits = parse_bits(args.bits)
    _paths.check_output_dir(args.out, "--out")
    grans = [g.strip() for g in str(args.granularity).split(",") if g.strip()]
    if not grans or any(g not in ("tensor", "channel") for g in grans):
        raise ValueError(f"--granularity must be tensor, channel or both, got {args.granularity!r}")
    quantizers = {f"per_{g}": UniformQuantizer(8, granularity=g) for g in grans}
    layers = args.layers if args.layers in ("all", "last") else args.layers.split(",")

    _, dataset, model = load_model_and_dataset(args, model_device="cpu", seed=args.seed)
    fs = extract_features_from_args(args, model, dataset)
    report = run_hypothesis_tests(
        fs,
        model,
        layers=layers,
        bits=bits,
        quantizers=quantizers,
        n_components=args.n_components,
        alpha=args.alpha,
        seed=args.seed,
        out_dir=args.out,
        figures=not args.no_figures,
        cache_dir=None if args.no_cache else _paths.cache_dir(args.cache_dir),
        progress=progress_enabled(args),
    )
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(f"{args.model} on {dataset.dataset_id}: {len(fs)} images -> {args.out}")
        print("\nH_U (uniform quantization error) verdicts:")
        print(report.uniform_summary().to_string())
        print("\nH_G (Gaussian) verdicts, features vs logit margins:")
        print(report.gaussian_summary().to_string(index=False))
        cov = report.covariance
        if "choice" in cov:
            print("\nBox's M (equal class covariances):")
            cols = ["space", "dim", "f_pvalue", "mean_kl", "choice"]
            print(cov.reindex(columns=cols).to_string(index=False))
    sys.stdout.flush()
    return 0
