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

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``extract`` subcommand to ``subparsers`` and return its parser."""
    from distortion.experiments.models import MODELS  # torch-free at import

    p = subparsers.add_parser(
        "extract",
        help="extract penultimate features, logits and the last layer of a network",
        description=(
            "Run a trained network over a dataset and save its penultimate features, logits, "
            "labels and last linear layer (W, b) as a FeatureSet .npz file (cached on disk)."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        choices=list(MODELS),
        help=f"network: {', '.join(MODELS)}",
    )
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="checkpoint file (default: $DISTORTION_WEIGHTS, then <DISTORTION_DATA>/models/)",
    )
    p.add_argument(
        "--data",
        metavar="PATH|NAME",
        help=(
            "a .npz file, a folder (torchvision CIFAR root or ImageFolder tree), or cifar10, "
            "cifar100, imagenet (default: the model's dataset under $DISTORTION_DATA)"
        ),
    )
    p.add_argument("--split", choices=("test", "train"), default="test", help="CIFAR split")
    p.add_argument("--n", type=int, metavar="N", help="keep the first N images")
    p.add_argument("--per-class", type=int, metavar="N", help="keep N images per class")
    p.add_argument("--classes", metavar="A,B,...", help="keep these classes, e.g. cat,dog")
    p.add_argument("--seed", type=int, default=0, help="seed of the --per-class draw")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache (default $DISTORTION_CACHE)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument(
        "--download",
        action="store_true",
        help="download missing CIFAR data or published weights (needs a network)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, metavar="FILE", help="output .npz file")
    return p


def run(args: argparse.Namespace) -> int:
    """Extract and save; raises ValueError / FileNotFoundError for the CLI to print."""
    from distortion.experiments.data import load_dataset
    from distortion.experiments.features import extract_features
    from distortion.experiments.models import get_spec, load_model

    spec = get_spec(args.model)
    source = args.data if args.data is not None else spec.dataset
    if not str(args.out).endswith(".npz"):
        raise ValueError(f"--out must name a .npz file, got {args.out!r}")
    dataset = load_dataset(
        source,
        split=args.split,
        preprocessing=spec.preprocessing,
        n=args.n,
        per_class=args.per_class,
        classes=args.classes,
        seed=args.seed,
        download=args.download,
    )
    model = load_model(args.model, args.weights, device=args.device, download=args.download)
    fs = extract_features(
        model,
        dataset,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.cache_dir,
        cache=not args.no_cache,
        progress=not args.quiet,
    )
    path = fs.save(args.out)
    print(
        f"{args.model} on {dataset.dataset_id}: {len(fs)} images, {fs.n_features} features, "
        f"{fs.n_classes} classes, top-1 {100 * fs.accuracy:.2f} % "
        f"(cache {fs.provenance.get('cache')}) -> {path}",
        file=sys.stdout,
    )
    return 0
