r"""On-disk caches: content keys, JSON encoding, atomic writes and forgiving reads.

Every cache of :mod:`distortion.experiments` (features, gradient Grams, hypothesis reports,
measurements) goes through these helpers, so they all behave alike:

- a key is the sha256 of a canonical encoding of everything the cached value depends on
  (:func:`content_key`): change one input and the key changes;
- a file is written to a temporary name in its own folder and renamed over the target
  (:func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_savez`), so a reader
  never sees half a file, and it gets the permissions of a normally created file
  (``0o666`` less the umask);
- a file that cannot be used -- unreadable, truncated, garbled, or written for another key --
  is never an error: the readers (:func:`load_cached`, :func:`read_json`,
  :func:`load_npz`) emit a :class:`CacheWarning` naming the file and return ``None``, and the
  caller recomputes (and overwrites it).

:func:`cached_json` puts these together for JSON records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePath
from typing import IO, Any, TypeVar

import numpy as np

__all__ = [
    "CacheWarning",
    "atomic_savez",
    "atomic_write_bytes",
    "atomic_write_text",
    "cached_json",
    "content_key",
    "jsonable",
    "load_cached",
    "load_npz",
    "read_json",
]

T = TypeVar("T")

#: ``format`` field of the records written by :func:`cached_json`.
RECORD_FORMAT = "distortion-cache-record"
RECORD_VERSION = 1
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CacheWarning(UserWarning):
    """A cache file could not be used (or written); the value is recomputed."""


# ------------------------------------------------------------------------------ encoding
def jsonable(obj: Any) -> Any:
    """``obj`` as JSON types: dicts (keys as str), lists, str, int, float, bool, None.

    numpy scalars become Python scalars, arrays nested lists, tuples and sets lists (sets
    sorted), paths strings, dataclass instances dicts of their fields, torch tensors lists;
    anything else its ``str``.
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return sorted((jsonable(v) for v in obj), key=repr)
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "detach") and hasattr(obj, "cpu") and hasattr(obj, "numpy"):  # a tensor
        return obj.detach().cpu().numpy().tolist()
    return str(obj)


