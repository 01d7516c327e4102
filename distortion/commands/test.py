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

__all__ = ["add_parser", "parse_bits", "run"]


def parse_bits(text: str) -> list[int]:
    """Parse ``"2-8"``, ``"2,4,8"`` or ``"4"`` into a list of bit-widths in 1..16."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"--bits must look like 2-8, 2,4,8 or 4, got {text!r}") from None
    if not out or any(not 1 <= b <= 16 for b in out):
        raise ValueError(f"--bits must be in 1..16, got {text!r}")
    return sorted(set(out))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``test`` subcommand to ``subparsers`` and return its parser."""
    from distortion.experiments.models import MODELS  # torch-free at import

    p = subparsers.add_parser(
        "test",
        help="test the Gaussian-feature and uniform-error hypotheses on a network",
        description=(
            "Test H_G (class-conditional Gaussian features, on the features and on the logit "
            "margins) and H_U (uniform quantization error, per layer x bit-width x "
            "quantizer), with effect sizes and verdicts; write CSV tables and figures."
        ),
    )
    p.add_argument("--model", required=True, choices=list(MODELS), help="network")
    p.add_argument("--weights", metavar="FILE", help="checkpoint file (default: looked up)")
    p.add_argument(
        "--data",
        metavar="PATH|NAME",
        help="a .npz file, a folder, or cifar10/cifar100/imagenet (default: the model's)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--n", type=int, metavar="N", help="use the first N images")
    p.add_argument("--per-class", type=int, metavar="N", help="use N images per class")
    p.add_argument("--classes", metavar="A,B,...", help="keep these classes")
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
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="torch device for feature extraction")
    p.add_argument("--cache-dir", metavar="DIR", help="cache (default $DISTORTION_CACHE)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write caches")
    p.add_argument("--no-figures", action="store_true", help="write the CSV files only")
    p.add_argument("--download", action="store_true", help="download missing data/weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    """Extract features (cached), run the tests, write and print the results."""
    import pandas as pd

    from distortion.experiments import _paths
    from distortion.experiments.data import load_dataset
    from distortion.experiments.features import extract_features
    from distortion.experiments.hypotheses import run_hypothesis_tests
    from distortion.experiments.models import get_spec, load_model
    from distortion.quantize import UniformQuantizer

    bits = parse_bits(args.bits)
    grans = [g.strip() for g in str(args.granularity).split(",") if g.strip()]
    if not grans or any(g not in ("tensor", "channel") for g in grans):
        raise ValueError(f"--granularity must be tensor, channel or both, got {args.granularity!r}")
    quantizers = {f"per_{g}": UniformQuantizer(8, granularity=g) for g in grans}
    layers = args.layers if args.layers in ("all", "last") else args.layers.split(",")

    spec = get_spec(args.model)
    source = args.data if args.data is not None else spec.dataset
    dataset = load_dataset(
        source,
        preprocessing=spec.preprocessing,
        n=args.n,
        per_class=args.per_class,
        classes=args.classes,
        seed=args.seed,
        download=args.download,
    )
    model = load_model(args.model, args.weights, device="cpu", download=args.download)
    fs = extract_features(
        model,
        dataset,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.cache_dir,
        cache=not args.no_cache,
        progress=not args.quiet,
    )
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
        progress=not args.quiet,
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
