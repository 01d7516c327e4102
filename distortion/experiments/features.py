r"""Penultimate features of a trained network: the :class:`FeatureSet`, extraction and its cache.

A :class:`FeatureSet` holds, for ``n_samples`` images, the features ``x`` (the input of the
last linear layer, after global pooling), the labels, the model's logits, and that layer's
weights ``W`` and bias ``b``, so that the logits are ``z = W x + b``. It is everything the
closed-form predictions of :mod:`distortion.theory` need from a network.

:func:`extract_features` computes one from a model and an :class:`~.data.ImageDataset` and
caches it on disk, keyed by the weights, the images and the preprocessing.

This module imports torch only inside :func:`extract_features`, so that ``FeatureSet`` can
be loaded and used without it.

References
----------
.. [1] D. Resmerita, R. Cabral Farias, B. Dupont de Dinechin and L. Fillatre, "Distortion
   approximation of a compressed softmax layer", IEEE SSP 2021.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from distortion.experiments import _cache, _paths

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from distortion.experiments.data import ImageDataset

__all__ = ["FeatureSet", "FeatureSplit", "extract_features", "feature_cache_key"]

logger = logging.getLogger(__name__)

_FORMAT = "distortion.FeatureSet"
_FORMAT_VERSION = 1
_ARRAYS = ("features", "labels", "logits", "W", "b")


@dataclass(frozen=True, eq=False)
class FeatureSet:
    r"""Penultimate features, labels, logits and the last linear layer of a network.

    Parameters
    ----------
    features : array of shape (n_samples, n_features)
        Input ``x`` of the last linear layer (stored as float32).
    labels : array of shape (n_samples,)
        True class, integers in ``0..n_classes-1`` (stored as int64).
    logits : array of shape (n_samples, n_classes)
        The model's outputs (float32).
    W : array of shape (n_classes, n_features)
        Weight of the last linear layer (float32).
    b : array of shape (n_classes,)
        Its bias (float32).
    class_names : tuple of str
        Name of each class, in label order.
    provenance : dict
        Where it came from: model, weights sha256, dataset id and subset, preprocessing,
        library versions, and ``"cache"`` (``"hit"``, ``"miss"`` or ``"off"``).

    Notes
    -----
    The logits are an affine function of the features [1]_:

    .. math:: z = W x + b, \qquad \hat y = \arg\max_k z_k .

    The arrays are read-only; every method returns new objects.
    """

    features: np.ndarray  # (n_samples, n_features) float32
    labels: np.ndarray  # (n_samples,) int64
    logits: np.ndarray  # (n_samples, n_classes) float32
    W: np.ndarray  # (n_classes, n_features) float32
    b: np.ndarray  # (n_classes,) float32
    class_names: tuple[str, ...]  # (n_classes,)
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        features = _float_array(self.features, "features", ndim=2)
        n, d = features.shape
        logits = _float_array(self.logits, "logits", ndim=2)
        W = _float_array(self.W, "W", ndim=2)
        b = _float_array(self.b, "b", ndim=1)
        k = W.shape[0]
        if W.shape[1] != d:
            raise ValueError(
                f"W must have shape (n_classes, {d}) to match features (n_samples, {d}), "
                f"got {W.shape}"
            )
        if b.shape != (k,):
            raise ValueError(f"b must have shape ({k},) to match W {W.shape}, got {b.shape}")
        if logits.shape != (n, k):
            raise ValueError(f"logits must have shape ({n}, {k}), got {logits.shape}")
        labels = np.asarray(self.labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) to match features, got {labels.shape}")
        integral = np.issubdtype(labels.dtype, np.integer) or (
            np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))
        )
        if not integral:
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        labels = _owned(labels.astype(np.int64, copy=labels.dtype != np.int64), self.labels)
        if n and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(
                f"labels must lie in 0..{k - 1} (the rows of W), got values in "
                f"{labels.min()}..{labels.max()}"
            )
        names = tuple(str(c) for c in self.class_names)
        if len(names) != k:
            raise ValueError(f"class_names must have {k} entries (rows of W), got {len(names)}")
        for name, value in zip(_ARRAYS, (features, labels, logits, W, b), strict=True):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "provenance", dict(self.provenance))

    # -- sizes and derived values --------------------------------------------------------
    def __len__(self) -> int:
        return self.features.shape[0]

    def __repr__(self) -> str:
        return (
            f"FeatureSet(n_samples={len(self)}, n_features={self.n_features}, "
            f"n_classes={self.n_classes}, accuracy={self.accuracy:.4f}, "
            f"model={self.provenance.get('model')!r}, "
            f"dataset={self.provenance.get('dataset')!r})"
        )

    @property
    def n_samples(self) -> int:
        """Number of images."""
        return len(self)

    @property
    def n_features(self) -> int:
        """Feature dimension ``d``."""
        return self.features.shape[1]

    @property
    def n_classes(self) -> int:
        """Number of classes ``K`` (rows of ``W``)."""
        return self.W.shape[0]

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy of the logits (fraction in [0, 1])."""
        if not len(self):
            return float("nan")
        return float(np.mean(self.predictions() == self.labels))

    def predictions(self) -> np.ndarray:
        """Predicted class ``argmax_k z_k``, shape (n_samples,)."""
        return np.argmax(self.logits, axis=1)

    def priors(self) -> np.ndarray:
        """Class frequencies ``pi_k``, shape (n_classes,)."""
        return np.bincount(self.labels, minlength=self.n_classes) / max(len(self), 1)

    def linear_logits(self, dtype: type = np.float64) -> np.ndarray:
        """Recompute ``W x + b`` from the features, shape (n_samples, n_classes)."""
        return self.features.astype(dtype) @ self.W.astype(dtype).T + self.b.astype(dtype)

    # -- selections ----------------------------------------------------------------------
    def subset(self, *, classes: Sequence[str | int] | str) -> FeatureSet:
        """Keep the samples of some classes, as a ``len(classes)``-class problem.

        Labels are remapped to ``0..k-1`` in the order given; rows of ``W`` and ``b`` and
        columns of ``logits`` are selected accordingly (the softmax layer restricted to these
        classes), and the names are kept.

        Parameters
        ----------
        classes : sequence of str or int, or a comma-separated str
            Class names or indices, e.g. ``["cat", "dog"]`` or ``"cat,dog"``.
        """
        from distortion.experiments.data import _resolve_classes

        ids = _resolve_classes(classes, self.class_names)
        keep = np.isin(self.labels, ids)
        remap = np.full(self.n_classes, -1, dtype=np.int64)
        remap[ids] = np.arange(len(ids))
        prov = dict(self.provenance)
        prov["classes"] = [self.class_names[k] for k in ids]
        return FeatureSet(
            features=self.features[keep],
            labels=remap[self.labels[keep]],
            logits=self.logits[keep][:, ids],
            W=self.W[ids],
            b=self.b[ids],
            class_names=tuple(self.class_names[k] for k in ids),
            provenance=prov,
        )

    def select(self, indices: np.ndarray) -> FeatureSet:
        """Keep the samples at ``indices`` (integer positions or a boolean mask)."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"a boolean mask must have shape ({len(self)},), got {idx.shape}")
        elif not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
            raise ValueError("indices must be a 1-d array of integers or a boolean mask")
        return replace(
            self,
            features=self.features[idx],
            labels=self.labels[idx],
            logits=self.logits[idx],
        )

    def split_mask(self, fraction: float, *, seed: int = 0) -> np.ndarray:
        """Boolean mask of the first part of :meth:`split` (the positions of each part).

        Parameters
        ----------
        fraction : float in (0, 1)
            Share of each class that goes to the first part (rounded per class).
        seed : int
            Seed of the random assignment.

        Returns
        -------
        ndarray of bool, shape (n_samples,)
        """
        if not isinstance(fraction, float | int) or not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        rng = np.random.default_rng(seed)
        first = np.zeros(len(self), dtype=bool)
        for k in range(self.n_classes):
            members = np.flatnonzero(self.labels == k)
            take = int(round(fraction * len(members)))
            first[rng.permutation(members)[:take]] = True
        if first.all() or not first.any():
            raise ValueError(
                f"fraction={fraction} leaves one part empty with {len(self)} samples; "
                "pass a fraction nearer 0.5 or more samples"
            )
        return first

    def split(self, fraction: float, *, seed: int = 0) -> FeatureSplit:
        """Split the samples in two, stratified by class (e.g. calibration vs evaluation).

        Parameters
        ----------
        fraction : float in (0, 1)
            Share of each class that goes to the first part (rounded per class).
        seed : int
            Seed of the random assignment.

        Returns
        -------
        FeatureSplit
            ``(calibration, evaluation)``: two FeatureSets, each in the original order.
        """
        first = self.split_mask(fraction, seed=seed)
        prov = {**self.provenance, "split": {"fraction": float(fraction), "seed": int(seed)}}
        a = replace(self.select(first), provenance={**prov, "part": "calibration"})
        b = replace(self.select(~first), provenance={**prov, "part": "evaluation"})
        return FeatureSplit(a, b)

    def to_frame(self) -> pd.DataFrame:
        """Return one row per class.

        Columns: class, n, prior, accuracy (the class's recall), feature_norm_mean (mean
        ``||x||``), weight_norm (``||w_k||``), bias (``b_k``).
        """
        pred = self.predictions()
        rows = []
        for k, name in enumerate(self.class_names):
            mask = self.labels == k
            n_k = int(mask.sum())
            rows.append(
                {
                    "class": name,
                    "n": n_k,
                    "prior": n_k / max(len(self), 1),
                    "accuracy": float(np.mean(pred[mask] == k)) if n_k else float("nan"),
                    "feature_norm_mean": (
                        float(np.linalg.norm(self.features[mask], axis=1).mean())
                        if n_k
                        else float("nan")
                    ),
                    "weight_norm": float(np.linalg.norm(self.W[k])),
                    "bias": float(self.b[k]),
                }
            )
        return pd.DataFrame(rows)

    # -- files ---------------------------------------------------------------------------
    def checksum(self) -> str:
        """sha256 (hex) of the arrays and class names (stored in saved files)."""
        h = hashlib.sha256()
        for name in _ARRAYS:
            a = getattr(self, name)
            h.update(f"{name}:{a.dtype}:{a.shape}\n".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps(list(self.class_names)).encode())
        return h.hexdigest()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an ``.npz`` file (arrays + JSON metadata with a checksum), atomically.

        The file is written to a temporary name in the same folder and renamed, so a reader
        never sees a half-written file. Returns the path.
        """
        path = Path(path).expanduser()
        meta = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "class_names": list(self.class_names),
            "provenance": _cache.jsonable(self.provenance),
            "checksum": self.checksum(),
        }
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        _cache.atomic_savez(path, meta=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureSet:
        """Read a file written by :meth:`save`, checking its keys, shapes and checksum.

        Raises
        ------
        FileNotFoundError
            No such file.
        ValueError
            Not a FeatureSet file, truncated or corrupt (the message says so).
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"feature file {str(path)!r} does not exist; create it with "
                "`distortion extract --out FILE` or FeatureSet.save"
            )
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = set(z.files)
                missing = sorted({"meta", *_ARRAYS} - keys)
                if missing:
                    raise _FormatError(
                        f"{str(path)!r} is not a FeatureSet file: it lacks {missing} "
                        f"(found {sorted(keys)})"
                    )
                arrays = {name: z[name] for name in _ARRAYS}
                meta = json.loads(str(z["meta"]))
        except _FormatError as exc:
            raise ValueError(str(exc)) from None
        except Exception as exc:  # BadZipFile, EOFError, OSError, JSON, zlib
            raise ValueError(
                f"cannot read feature file {str(path)!r} ({type(exc).__name__}: {exc}); it may "
                "be truncated or corrupt: delete it and extract the features again"
            ) from exc
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a FeatureSet file (no {_FORMAT!r} metadata)")
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} has FeatureSet format version {meta.get('version')!r}; this "
                f"version of distortion reads version {_FORMAT_VERSION}: extract it again"
            )
        fs = cls(
            **arrays,
            class_names=tuple(meta.get("class_names", ())),
            provenance=meta.get("provenance", {}),
        )
        if fs.checksum() != meta.get("checksum"):
            raise ValueError(
                f"feature file {str(path)!r} is corrupt (checksum mismatch); delete it and "
                "extract the features again"
            )
        return fs


class FeatureSplit(NamedTuple):
    """The two parts of :meth:`FeatureSet.split`."""

    calibration: FeatureSet
    evaluation: FeatureSet


class _FormatError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------
def feature_cache_key(model: nn.Module, dataset: ImageDataset) -> str:
    """sha256 (hex) identifying an extraction: weights, images, labels, preprocessing.

    Any change of the state dict (any weight or buffer), of the images or labels of the
    subset, of the class selection or of the preprocessing gives a different key.
    """
    from distortion.experiments.models import state_dict_sha256

    parts = {
        "cache": "features",
        "format": _FORMAT_VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "state_dict_sha256": state_dict_sha256(model),
        "dataset": dataset.dataset_id,
        "dataset_fingerprint": dataset.fingerprint,
        "class_ids": list(dataset.class_ids),
        "preprocessing": dataset.preprocessing.to_dict(),
    }
    return _cache.content_key(parts)


def extract_features(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    progress: bool = True,
) -> FeatureSet:
    r"""Run the model over a dataset and keep its penultimate features and logits.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier whose last ``nn.Linear`` gives the logits (see
        :func:`~distortion.experiments.models.last_linear`), e.g. from
        :func:`~distortion.experiments.models.load_model`.
    dataset : ImageDataset
        Images with the model's preprocessing. When it keeps a subset of classes, the
        result is the restricted problem: ``W``, ``b`` and the logits keep only those classes.
    batch_size : int
        Images per forward pass.
    device : str
        Where to run the model (it is moved back afterwards).
    cache_dir : path, optional
        Cache folder; default ``$DISTORTION_CACHE`` or ``~/.cache/distortion``.
    cache : bool
        Read and write the cache. The key (:func:`feature_cache_key`) changes with the
        weights, the images, the labels and the preprocessing. An unusable cache file
        (unreadable, truncated, corrupt -- caught by its checksum -- or stale) is
        recomputed and overwritten after a :class:`~distortion.experiments._cache.CacheWarning`.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    FeatureSet
        ``provenance["cache"]`` is ``"hit"`` when served from the cache, ``"miss"`` when
        computed and stored, ``"off"`` when ``cache=False``.

    Notes
    -----
    Runs in eval mode under ``torch.inference_mode()``; the features are the input of the
    last linear layer, captured by a forward hook, so that ``logits = W x + b`` holds up to
    float32 rounding.
    """
    import torch
    from tqdm.auto import tqdm

    from distortion.experiments.data import ImageDataset
    from distortion.experiments.models import (
        forward_with_features,
        last_linear,
        model_info,
        state_dict_sha256,
    )

    if not isinstance(dataset, ImageDataset):
        raise ValueError(
            f"dataset must be an ImageDataset (see load_dataset), got {type(dataset).__name__}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    layer_name, layer = last_linear(model)
    n_out = int(layer.out_features)
    if len(dataset.source_class_names) != n_out:
        raise ValueError(
            f"the model has {n_out} outputs but the dataset {dataset.dataset_id!r} has "
            f"{len(dataset.source_class_names)} classes; pass data of the model's classes "
            "(use --classes to keep some of them)"
        )
    info = model_info(model)
    name = info.name if info is not None else type(model).__name__
    key = feature_cache_key(model, dataset)
    cache_file = _paths.cache_dir(cache_dir) / f"features-{_safe(name)}-{key[:32]}.npz"
    # a missing, unreadable, corrupt or stale file: a CacheWarning, then recomputed
    fs = (
        _cache.load_cached(
            cache_file, FeatureSet.load, key=key, key_of=lambda f: f.provenance.get("cache_key")
        )
        if cache
        else None
    )
    if fs is not None:
        logger.info("features of %s on %s served from cache %s", name, dataset, cache_file)
        return replace(fs, provenance={**fs.provenance, "cache": "hit"})

    start = time.perf_counter()
    p = next(model.parameters(), None)
    home = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    # channels-last inputs run the convolutions of the registered ResNets ~20 % faster on
    # CPU (oneDNN); other models get their inputs as they come.
    channels_last = info is not None and torch.device(device).type == "cpu"
    feats, logits = [], []
    try:
        model.to(device).eval()
        with (
            torch.inference_mode(),
            tqdm(
                total=len(dataset), unit="img", desc=f"features {name}", disable=not progress
            ) as bar,
        ):
            for x, _ in dataset.batches(batch_size):
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = forward_with_features(model, x.to(device))
                feats.append(out.features.float().cpu().numpy())
                logits.append(out.logits.float().cpu().numpy())
                bar.update(len(x))
        W = layer.weight.detach().float().cpu().numpy()
        b = (
            layer.bias.detach().float().cpu().numpy()
            if layer.bias is not None
            else np.zeros(n_out, dtype=np.float32)
        )
    finally:
        model.to(home).train(was_training)
    logits_arr = np.concatenate(logits)
    ids = list(dataset.class_ids)
    if ids != list(range(n_out)):  # the problem restricted to the kept classes
        logits_arr, W, b = logits_arr[:, ids], W[ids], b[ids]
    provenance = {
        "model": name,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights": info.weights if info is not None else None,
        "weights_sha256": info.weights_sha256 if info is not None else None,
        "state_dict_sha256": state_dict_sha256(model),
        "last_linear": layer_name,
        "dataset": dataset.dataset_id,
        "dataset_source": dataset.source,
        "dataset_fingerprint": dataset.fingerprint,
        "subset": dataset.subset.to_dict(),
        "class_ids": ids,
        "preprocessing": dataset.preprocessing.to_dict(),
        "n_samples": len(dataset),
        "batch_size": batch_size,
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 3),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "cache": "miss" if cache else "off",
        "cache_key": key,
        "cache_file": str(cache_file) if cache else None,
    }
    fs = FeatureSet(
        features=np.concatenate(feats),
        labels=np.array(dataset.labels),
        logits=logits_arr,
        W=W,
        b=b,
        class_names=dataset.class_names,
        provenance=provenance,
    )
    if cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fs.save(cache_file)
        except OSError as exc:
            warnings.warn(
                f"could not write the feature cache {str(cache_file)!r}: {exc}",
                _cache.CacheWarning,
                stacklevel=2,
            )
    return fs


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _float_array(value: Any, name: str, *, ndim: int) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array: {exc}") from None
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(
            f"{name} has {int(np.sum(~np.isfinite(a)))} non-finite values (NaN or inf); "
            "check the model and its inputs"
        )
    return _owned(a, value)


def _owned(a: np.ndarray, original: Any) -> np.ndarray:
    """Return ``a``, copied if it is (a view of) the caller's array, so it can be frozen."""
    if isinstance(original, np.ndarray) and np.shares_memory(a, original) and a.flags.writeable:
        return a.copy()
    return a


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from distortion import __version__

    def dist_version(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "distortion": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torchvision": dist_version("torchvision"),  # without importing it (slow)
    }