def _canonical(obj: Any) -> Any:
    """JSON types for :func:`content_key`; arrays and bytes become tagged digests."""
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return sorted((_canonical(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if hasattr(obj, "detach") and hasattr(obj, "cpu") and hasattr(obj, "numpy"):  # a tensor
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            return {"__objects__": _canonical(obj.tolist()), "shape": list(obj.shape)}
        a = np.ascontiguousarray(obj)
        return {
            "__ndarray__": a.dtype.str,
            "shape": list(a.shape),
            "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
        }
    if isinstance(obj, bytes | bytearray | memoryview):
        return {"__bytes__": hashlib.sha256(bytes(obj)).hexdigest()}
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return {"__dataclass__": type(obj).__qualname__, **_canonical(fields)}
    raise TypeError(
        f"content_key cannot encode a {type(obj).__name__} ({obj!r}); pass its defining "
        "values (dicts, lists, str, numbers, arrays, bytes)"
    )


def content_key(*parts: Any) -> str:
    """sha256 (hex) of a canonical encoding of ``parts``.

    Parts may be (nested) dicts, lists, tuples, str, numbers, bool, None, paths, dataclasses,
    raw ``bytes`` and numpy arrays (hashed by dtype, shape and raw bytes, so ``float32`` and
    ``float64`` copies of the same values differ). Dict order does not matter; list order,
    the number of parts and their order do.
    """
    text = json.dumps(
        [_canonical(p) for p in parts], sort_keys=True, separators=(",", ":"), allow_nan=False
    )
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------ writing
@contextlib.contextmanager
def _atomic_open(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            # 0o666 less the umask, as for any new file (tempfile.mkstemp would give 0o600)
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder; return it."""
    with _atomic_open(path) as f:
        f.write(data)
    return Path(path).expanduser()


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`); return it."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_savez(path: str | os.PathLike[str], **arrays: np.ndarray) -> Path:
    """``np.savez(path, **arrays)``, atomically (see :func:`atomic_write_bytes`); return it."""
    with _atomic_open(path) as f:
        np.savez(f, **arrays)
    return Path(path).expanduser()


# ------------------------------------------------------------------------------ reading
def _warn(path: Path, reason: str) -> None:
    warnings.warn(
        f"ignoring the cache file {str(path)!r} ({reason}); it will be recomputed",
        CacheWarning,
        stacklevel=3,
    )


def load_cached(
    path: str | os.PathLike[str],
    load: Callable[[Path], T],
    *,
    key: str | None = None,
    key_of: Callable[[T], Any] | None = None,
) -> T | None:
    """``load(path)``, or ``None`` when there is no usable cache file at ``path``.

    A missing file gives ``None`` silently. A file that ``load`` cannot read (any exception:
    truncated, garbled, another format) or whose key, ``key_of(value)``, is not ``key`` gives
    ``None`` after a :class:`CacheWarning` naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    try:
        value = load(path)
        stored = key_of(value) if key is not None and key_of is not None else key
    except Exception as exc:  # noqa: BLE001 - any unusable file is recomputed
        _warn(path, f"unreadable: {type(exc).__name__}: {exc}")
        return None
    if stored != key:
        _warn(path, f"it was written for other inputs: key {str(stored)[:16]!r}...")
        return None
    return value


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def read_json(path: str | os.PathLike[str], *, key: str | None = None) -> Any:
    """The JSON value in ``path``, or ``None`` (with a :class:`CacheWarning` unless the file
    is missing) when it is unreadable, or, with ``key``, not a dict whose ``"key"`` is ``key``.
    """
    return load_cached(
        path, _read_json, key=key, key_of=lambda v: v.get("key") if isinstance(v, dict) else None
    )


def load_npz(path: str | os.PathLike[str], *, key: str | None = None) -> dict | None:
    """The arrays of an ``.npz`` file (read into memory, no pickles), or ``None`` (with a
    :class:`CacheWarning` unless the file is missing) when it is unreadable, or, with
    ``key``, its ``"key"`` array is not ``key``."""
    return load_cached(
        path, _read_npz, key=key, key_of=lambda a: str(a["key"]) if "key" in a else None
    )


# ------------------------------------------------------------------------------ records
def cached_json(
    cache_dir: str | os.PathLike[str] | None,
    namespace: str,
    key: str,
    compute: Callable[[], T],
    *,
    encode: Callable[[T], Any] | None = None,
    decode: Callable[[Any], T] | None = None,
) -> T:
    """A JSON record cached under ``<cache_dir>/<namespace>/<key>.json``.

    Returns ``decode(stored)`` when a valid record for ``key`` exists; otherwise
    ``value = compute()``, stores ``jsonable(encode(value))`` atomically and returns
    ``value``. ``decode(encode(value))`` should equal ``value``. A record that cannot be
    read, is garbled (its sha256 does not match), was written for another key or that
    ``decode`` rejects is recomputed after a :class:`CacheWarning`; a failure to write is a
    :class:`CacheWarning` too.

    Parameters
    ----------
    cache_dir : path or None
        The cache root (default ``$DISTORTION_CACHE`` or ``~/.cache/distortion``).
    namespace : str
        Sub-folder, e.g. ``"measurements"``.
    key : str
        Usually :func:`content_key` of every input of ``compute``.
    compute : callable
        Called without arguments on a miss.
    encode, decode : callable, optional
        Between the value and its JSON form; default identity (the value must then be
        JSON-able by :func:`jsonable`).
    """
    from distortion.experiments import _paths

    for what, name in (("namespace", namespace), ("key", key)):
        if not isinstance(name, str) or not _SAFE_NAME.match(name):
            raise ValueError(f"{what} must be a file-name-safe string, got {name!r}")
    path = _paths.cache_dir(cache_dir) / namespace / f"{key}.json"
    record = read_json(path, key=key)
    if record is not None:
        try:
            if record.get("format") != RECORD_FORMAT or record.get("version") != RECORD_VERSION:
                raise ValueError(f"not a version-{RECORD_VERSION} {RECORD_FORMAT} file")
            if record.get("sha256") != content_key(record["value"]):
                raise ValueError("checksum mismatch: the file is garbled")
            return decode(record["value"]) if decode is not None else record["value"]
        except Exception as exc:  # noqa: BLE001 - any unusable record is recomputed
            _warn(path, f"unusable: {type(exc).__name__}: {exc}")
    value = compute()
    stored = jsonable(encode(value) if encode is not None else value)
    record = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "key": key,
        "sha256": content_key(stored),
        "value": stored,
    }
    try:
        atomic_write_text(path, json.dumps(record))
    except (OSError, ValueError) as exc:
        warnings.warn(
            f"could not write the cache file {str(path)!r}: {exc}", CacheWarning, stacklevel=2
        )
    return value
