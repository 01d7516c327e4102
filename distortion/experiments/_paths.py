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
    "check_output_dir",
    "check_output_file",
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


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_parent(folder: Path, option: str, shown: Path) -> None:
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise ValueError(
            f"{option} {shown} lies under {base}, which is a file, not a folder: pass a path "
            "in a folder"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(
            f"{option} {shown}: cannot write into {base} (permission denied); pass a folder you "
            "can write, e.g. under your home folder or /tmp"
        )


def check_output_dir(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Return ``path`` (expanded) when it is, or can be made, a writable folder.

    Raises a ValueError saying what to pass instead when ``path`` is a file, lies under a
    file, or lies in a folder that cannot be written (checked before any work is done).
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(
            f"{option} {p} is a file, not a folder: pass a folder to write the results into, "
            f"e.g. {option} {p.parent / (p.stem + '-results')}"
        )
    _check_writable_parent(p, option, p)
    return p


def check_output_file(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Return ``path`` (expanded) when a file can be written there, else raise a ValueError
    saying what to pass instead (a folder given, a parent that is a file or read-only)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{option} {p} is a folder: pass a file name, e.g. {p / 'features.npz'}")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{option} {p}: the file is read-only (permission denied); pass another")
    _check_writable_parent(p.parent, option, p)
    return p
