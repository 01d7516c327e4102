"""Options and loading steps shared by the subcommands (``extract``, ``test``, ``predict``, ...).

The ``add_*_args`` helpers add one group of options to a subcommand's parser, with the same
names, types and help texts wherever they appear; :func:`load_model_and_dataset` and
:func:`extract_features_from_args` turn those options into the network, the images and their
features. Light module, like the commands: torch is imported inside the functions only.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from distortion.experiments.data import ImageDataset
    from distortion.experiments.features import FeatureSet
    from distortion.experiments.models import ModelSpec

__all__ = [
    "add_model_args",
    "add_runtime_args",
    "add_subset_args",
    "check_device",
    "extract_features_from_args",
    "load_model_and_dataset",
    "parse_bits",
    "progress_enabled",
]

#: Options of :func:`add_subset_args`, passed on to ``load_dataset`` when a parser has them.
_SUBSET_OPTIONS: tuple[str, ...] = ("n", "per_class", "classes")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Add ``--model`` (required), ``--weights`` and ``--data`` to ``p``.

    Parameters
    ----------
    p : argparse.ArgumentParser
        The subcommand's parser.
    """
    from distortion.experiments.models import MODELS  # torch-free at import

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


def add_subset_args(
    p: argparse.ArgumentParser,
    *,
    n_default: int | None = None,
    per_class: bool = True,
    classes: bool = True,
) -> None:
    """Add the image selection ``--n`` and, optionally, ``--per-class`` and ``--classes``.

    Parameters
    ----------
    p : argparse.ArgumentParser
        The subcommand's parser.
    n_default : int, optional
        Default of ``--n`` (and said in its help); None keeps every image.
    per_class, classes : bool
        Whether to add ``--per-class`` and ``--classes``.
    """
    n_help = "keep the first N images"
    if n_default is not None:
        n_help += f" (default {n_default})"
    p.add_argument("--n", type=int, default=n_default, metavar="N", help=n_help)
    if per_class:
        p.add_argument("--per-class", type=int, metavar="N", help="keep N images per class")
    if classes:
        p.add_argument("--classes", metavar="A,B,...", help="keep these classes, e.g. cat,dog")


def add_runtime_args(
    p: argparse.ArgumentParser,
    *,
    batch_size: bool = False,
    device: bool = True,
    device_help: str = "torch device (cpu, cuda, ...)",
    cache: bool = True,
    no_cache: bool = True,
    download: bool = True,
    quiet: bool = True,
) -> None:
    """Add the options of how a command runs, in this order, each when its flag is true.

    Parameters
    ----------
    p : argparse.ArgumentParser
        The subcommand's parser.
    batch_size : bool
        ``--batch-size`` (images per forward pass, default 256).
    device : bool
        ``--device`` (default ``cpu``), with the help text ``device_help``.
    device_help : str
        Help of ``--device``.
    cache : bool
        ``--cache-dir`` (default ``$DISTORTION_CACHE``).
    no_cache : bool
        ``--no-cache``: neither read nor write the cache.
    download : bool
        ``--download``: download missing data or weights.
    quiet : bool
        ``--quiet``: no progress bars.
    """
    if batch_size:
        p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    if device:
        p.add_argument("--device", default="cpu", help=device_help)
    if cache:
        p.add_argument(
            "--cache-dir", metavar="DIR", help="cache folder (default $DISTORTION_CACHE)"
        )
    if no_cache:
        p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    if download:
        p.add_argument(
            "--download",
            action="store_true",
            help="download missing CIFAR data or published weights (needs a network)",
        )
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_model_and_dataset(
    args: argparse.Namespace, *, model_device: str | None = None, **dataset_kwargs: Any
) -> tuple[ModelSpec, ImageDataset, nn.Module]:
    """Resolve ``--model``, then load the dataset and the network the options name.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options of :func:`add_model_args` and ``--download``; those of
        :func:`add_subset_args` the parser has (``--n``, ``--per-class``, ``--classes``)
        select the images, and ``--device`` (when there) is where the model goes.
    model_device : str, optional
        Where the model goes, instead of ``args.device``.
    **dataset_kwargs
        Further keywords of :func:`~distortion.experiments.data.load_dataset` (``split``,
        ``seed``, ...).

    Returns
    -------
    spec : ModelSpec
        The model's registry entry.
    dataset : ImageDataset
        ``--data`` (default: the model's dataset), with the model's preprocessing.
    model : torch.nn.Module
        The network with its weights, in eval mode.
    """
    from distortion.experiments.data import load_dataset
    from distortion.experiments.models import get_spec, load_model

    if getattr(args, "device", None) is not None:
        check_device(args.device)
    if model_device is not None:
        check_device(model_device)
    spec = get_spec(args.model)
    source = args.data if args.data is not None else spec.dataset
    subset = {k: getattr(args, k) for k in _SUBSET_OPTIONS if hasattr(args, k)}
    dataset = load_dataset(
        source,
        preprocessing=spec.preprocessing,
        download=args.download,
        **subset,
        **dataset_kwargs,
    )
    if model_device is None:
        model_device = getattr(args, "device", "cpu")
    model = load_model(args.model, args.weights, device=model_device, download=args.download)
    return spec, dataset, model


def extract_features_from_args(
    args: argparse.Namespace, model: nn.Module, dataset: ImageDataset
) -> FeatureSet:
    """:func:`~distortion.experiments.features.extract_features` with the runtime options.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options of :func:`add_runtime_args` with ``batch_size``, ``device``,
        ``cache``, ``no_cache`` and ``quiet``.
    model : torch.nn.Module
        The network.
    dataset : ImageDataset
        The images.

    Returns
    -------
    FeatureSet
        The features, read from the cache when there (unless ``--no-cache``).
    """
    from distortion.experiments.features import extract_features

    return extract_features(
        model,
        dataset,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.cache_dir,
        cache=not args.no_cache,
        progress=progress_enabled(args),
    )


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars: unless ``--quiet``, and only when stderr is a terminal (in a log file
    a bar would write thousands of updates; the per-stage lines are kept there)."""
    if getattr(args, "quiet", False):
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def check_device(device: str) -> str:
    """Return ``device`` when torch can use it here; else raise a ValueError saying why.

    ``banana`` is not a device; ``cuda`` without a CUDA GPU (or ``cuda:3`` with fewer GPUs)
    and ``mps`` without Apple's Metal backend are unavailable: pass ``--device cpu``.
    """
    import torch

    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"--device {device!r} is not a torch device; pass cpu, cuda, cuda:0 or mps"
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is available here; pass --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: only {n} CUDA GPU(s) here (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"--device {device}: the MPS backend is not available; pass cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: unsupported device type {dev.type!r}; pass cpu")
    return str(device)


def parse_bits(text: str) -> list[int]:
    """``"2-8"`` -> [2, ..., 8]; ``"2,4,8"`` -> [2, 4, 8]; ``"4"`` -> [4]."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part, flags=re.ASCII)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise ValueError(f"--bits range {part!r} is empty; write LOW-HIGH, e.g. 2-8")
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part, flags=re.ASCII):
            out.append(int(part))
        else:
            raise ValueError(
                f"--bits must be whole bit-widths like 2-8 or 2,4,8 (no fractions), got {text!r}"
            )
    if not out or min(out) < 1 or max(out) > 16:
        raise ValueError(f"--bits must lie in 1..16, got {text!r}")
    return sorted(set(out))
