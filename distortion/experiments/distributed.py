r"""Feature extraction, gradient Grams and measurements sharded over processes.

The per-image stages of :mod:`distortion.experiments` are embarrassingly parallel: the
features, the logits, the per-sample Grams :math:`\Gamma_\ell(x_i)` (eq. L3), their error
projections (eq. L12) and the prediction flips of image :math:`i` depend on that image
alone (batch norm runs in eval mode). This module spreads them over the processes of a
``torch.distributed`` job (``torchrun --nproc_per_node N``, ``srun torchrun ...``; gloo on
CPU, NCCL on GPU) and spreads configurations (cells of a grid) over processes or SLURM
array tasks:

- :func:`sharded_extract_features`, :func:`sharded_gradient_grams`, :func:`sharded_measure`:
  the images are cut into ``n_shards`` contiguous, deterministic shards (by image index,
  :func:`shard_bounds`); rank ``r`` computes shards ``r, r + world, ...`` and writes each
  one atomically under a content key (weights, data fingerprint, shard index and count,
  options) below ``<cache_dir>/shards/``; after a barrier rank 0 merges them with numpy
  only (:func:`merge_features`, :func:`merge_grams`, :func:`merge_measurements`) and writes
  the merged result where the single-process function caches it, so that
  :func:`~distortion.experiments.features.extract_features` and
  :func:`~distortion.experiments.sensitivity.gradient_grams` then find it;
- :func:`sharded_cells`, :func:`run_cells`, :func:`merge_cells`: configurations spread
  round-robin over ranks or ``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``, each
  cell's result a JSON record under its key, and the merge of all records.

Without a process group (a plain ``python`` run) the same functions compute every shard
in the one process and return the same result.

Reproducibility
---------------
Shard boundaries fall on multiples of the batch size, so every batch a shard runs is a
batch the single-process run runs too, with the same images in the same order: CPU and
GPU kernels whose rounding depends on the batch composition (oneDNN, cuBLAS) then give the
same bits, and the merged features, logits, Grams, projections and flips are bit for bit
those of the unsharded function with the same ``batch_size`` (and the same device, dtype
and thread settings). The error draws :math:`\varepsilon_\ell^{(r)}` of the projections
are seeded per layer (``seed``, layer index), independent of the images, so every shard
draws the same ones. Quantized weights are seeded per realization and layer, independent
of the images, so every rank measures the same quantized network.

Faults
------
Shard and merged files are written to a temporary name and renamed (``_cache``): a rank
killed while writing leaves at most a ``.<name>.<hex>.tmp`` file that no reader looks at
(rank 0 removes those of the shards it merges). A rerun loads the shards whose files are
valid for their key and recomputes only the missing ones; keep ``n_shards`` fixed (it is
part of the key) to resume with another number of processes.

This module imports torch only inside the functions that run a model; the ``merge_*``
functions and :func:`merge_cells` are numpy only.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from distortion.experiments import _cache, _paths

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from distortion.experiments.data import ImageDataset
    from distortion.experiments.features import FeatureSet
    from distortion.experiments.measure import Measurement
    from distortion.quantize import UniformQuantizer
    from distortion.theory.multilayer import GradientGrams

__all__ = [
    "CellGrid",
    "DistributedContext",
    "current_context",
    "init_distributed",
    "merge_cells",
    "merge_features",
    "merge_grams",
    "merge_measurements",
    "run_cells",
    "shard_bounds",
    "shard_dataset",
    "sharded_cells",
    "sharded_extract_features",
    "sharded_gradient_grams",
    "sharded_measure",
    "shutdown_distributed",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Bumped whenever a shard file changes meaning (part of every shard key).
_SHARD_VERSION = 1


# ---------------------------------------------------------------------------------------
# the process group
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in its job.

    Attributes
    ----------
    rank : int
        This process, ``0..world_size-1``.
    world_size : int
        Number of processes (1 without a process group).
    local_rank : int
        This process on its node (selects the GPU).
    backend : str or None
        ``"gloo"``, ``"nccl"``, or None without a process group.
    device : str
        ``"cuda:<local_rank>"`` with NCCL, else ``"cpu"``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        """Whether a process group of more than one process is initialised."""
        return self.backend is not None and self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that merges)."""
        return self.rank == 0


