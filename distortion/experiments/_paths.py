r"""Where data, weights and caches live: one place that resolves every default location.

Three environment variables, each overridden by the matching command-line option:

``DISTORTION_DATA`` (``--data``)
    The shared-data folder, laid out as ``data/cifar10/test.npz`` and
    ``models/cifar10-resnet/*.th``. Default: ``<repository root>/../shared`` when it exists.
``DISTORTION_WEIGHTS`` (``--weights``)
    A checkpoint file, or a folder searched for a model's checkpoint file name.
``DISTORTION_CACHE`` (``--cache-dir``)
    Where extracted features are cached. Default: ``~/.cache/distortion``.

No function here touches the network or imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "cache_dir",
    "data_root",
    "repo_root",
    "shared_dir",
    "weights_search_dirs",
]


def repo_root() -> Path:
    """Return the root of the source tree (the folder that holds ``distortion/``)."""
    return Path(__file__).resolve().parents[2]


def shared_dir() -> Path | None:
    """Return the shared-data folder, or None when there is none.

    ``$DISTORTION_DATA`` when set (returned even if it does not exist, so that an error names
    it), else ``<repository root>/../shared`` when that folder exists.
    """
    env = os.environ.get("DISTORTION_DATA")
    if env:
        return Path(env).expanduser()
    default = repo_root().parent / "shared"
    return default if default.is_dir() else None


def data_root() -> Path | None:
    """Return ``<shared>/data`` (where ``cifar10/``, ``cifar100/``, ``imagenet/`` are looked up)."""
    shared = shared_dir()
    return None if shared is None else shared / "data"


def weights_search_dirs() -> list[Path]:
    """Return the folders searched for a checkpoint file name, most specific first.

    ``$DISTORTION_WEIGHTS`` (when it names a folder), then ``<shared>/models/*/``.
    """
    dirs: list[Path] = []
    env = os.environ.get("DISTORTION_WEIGHTS")
    if env and Path(env).expanduser().is_dir():
        dirs.append(Path(env).expanduser())
    shared = shared_dir()
    if shared is not None and (shared / "models").is_dir():
        dirs.extend(sorted(p for p in (shared / "models").iterdir() if p.is_dir()))
    return dirs


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Return the feature cache folder.

    ``path`` when given, else ``$DISTORTION_CACHE``, else ``~/.cache/distortion``.
    """
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("DISTORTION_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "distortion"