def current_context() -> DistributedContext:
    """The :class:`DistributedContext` of the initialised process group, else one process."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency of the experiments
        return DistributedContext()
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    backend = str(dist.get_backend())
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    device = f"cuda:{local}" if backend == "nccl" else "cpu"
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local, backend, device)


def init_distributed(
    backend: str | None = None, *, timeout_s: float = 4 * 3600.0
) -> DistributedContext:
    r"""Initialise the default process group from the launcher's environment.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``. Under ``srun`` without torchrun, ``SLURM_PROCID``, ``SLURM_NTASKS``
    and ``SLURM_LOCALID`` stand for the first three (``MASTER_ADDR`` and ``MASTER_PORT``
    must then be exported, e.g. the first host of ``scontrol show hostnames``). Without
    any of them (a plain ``python`` run) nothing is initialised and the context is one
    process.

    Parameters
    ----------
    backend : {"gloo", "nccl"}, optional
        Default NCCL when CUDA is available, else gloo. With NCCL the process's GPU is
        ``cuda:<LOCAL_RANK>``.
    timeout_s : float
        Collective timeout: the barrier waits this long for the slowest shard.

    Returns
    -------
    DistributedContext
    """
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return current_context()
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "RANK" not in env or int(env.get("WORLD_SIZE", "1")) <= 1:
        return DistributedContext()
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        raise ValueError(
            f"RANK and WORLD_SIZE are set but {missing} are not; launch with torchrun, or "
            "export MASTER_ADDR (the first host of the allocation) and MASTER_PORT"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    local = int(env.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    # a process that exits with the group alive may abort in gloo's threads ("terminate
    # called without an active exception"): tear it down at exit whatever happens
    atexit.register(_destroy_group)
    return current_context()


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def shutdown_distributed() -> None:
    """Wait for every rank, then destroy the default process group (if any).

    Call it at the end of a script launched by torchrun; :func:`init_distributed` also
    registers the destruction (without the barrier) to run at exit.
    """
    ctx = current_context()
    _barrier(ctx)
    _destroy_group()


def _barrier(ctx: DistributedContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def _all_true(ctx: DistributedContext, flag: bool) -> bool:
    """Whether ``flag`` holds on every rank."""
    if not ctx.distributed:
        return flag
    import torch.distributed as dist

    flags: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(flags, bool(flag))
    return all(flags)


# ---------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------
def shard_bounds(n: int, n_shards: int, *, block: int = 1) -> list[tuple[int, int]]:
    r"""Contiguous shards of ``range(n)`` whose boundaries are multiples of ``block``.

    The ``ceil(n / block)`` blocks are dealt out in order, the first
    ``n_blocks mod n_shards`` shards getting one block more; a shard may be empty when there
    are fewer blocks than shards.

    Parameters
    ----------
    n : int
        Number of images.
    n_shards : int
        Number of shards.
    block : int
        The batch size: every batch of a shard is then a batch of the unsharded run.

    Returns
    -------
    list of (start, stop)
        ``n_shards`` half-open ranges covering ``0..n`` in order.

    Examples
    --------
    >>> shard_bounds(10, 3, block=2)
    [(0, 4), (4, 8), (8, 10)]
    """
    for name, v, lo in (("n", n, 0), ("n_shards", n_shards, 1), ("block", block, 1)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    n_blocks = -(-int(n) // int(block))
    base, extra = divmod(n_blocks, int(n_shards))
    out, b = [], 0
    for i in range(int(n_shards)):
        nb = base + (1 if i < extra else 0)
        out.append((min(b * block, n), min((b + nb) * block, n)))
        b += nb
    return out


def shard_dataset(dataset: ImageDataset, start: int, stop: int) -> ImageDataset:
    """Images ``start:stop`` of ``dataset`` as an :class:`~.data.ImageDataset`.

    Same classes, preprocessing and source; ``dataset_id`` gets a ``[start:stop]`` suffix
    and ``indices`` keep the positions in the source.
    """
    from distortion.experiments.data import ImageDataset, SubsetSpec

    if not isinstance(dataset, ImageDataset):
        raise ValueError(
            f"dataset must be an ImageDataset (see load_dataset), got {type(dataset).__name__}"
        )
    if not 0 <= start <= stop <= len(dataset):
        raise ValueError(f"need 0 <= start <= stop <= {len(dataset)}, got {start}:{stop}")
    images, files = dataset.images, dataset.files
    return ImageDataset(
        labels=np.array(dataset.labels[start:stop]),
        class_names=dataset.class_names,
        class_ids=dataset.class_ids,
        source_class_names=dataset.source_class_names,
        indices=np.array(dataset.indices[start:stop]),
        base_id=f"{dataset.dataset_id}[{start}:{stop}]",
        preprocessing=dataset.preprocessing,
        subset=SubsetSpec(),
        images=None if images is None else images[start:stop],
        files=None if files is None else files[start:stop],
        source=dataset.source,
    )


def _check_shards(n_shards: int | None, ctx: DistributedContext) -> int:
    if n_shards is None:
        return ctx.world_size
    if isinstance(n_shards, bool) or not isinstance(n_shards, int | np.integer) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
    return int(n_shards)


@dataclass(frozen=True)
class _Stage:
    """One sharded stage: how to compute, store and merge its shards."""

    name: str
    full_key: str
    options: dict[str, Any]
    suffix: str
    compute: Callable[[int, int], Any]  # (start, stop) -> shard value
    save: Callable[[Any, Path, str], None]  # (value, path, key)
    load: Callable[[Path, str], Any]  # (path, key) -> value or None
    merge: Callable[[list[Any]], Any]
    merged_load: Callable[[], Any]  # -> merged value or None
    merged_save: Callable[[Any], None]


def _shard_key(stage: _Stage, i: int, n_shards: int, bounds: tuple[int, int]) -> str:
    return _cache.content_key(
        {
            "cache": "shard",
            "version": _SHARD_VERSION,
            "stage": stage.name,
            "full_key": stage.full_key,
            "options": stage.options,
            "shard": int(i),
            "n_shards": int(n_shards),
            "bounds": [int(bounds[0]), int(bounds[1])],
        }
    )


def _shard_path(root: Path, stage: _Stage, i: int, n_shards: int, key: str) -> Path:
    name = f"{stage.name}-{stage.full_key[:16]}-{i:05d}of{n_shards:05d}-{key[:16]}{stage.suffix}"
    return root / "shards" / stage.name / name


def _write_shard(stage: _Stage, value: Any, path: Path, key: str) -> None:
    """Write one shard file atomically (a separate function so tests can interrupt it)."""
    stage.save(value, path, key)


def _run_stage(
    stage: _Stage,
    n: int,
    block: int,
    n_shards: int,
    ctx: DistributedContext,
    cache_dir: str | os.PathLike[str] | None,
    *,
    load_merged: bool,
    keep_shards: bool,
) -> Any:
    root = _paths.cache_dir(cache_dir)
    merged = stage.merged_load()
    if _all_true(ctx, merged is not None):
        logger.info("%s: merged result served from the cache", stage.name)
        return merged
    bounds = shard_bounds(n, n_shards, block=block)
    keys = [_shard_key(stage, i, n_shards, b) for i, b in enumerate(bounds)]
    paths = [_shard_path(root, stage, i, n_shards, k) for i, k in enumerate(keys)]
    computed: list[int] = []
    for i in range(ctx.rank, n_shards, ctx.world_size):
        start, stop = bounds[i]
        if start == stop or stage.load(paths[i], keys[i]) is not None:
            continue
        t0 = time.perf_counter()
        value = stage.compute(start, stop)
        _write_shard(stage, value, paths[i], keys[i])
        computed.append(i)
        logger.info(
            "%s: rank %d computed shard %d/%d (images %d:%d) in %.2f s",
            stage.name, ctx.rank, i, n_shards, start, stop, time.perf_counter() - t0,
        )  # fmt: skip
    _barrier(ctx)
    result = None
    if ctx.is_main:
        values, missing = [], []
        for i, (start, stop) in enumerate(bounds):
            if start == stop:
                continue
            v = stage.load(paths[i], keys[i])
            (missing.append(i) if v is None else values.append(v))
        if missing:
            raise RuntimeError(
                f"{stage.name}: shard(s) {missing} of {n_shards} are missing or unreadable "
                f"after the barrier (under {str(paths[missing[0]].parent)!r}); rerun to "
                "recompute them"
            )
        result = stage.merge(values)
        stage.merged_save(result)
        for p in paths:
            for tmp in p.parent.glob(f".{p.name}.*.tmp"):  # left by a killed rank
                with contextlib.suppress(OSError):
                    tmp.unlink()
            if not keep_shards:
                with contextlib.suppress(OSError):
                    p.unlink()
    _barrier(ctx)
    if not ctx.is_main and load_merged:
        result = stage.merged_load()
        if result is None:
            raise RuntimeError(f"{stage.name}: rank 0 wrote no readable merged result")
    return result


def _shard_info(n: int, n_shards: int, block: int, ctx: DistributedContext) -> dict[str, Any]:
    """How a merged result was split (its provenance)."""
    bounds = [list(b) for b in shard_bounds(n, n_shards, block=block)]
    return {"n_shards": n_shards, "world_size": ctx.world_size, "bounds": bounds}


def _auto_device(device: str | None, ctx: DistributedContext) -> str:
    if device is not None:
        return device
    import torch

    if ctx.backend == "nccl" or (ctx.backend is None and torch.cuda.is_available()):
        return f"cuda:{ctx.local_rank}"
    return "cpu"


# ---------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------
def merge_features(
    shards: Sequence[FeatureSet], *, provenance: dict[str, Any] | None = None
) -> FeatureSet:
    """Concatenate the :class:`~.features.FeatureSet` of consecutive shards (numpy only).

    Parameters
    ----------
    shards : sequence of FeatureSet
        In image order; they must share ``W``, ``b`` and the class names.
    provenance : dict, optional
        Provenance of the result (default: the first shard's, with ``n_samples`` updated).

    Returns
    -------
    FeatureSet
        ``features``, ``labels`` and ``logits`` stacked along axis 0.
    """
    from distortion.experiments.features import FeatureSet

    shards = list(shards)
    if not shards:
        raise ValueError("shards is empty: pass at least one FeatureSet")
    first = shards[0]
    for j, s in enumerate(shards[1:], 1):
        if (
            not np.array_equal(s.W, first.W)
            or not np.array_equal(s.b, first.b)
            or s.class_names != first.class_names
        ):
            raise ValueError(
                f"shard {j} has another last layer (W, b) or other classes than shard 0; "
                "were they extracted with the same model?"
            )
    n = sum(len(s) for s in shards)
    prov = dict(first.provenance) if provenance is None else dict(provenance)
    prov.setdefault("n_samples", n)
    if provenance is None:
        prov["n_samples"] = n
    return FeatureSet(
        features=np.concatenate([s.features for s in shards]),
        labels=np.concatenate([s.labels for s in shards]),
        logits=np.concatenate([s.logits for s in shards]),
        W=first.W,
        b=first.b,
        class_names=first.class_names,
        provenance=prov,
    )


def _load_features(path: Path, key: str) -> FeatureSet | None:
    from distortion.experiments.features import FeatureSet

    return _cache.load_cached(
        path, FeatureSet.load, key=key, key_of=lambda f: f.provenance.get("cache_key")
    )


def sharded_extract_features(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    n_shards: int | None = None,
    device: str | None = None,
    load_merged: bool = True,
    keep_shards: bool = False,
    progress: bool = False,
) -> FeatureSet | None:
    r""":func:`~distortion.experiments.features.extract_features`, sharded over the ranks.

    Parameters
    ----------
    model : torch.nn.Module
        The same weights on every rank.
    dataset : ImageDataset
        The same images on every rank; shard ``i`` is ``shard_bounds(n, n_shards,
        block=batch_size)[i]``.
    cache_dir : path, optional
        Shared by all ranks (a shared file system across nodes); default
        ``$DISTORTION_CACHE`` or ``~/.cache/distortion``. Shards go to
        ``shards/features/``, the merged FeatureSet where ``extract_features`` caches it.
    batch_size : int
        Images per forward pass, and the alignment of the shard boundaries.
    n_shards : int, optional
        Number of shards (default the world size); rank ``r`` computes shards
        ``r, r + world_size, ...``.
    device : str, optional
        Default ``cuda:<local_rank>`` under NCCL or when CUDA is available, else ``cpu``.
    load_merged : bool
        Whether ranks other than 0 read and return the merged result (else None).
    keep_shards : bool
        Keep the shard files after a successful merge.
    progress : bool
        Progress bars (rank 0 only).

    Returns
    -------
    FeatureSet or None
        Bit for bit the FeatureSet of ``extract_features(model, dataset,
        batch_size=batch_size)`` on the same device; ``provenance["shards"]`` records the
        split. None on ranks other than 0 when ``load_merged=False``.
    """
    from distortion.experiments.features import (
        _safe,
        extract_features,
        feature_cache_key,
    )
    from distortion.experiments.models import model_info

    ctx = current_context()
    n_shards = _check_shards(n_shards, ctx)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dev = _auto_device(device, ctx)
    key = feature_cache_key(model, dataset)
    info = model_info(model)
    name = info.name if info is not None else type(model).__name__
    merged_file = _paths.cache_dir(cache_dir) / f"features-{_safe(name)}-{key[:32]}.npz"

    def compute(start: int, stop: int) -> FeatureSet:
        fs = extract_features(
            model, shard_dataset(dataset, start, stop), batch_size=batch_size, device=dev,
            cache=False, progress=progress and ctx.is_main,
        )  # fmt: skip
        return fs

    def save(fs: FeatureSet, path: Path, k: str) -> None:
        replace(fs, provenance={**fs.provenance, "cache_key": k}).save(path)

    def merge(values: list[FeatureSet]) -> FeatureSet:
        prov = dict(values[0].provenance)
        prov.update(
            dataset=dataset.dataset_id, dataset_source=dataset.source,
            dataset_fingerprint=dataset.fingerprint, subset=dataset.subset.to_dict(),
            n_samples=len(dataset), seconds=round(sum(v.provenance.get("seconds", 0.0)
                                                      for v in values), 3),
            cache="miss", cache_key=key, cache_file=str(merged_file),
            shards=_shard_info(len(dataset), n_shards, batch_size, ctx),
        )  # fmt: skip
        return merge_features(values, provenance=prov)

    def merged_load() -> FeatureSet | None:
        fs = _load_features(merged_file, key)
        return None if fs is None else replace(fs, provenance={**fs.provenance, "cache": "hit"})

    def merged_save(fs: FeatureSet) -> None:
        try:
            fs.save(merged_file)
        except OSError as exc:
            raise OSError(
                f"could not write the merged features {str(merged_file)!r}: {exc}"
            ) from exc

    stage = _Stage(
        "features", key, {"batch_size": batch_size}, ".npz", compute, save, _load_features,
        merge, merged_load, merged_save,
    )  # fmt: skip
    return _run_stage(
        stage, len(dataset), batch_size, n_shards, ctx, cache_dir,
        load_merged=load_merged, keep_shards=keep_shards,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# gradient Grams
# ---------------------------------------------------------------------------------------
def merge_grams(
    shards: Sequence[GradientGrams], *, key: str | None = None, meta: dict | None = None
) -> GradientGrams:
    """Concatenate the :class:`~distortion.theory.multilayer.GradientGrams` of shards (numpy).

    Parameters
    ----------
    shards : sequence of GradientGrams
        In image order; same layers, weights, options and projection profiles.
    key : str, optional
        Key of the result (default the first shard's).
    meta : dict, optional
        Provenance of the result (default the first shard's).

    Returns
    -------
    GradientGrams
        Every per-sample array (``logits``, ``grams``, ``labels``, ``channel_grams``,
        ``projections``) stacked along axis 0.
    """
    from distortion.theory.multilayer import GradientGrams

    shards = list(shards)
    if not shards:
        raise ValueError("shards is empty: pass at least one GradientGrams")
    first = shards[0]
    per_sample = ("logits", "grams", "labels", "channel_grams", "projections")
    for j, s in enumerate(shards[1:], 1):
        same = (
            s.layer_names == first.layer_names
            and s.layer_kinds == first.layer_kinds
            and s.weight_shapes == first.weight_shapes
            and _same_arrays(s.weights, first.weights)
            and _same_arrays(s.projection_scales, first.projection_scales)
            and all((getattr(s, a) is None) == (getattr(first, a) is None) for a in per_sample)
            and (s.projections is None or s.projections.shape[2] == first.projections.shape[2])
            and _same_truncation(s.truncation, first.truncation)
        )
        if not same:
            raise ValueError(
                f"shard {j} has other layers, weights or options than shard 0; were they "
                "computed with the same model, layers, granularity and n_realizations?"
            )
    arrays = {
        a: None if getattr(first, a) is None else np.concatenate([getattr(s, a) for s in shards])
        for a in per_sample
    }
    return GradientGrams(
        layer_names=first.layer_names,
        layer_kinds=first.layer_kinds,
        weight_shapes=first.weight_shapes,
        **arrays,
        projection_scales=first.projection_scales,
        weights=first.weights,
        truncation=_merge_truncation([s.truncation for s in shards]),
        key=first.key if key is None else key,
        meta=dict(first.meta) if meta is None else dict(meta),
    )


def _same_truncation(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (
        a.n_classes == b.n_classes
        and a.n_probes == b.n_probes
        and a.classes.shape[1] == b.classes.shape[1]
        and (a.channel_tail is None) == (b.channel_tail is None)
    )


def _merge_truncation(parts: Sequence[Any]) -> Any:
    """The shards' :class:`~distortion.theory.multilayer.Truncation` stacked (or None)."""
    from distortion.theory.multilayer import Truncation

    first = parts[0]
    if first is None:
        return None
    ct = None if first.channel_tail is None else np.concatenate([p.channel_tail for p in parts])
    return Truncation(
        classes=np.concatenate([p.classes for p in parts]),
        n_classes=first.n_classes,
        tail=np.concatenate([p.tail for p in parts]),
        channel_tail=ct,
        tail_margin=np.concatenate([p.tail_margin for p in parts]),
        n_probes=first.n_probes,
    )


def _same_arrays(a: Sequence[np.ndarray] | None, b: Sequence[np.ndarray] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _grams_batch_size(
    model: nn.Module, dataset: ImageDataset, names: list[str], granularity: str, memory_mb: int,
    device: str, competitors: int | None = None,
) -> int:  # fmt: skip
    """The batch size ``gradient_grams`` picks from ``memory_mb`` (same formula)."""
    import torch

    from distortion.experiments._torch_state import evaluated_on

    sizes = [math.prod(model.get_submodule(n).weight.shape) for n in names]
    with evaluated_on(model, device) as dev, torch.no_grad():
        x, _ = next(iter(dataset.batches(1)))
        k = int(model(x.to(device=dev, dtype=next(model.parameters()).dtype)).shape[1])
    if competitors is not None:
        k = min(int(competitors) + 1, k)
    per_sample = 4.0 * k * sum(sizes) * (2.0 if granularity == "channel" else 1.5)
    return int(max(1, min(256, memory_mb * 2**20 // max(per_sample, 1.0))))


def sharded_gradient_grams(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    layers: str | Sequence[str] = "all",
    granularity: str = "tensor",
    n_realizations: int = 40,
    batch_size: int | None = None,
    seed: int = 0,
    memory_mb: int = 256,
    n_shards: int | None = None,
    device: str | None = None,
    load_merged: bool = True,
    keep_shards: bool = False,
    progress: bool = False,
    competitors: int | None = None,
    tail_probes: int = 2,
) -> GradientGrams | None:
    r""":func:`~distortion.experiments.sensitivity.gradient_grams`, sharded over the ranks.

    Parameters
    ----------
    model, dataset, cache_dir, n_shards, device, load_merged, keep_shards, progress
        As in :func:`sharded_extract_features` (shards go to ``shards/grams/``, the merged
        result to ``grams/`` where ``gradient_grams`` caches it).
    layers, granularity, n_realizations, seed, memory_mb, competitors, tail_probes
        As in ``gradient_grams`` (the tail probes are seeded by the images' positions in
        the source, so the shards draw what one process draws).
    batch_size : int, optional
        Samples per batch and the alignment of the shards; default the size
        ``gradient_grams`` derives from ``memory_mb``.

    Returns
    -------
    GradientGrams or None
        Bit for bit those of ``gradient_grams`` with the same options and batch size: the
        error draws are seeded per layer (``seed``, layer index) and shared by all shards,
        so the projections agree too. ``meta["shards"]`` records the split.
    """
    from distortion.experiments._torch_state import evaluated_on
    from distortion.experiments.sensitivity import (
        _grams_key,
        _output_fingerprint,
        gradient_grams,
        load_grams,
        resolve_quantizable,
        save_grams,
    )

    ctx = current_context()
    n_shards = _check_shards(n_shards, ctx)
    if granularity not in ("tensor", "channel"):
        raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(n_realizations, int | np.integer) or n_realizations < 0:
        raise ValueError(f"n_realizations must be an integer >= 0, got {n_realizations!r}")
    dev = _auto_device(device, ctx)
    with evaluated_on(model, dev) as d:
        x, _ = next(iter(dataset.batches(2)))
        names = resolve_quantizable(model, layers, x.to(d))
        outputs = _output_fingerprint(model, x, d)
    if batch_size is None:
        batch_size = _grams_batch_size(
            model, dataset, names, granularity, memory_mb, dev, competitors
        )
    truncate = None if competitors is None else (int(competitors), int(tail_probes))
    key = _grams_key(
        model, dataset.fingerprint, names, granularity, int(n_realizations), int(seed), truncate,
        outputs=outputs,
    )  # fmt: skip
    merged_file = _paths.cache_dir(cache_dir) / "grams" / f"grams-{key[:24]}.npz"
    opts = {"layers": names, "granularity": granularity, "n_realizations": int(n_realizations),
            "seed": int(seed), "batch_size": int(batch_size)}  # fmt: skip
    if truncate is not None:
        opts["competitors"], opts["tail_probes"] = truncate

    def load(path: Path, k: str) -> GradientGrams | None:
        return _cache.load_cached(path, load_grams, key=k, key_of=lambda g: g.key)

    def compute(start: int, stop: int) -> GradientGrams:
        return gradient_grams(
            model, shard_dataset(dataset, start, stop), layers=names, granularity=granularity,
            n_realizations=int(n_realizations), batch_size=batch_size, seed=int(seed),
            device=dev, cache=False, progress=progress and ctx.is_main,
            competitors=competitors, tail_probes=tail_probes,
        )  # fmt: skip

    def save(g: GradientGrams, path: Path, k: str) -> None:
        save_grams(replace(g, key=k), path)

    def merge(values: list[GradientGrams]) -> GradientGrams:
        meta = dict(values[0].meta)
        meta.update(
            data=dataset.fingerprint, dataset_id=dataset.dataset_id,
            seconds=sum(float(v.meta.get("seconds", 0.0)) for v in values),
            shards=_shard_info(len(dataset), n_shards, batch_size, ctx),
        )  # fmt: skip
        meta.pop("cache_file", None)
        return merge_grams(values, key=key, meta=meta)

    def merged_save(g: GradientGrams) -> None:
        save_grams(g, merged_file)

    stage = _Stage(
        "grams", key, opts, ".npz", compute, save, load, merge,
        lambda: load(merged_file, key), merged_save,
    )  # fmt: skip
    return _run_stage(
        stage, len(dataset), batch_size, n_shards, ctx, cache_dir,
        load_merged=load_merged, keep_shards=keep_shards,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------
def merge_measurements(shards: Sequence[Measurement]) -> Measurement:
    r"""The :class:`~.measure.Measurement` of all images from those of consecutive shards.

    The per-realization counts add up (:math:`k = \sum_s k_s`, :math:`n_{10}`,
    :math:`n_{01}`, the correct predictions :math:`n\,\mathrm{acc}`), the per-image flips
    are concatenated, and the intervals and p-value are recomputed from the totals (numpy
    and scipy only): the same Measurement as one run over all images.

    Parameters
    ----------
    shards : sequence of Measurement
        Same quantizers, layers, repeats, confidence level; in image order.
    """
    from distortion.experiments.measure import measurement_from_dict, measurement_to_dict

    shards = list(shards)
    if not shards:
        raise ValueError("shards is empty: pass at least one Measurement")
    dicts = [measurement_to_dict(m) for m in shards]
    first = dicts[0]
    same_keys = ("layers", "quantizers", "quantizer", "confidence_level", "bits_per_weight")
    for j, d in enumerate(dicts[1:], 1):
        if any(d[k] != first[k] for k in same_keys) or len(d["flip_counts"]) != len(
            first["flip_counts"]
        ):
            raise ValueError(
                f"shard {j} was measured with other quantizers, layers, repeats or "
                "confidence level than shard 0"
            )

    def correct(d: dict, acc: float) -> int:
        return int(round(acc * d["n"]))  # acc = k / n exactly, so this is k

    n = sum(d["n"] for d in dicts)
    r = len(first["flip_counts"])
    merged = dict(first)
    merged["n"] = n
    merged["accuracy_float"] = sum(correct(d, d["accuracy_float"]) for d in dicts) / n
    merged["accuracies"] = [
        sum(correct(d, d["accuracies"][i]) for d in dicts) / n for i in range(r)
    ]
    for name in ("flip_counts", "n10", "n01"):
        merged[name] = [sum(int(d[name][i]) for d in dicts) for i in range(r)]
    merged["flips"] = [f for d in dicts for f in d["flips"]]
    return measurement_from_dict(merged)


def _measure_key(
    model: nn.Module, dataset: ImageDataset, quantizer: Any, layers: Any, repeats: Any,
    seed: int, batch_size: int, confidence_level: float,
) -> str:  # fmt: skip
    from distortion.experiments.models import state_dict_sha256

    qs = (
        {k: dataclasses.asdict(v) for k, v in quantizer.items()}
        if isinstance(quantizer, dict)
        else dataclasses.asdict(quantizer)
    )
    return _cache.content_key(
        {
            "cache": "measurement",
            "weights": state_dict_sha256(model),
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "data": dataset.fingerprint,
            "quantizer": qs,
            "layers": layers if isinstance(layers, str) else list(layers),
            "repeats": repeats,
            "seed": int(seed),
            "batch_size": int(batch_size),
            "confidence_level": float(confidence_level),
        }
    )


def _save_record(value: dict, path: Path, key: str) -> None:
    import json

    stored = _cache.jsonable(value)
    record = {
        "format": _cache.RECORD_FORMAT,
        "version": _cache.RECORD_VERSION,
        "key": key,
        "sha256": _cache.content_key(stored),
        "value": stored,
    }
    _cache.atomic_write_text(path, json.dumps(record))


def _load_record(path: Path, key: str) -> Any:
    record = _cache.read_json(path, key=key)
    if record is None:
        return None
    try:
        if record.get("sha256") != _cache.content_key(record["value"]):
            raise ValueError("checksum mismatch: the file is garbled")
        return record["value"]
    except Exception as exc:  # noqa: BLE001 - any unusable record is recomputed
        warnings.warn(
            f"ignoring the cache file {str(path)!r} ({exc}); it will be recomputed",
            _cache.CacheWarning,
            stacklevel=2,
        )
        return None


def sharded_measure(
    model: nn.Module,
    dataset: ImageDataset,
    quantizer: UniformQuantizer | dict[str, UniformQuantizer],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    layers: str | Sequence[str] = "all",
    repeats: int | None = None,
    seed: int = 0,
    batch_size: int = 500,
    confidence_level: float = 0.95,
    n_shards: int | None = None,
    device: str | None = None,
    load_merged: bool = True,
    keep_shards: bool = False,
    progress: bool = False,
) -> Measurement | None:
    r""":func:`~distortion.experiments.measure.measure`, sharded over the ranks.

    Every rank quantizes the same copy of the model (the rounding seeds depend on the
    realization and the layer, not on the images) and measures its shards; rank 0 adds
    up the counts (:func:`merge_measurements`). Shards go to ``shards/measure/``, the merged
    record to ``measurements-sharded/<key>.json``.

    Parameters
    ----------
    model, dataset, quantizer, layers, repeats, seed, batch_size, confidence_level
        As in ``measure`` (``batch_size`` also aligns the shards).
    cache_dir, n_shards, device, load_merged, keep_shards, progress
        As in :func:`sharded_extract_features`.

    Returns
    -------
    Measurement or None
        The same flips, counts, intervals and p-value as ``measure`` over all images.
    """
    from distortion.experiments.measure import measure, measurement_from_dict, measurement_to_dict

    ctx = current_context()
    n_shards = _check_shards(n_shards, ctx)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dev = _auto_device(device, ctx)
    key = _measure_key(model, dataset, quantizer, layers, repeats, seed, batch_size,
                       confidence_level)  # fmt: skip
    merged_file = _paths.cache_dir(cache_dir) / "measurements-sharded" / f"{key}.json"

    def compute(start: int, stop: int) -> dict:
        m = measure(
            model, shard_dataset(dataset, start, stop), quantizer, layers=layers,
            repeats=repeats, seed=seed, batch_size=batch_size, device=dev,
            progress=progress and ctx.is_main, confidence_level=confidence_level,
        )  # fmt: skip
        return measurement_to_dict(m)

    def load(path: Path, k: str) -> dict | None:
        v = _load_record(path, k)
        if v is None:
            return None
        try:
            measurement_from_dict(v)
        except Exception as exc:  # noqa: BLE001 - an unusable record is recomputed
            warnings.warn(
                f"ignoring the cache file {str(path)!r} ({exc})", _cache.CacheWarning,
                stacklevel=2,
            )  # fmt: skip
            return None
        return v

    def merge(values: list[dict]) -> dict:
        return measurement_to_dict(merge_measurements([measurement_from_dict(v) for v in values]))

    stage = _Stage(
        "measure", key, {"batch_size": batch_size}, ".json", compute, _save_record, load,
        merge, lambda: load(merged_file, key), lambda v: _save_record(v, merged_file, key),
    )  # fmt: skip
    out = _run_stage(
        stage, len(dataset), batch_size, n_shards, ctx, cache_dir,
        load_merged=load_merged, keep_shards=keep_shards,
    )  # fmt: skip
    return None if out is None else measurement_from_dict(out)


# ---------------------------------------------------------------------------------------
# grids of cells (configurations)
# ---------------------------------------------------------------------------------------
def _task_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    if rank is None:
        env = os.environ
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            rank, world_size = task, int(env["SLURM_ARRAY_TASK_COUNT"])
        else:
            ctx = current_context()
            rank, world_size = ctx.rank, ctx.world_size
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def sharded_cells(
    cells: Sequence[T], rank: int | None = None, world_size: int | None = None
) -> list[tuple[int, T]]:
    r"""The cells of a grid that this task computes: ``(index, cell)`` for every
    ``index % world_size == rank``.

    Round robin, so that neighbouring (often similarly costly) cells go to different tasks.

    Parameters
    ----------
    cells : sequence
        The configurations, e.g. quantizers; the same on every task.
    rank, world_size : int, optional
        This task and the number of tasks. Default: ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN``
        and ``SLURM_ARRAY_TASK_COUNT`` in a SLURM array job, else the process group's rank and
        size, else 0 and 1 (every cell).
    """
    rank, world_size = _task_rank_world(rank, world_size)
    return [(i, c) for i, c in enumerate(cells) if i % world_size == rank]


def _cell_key(namespace: str, cell_key: Any) -> str:
    return _cache.content_key({"cache": "cell", "namespace": namespace, "cell": cell_key})


def _cell_path(cache_dir: Any, namespace: str, key: str) -> Path:
    if not namespace or not all(c.isalnum() or c in "-_." for c in namespace):
        raise ValueError(f"namespace must be a file-name-safe string, got {namespace!r}")
    return _paths.cache_dir(cache_dir) / "cells" / namespace / f"{key}.json"


def run_cells(
    cells: Sequence[T],
    compute: Callable[[T], Any],
    *,
    key_of: Callable[[T], Any],
    namespace: str,
    cache_dir: str | os.PathLike[str] | None = None,
    encode: Callable[[Any], Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> list[int]:
    """Compute this task's cells (:func:`sharded_cells`), each result a JSON record.

    Parameters
    ----------
    cells : sequence
        The grid, the same on every task.
    compute : callable
        ``compute(cell)`` gives the cell's result.
    key_of : callable
        ``key_of(cell)``: everything the result depends on (JSON types, arrays, dataclasses;
        include the model's and data's hashes), hashed with ``content_key``.
    namespace : str
        Folder under ``<cache_dir>/cells/``.
    cache_dir : path, optional
    encode : callable, optional
        Result to JSON types (default :func:`~._cache.jsonable`), e.g.
        ``measurement_to_dict``.
    rank, world_size : int, optional
        As in :func:`sharded_cells`.

    Returns
    -------
    list of int
        The indices of the cells computed now (cells with a valid record are skipped).
    """
    done = []
    for i, cell in sharded_cells(cells, rank, world_size):
        key = _cell_key(namespace, key_of(cell))
        path = _cell_path(cache_dir, namespace, key)
        if _load_record(path, key) is not None:
            continue
        value = compute(cell)
        _save_record(encode(value) if encode is not None else value, path, key)
        done.append(i)
    return done


@dataclass(frozen=True)
class CellGrid:
    """The merged results of a grid of cells (:func:`merge_cells`).

    Attributes
    ----------
    cells : tuple
        The configurations, in grid order.
    results : tuple
        The decoded result of each cell, None where missing.
    missing : tuple of int
        Indices of the cells without a valid record (to rerun).
    """

    cells: tuple[Any, ...]
    results: tuple[Any, ...] = field(repr=False)
    missing: tuple[int, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether every cell has a result."""
        return not self.missing


def merge_cells(
    cells: Sequence[T],
    *,
    key_of: Callable[[T], Any],
    namespace: str,
    cache_dir: str | os.PathLike[str] | None = None,
    decode: Callable[[Any], Any] | None = None,
    require_all: bool = True,
) -> CellGrid:
    """Collect the records of every cell written by :func:`run_cells` (numpy only).

    Parameters
    ----------
    cells, key_of, namespace, cache_dir
        As given to :func:`run_cells`.
    decode : callable, optional
        JSON value to result, e.g. ``measurement_from_dict``.
    require_all : bool
        Raise a ValueError naming the missing cells (else they are None in ``results``).
    """
    results, missing = [], []
    for i, cell in enumerate(cells):
        key = _cell_key(namespace, key_of(cell))
        value = _load_record(_cell_path(cache_dir, namespace, key), key)
        if value is None:
            missing.append(i)
            results.append(None)
        else:
            results.append(decode(value) if decode is not None else value)
    if missing and require_all:
        raise ValueError(
            f"{len(missing)} of {len(cells)} cells have no result yet (indices "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}); run their tasks again"
        )
    return CellGrid(tuple(cells), tuple(results), tuple(missing))
