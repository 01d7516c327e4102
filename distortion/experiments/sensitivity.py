r"""Per-sample logit-Jacobian Grams of the quantizable layers, and the Hutchinson Hessian trace.

:func:`gradient_grams` computes, for every sample :math:`x_i` and every quantizable layer
:math:`\ell`, the :math:`K\times K` Gram matrix
:math:`\Gamma_\ell(x_i) = J_\ell(x_i)J_\ell(x_i)^\top` of the Jacobian
:math:`J_\ell = \partial z/\partial\operatorname{vec}(W_\ell)` (``theory/multilayer.md``,
eq. L3), optionally per output channel, and R realizations :math:`J_\ell\varepsilon^{(r)}`
of a unit-variance uniform error (eq. L12). It runs one forward pass and K backward
passes per batch: the backward pass of :math:`\sum_i z_k(x_i)` gives every layer's
*output* gradient per sample (samples are independent in eval mode), and the per-sample
weight gradient of a linear or convolution layer is the product of that output gradient
with the layer's (unfolded) input [1]_ — no per-sample loop (eq. L16). Layers are found in
any network (:func:`resolve_quantizable`): ``nn.Conv1d/2d/3d``, ``nn.Linear`` and the
projections of ``nn.MultiheadAttention``, whose inputs and outputs a ``TorchFunctionMode``
records (section 12 of ``theory/multilayer.md``). The result is cached on disk
under a key of the weights, the data, the layers and the options.

:func:`hessian_trace` estimates :math:`\operatorname{Tr}(H_\ell)` of the cross-entropy
Hessian with respect to each layer's weights by Hutchinson's estimator with Rademacher
vectors and Hessian-vector products by double back-propagation [2]_ [3]_ (HAWQ-V2).

torch is imported inside the functions only.

References
----------
.. [1] I. Goodfellow, "Efficient per-example gradient computations", arXiv:1510.01799, 2015.
.. [2] M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
   Laplacian smoothing splines", Comm. Statist. Simulation Comput. 18(3), 1989.
.. [3] Z. Dong, Z. Yao, D. Arfeen, A. Gholami, M. W. Mahoney and K. Keutzer, "HAWQ-V2:
   Hessian aware trace-weighted quantization of neural networks", NeurIPS 2020.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from distortion.experiments import _cache, _paths
from distortion.theory.baselines import HessianTrace
from distortion.theory.multilayer import GradientGrams, Truncation

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "gradient_grams",
    "hessian_trace",
    "load_grams",
    "resolve_quantizable",
    "save_grams",
]

#: Bumped whenever the cached arrays change meaning.
_CACHE_VERSION = 1
_FORMAT = "distortion.GradientGrams"


# ----------------------------------------------------------------------------- data
_ACCEPTED = (
    "an ImageDataset (or any object with batches(batch_size) and len), a "
    "torch.utils.data.DataLoader of (x, y) batches (not shuffled), a TensorDataset or other "
    "map-style Dataset of (x, y) items, an (x, y) pair of a tensor/array of shape (N, ...) and "
    "labels of shape (N,), or an input tensor/array alone"
)


def _kind(data: Any) -> str:
    """Which accepted form ``data`` is: "dataset", "loader", "pair", "array"; else ValueError."""
    if hasattr(data, "batches") and hasattr(data, "__len__"):
        return "dataset"
    try:
        import torch.utils.data as tud
    except ImportError:  # pragma: no cover
        tud = None
    if tud is not None and isinstance(data, tud.DataLoader):
        if isinstance(data.sampler, tud.RandomSampler):
            raise ValueError(
                "the DataLoader shuffles (shuffle=True): every pass would see another order; "
                "pass one with shuffle=False"
            )
        return "loader"
    if tud is not None and isinstance(data, tud.TensorDataset):
        return "pair" if len(data.tensors) in (1, 2) else "bad"
    if tud is not None and isinstance(data, tud.Dataset) and hasattr(data, "__len__"):
        return "loader"
    if isinstance(data, tuple | list) and len(data) == 2:
        return "pair"
    if hasattr(data, "shape") and hasattr(data, "dtype"):  # tensor or ndarray
        return "array"
    return "bad"


def _check_kind(data: Any) -> str:
    kind = _kind(data)
    if kind == "bad":
        raise ValueError(f"data must be {_ACCEPTED}; got {type(data).__name__}")
    return kind


def _pair(data: Any) -> tuple[Any, Any]:
    import torch.utils.data as tud

    if isinstance(data, tud.TensorDataset):
        t = data.tensors
        return (t[0], t[1]) if len(t) == 2 else (t[0], None)
    if isinstance(data, tuple | list):
        return data[0], data[1]
    return data, None


def _loader(data: Any, batch_size: int) -> Any:
    import torch.utils.data as tud

    if isinstance(data, tud.DataLoader):
        return data
    return tud.DataLoader(data, batch_size=batch_size, shuffle=False)


def _split_item(item: Any) -> tuple[Any, Any]:
    import torch

    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, tuple | list) and len(item) == 2:
        return torch.as_tensor(item[0]), torch.as_tensor(item[1])
    raise ValueError(
        f"DataLoader batches must be (x, y) pairs or input tensors, got {type(item).__name__}"
        + (f" of length {len(item)}" if isinstance(item, tuple | list) else "")
    )


def _rechunk(batches: Any, batch_size: int) -> Iterator[tuple[Any, Any]]:
    """Batches of exactly ``batch_size`` samples (the last one shorter), in order."""
    import torch

    xs: list[Any] = []
    ys: list[Any] = []
    n = 0
    for item in batches:
        x, y = _split_item(item)
        xs.append(x)
        ys.append(y)
        n += x.shape[0]
        while n >= batch_size:
            xa = torch.cat(xs) if len(xs) > 1 else xs[0]
            ya = None if ys[0] is None else (torch.cat(ys) if len(ys) > 1 else ys[0])
            yield xa[:batch_size], None if ya is None else ya[:batch_size]
            xs, ys = [xa[batch_size:]], [None if ya is None else ya[batch_size:]]
            n -= batch_size
    if n:
        xa = torch.cat(xs)
        yield xa, None if ys[0] is None else torch.cat(ys)


def _batches(data: Any, batch_size: int) -> Iterator[tuple[Any, Any]]:
    """Yield ``(x, y)`` batches (y may be None) from any accepted data form (``_ACCEPTED``).

    A DataLoader's (or Dataset's) batches are re-cut to ``batch_size`` samples, so that
    every form of the same samples gives the same batches.
    """
    import torch

    kind = _check_kind(data)
    if kind == "dataset":
        yield from data.batches(batch_size)
        return
    if kind == "loader":
        yield from _rechunk(_loader(data, batch_size), batch_size)
        return
    x, y = _pair(data)
    x = torch.as_tensor(x)
    yt = None if y is None else torch.as_tensor(np.asarray(y))
    for s in range(0, x.shape[0], batch_size):
        yield x[s : s + batch_size], None if yt is None else yt[s : s + batch_size]


def _n_samples(data: Any) -> int | None:
    """Number of samples without reading them (for progress bars; None when unknown)."""
    kind = _check_kind(data)
    if kind == "dataset":
        return len(data)
    if kind == "loader":
        ds = getattr(data, "dataset", data)
        return len(ds) if hasattr(ds, "__len__") else None
    return int(_pair(data)[0].shape[0])


def _loader_info(data: Any, fingerprint: bool) -> tuple[int, np.ndarray | None, str]:
    """One pass over a DataLoader: samples, labels and a sha256 of inputs and labels."""
    from tqdm.auto import tqdm

    h = hashlib.sha256(b"loader")
    n, labels, rest, dtype = 0, [], None, None
    loader = _loader(data, 256)
    for item in tqdm(loader, desc="reading data", disable=None, leave=False):
        x, y = _split_item(item)
        if rest is None:
            rest, dtype = tuple(x.shape[1:]), x.dtype
            has_y = y is not None
        if tuple(x.shape[1:]) != rest or (y is not None) != has_y:
            raise ValueError(
                f"the DataLoader's batches differ in sample shape or labels: {rest} then "
                f"{tuple(x.shape[1:])}"
            )
        if fingerprint:
            h.update(np.ascontiguousarray(x.detach().cpu().numpy()).tobytes())
        if y is not None:
            ya = np.asarray(y.detach().cpu().numpy())
            if ya.shape != (x.shape[0],):
                raise ValueError(f"labels must have shape ({x.shape[0]},), got {ya.shape}")
            labels.append(ya.astype(np.int64))
        n += x.shape[0]
    if n == 0:
        raise ValueError("the DataLoader gives no samples")
    lab = np.concatenate(labels) if labels else None
    h.update(repr((n, rest, str(dtype))).encode())
    if lab is not None:
        h.update(lab.tobytes())
    return n, lab, h.hexdigest()


def _data_info(data: Any, *, fingerprint: bool = True) -> tuple[int, np.ndarray | None, str]:
    """(number of samples, labels or None, fingerprint) of the accepted data forms.

    A DataLoader is read once for this (it must give the same samples on every pass: no
    shuffling, no random augmentation). ``fingerprint=False`` skips hashing the inputs.
    """
    kind = _check_kind(data)
    if kind == "dataset":
        labels = getattr(data, "labels", None)
        fp = getattr(data, "fingerprint", None) if fingerprint else ""
        if fp is None:
            fp = getattr(data, "dataset_id", repr(data))
        return len(data), None if labels is None else np.asarray(labels, np.int64), str(fp)
    if kind == "loader":
        return _loader_info(data, fingerprint)
    x, y = _pair(data)
    xa = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if xa.ndim < 2 or xa.shape[0] == 0:
        raise ValueError(f"data must hold at least one sample (shape (N, ...)), got {xa.shape}")
    h = hashlib.sha256()
    h.update(repr((xa.shape, str(xa.dtype))).encode())
    if fingerprint:
        h.update(np.ascontiguousarray(xa).tobytes())
    labels = None
    if y is not None:
        labels = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y)
        if labels.shape != (xa.shape[0],):
            raise ValueError(f"labels must have shape ({xa.shape[0]},), got {labels.shape}")
        labels = labels.astype(np.int64)
        h.update(labels.tobytes())
    return xa.shape[0], labels, h.hexdigest() if fingerprint else ""


def _model_hash(model: nn.Module) -> str:
    from distortion.experiments.models import state_dict_sha256

    return state_dict_sha256(model)


# ----------------------------------------------------------------------------- layers
def _discovery(model: nn.Module, example: torch.Tensor):
    from distortion.experiments.models import _discover

    return _discover(model, example)


def _select(found: Any, model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """The chosen layer names (forward order) of a discovery; warns about tied weights and
    skipped layers, raises a ValueError for unknown or unsupported ones."""
    from distortion.experiments.models import SUPPORTED_LAYER_TYPES

    known = [sp.name for sp in found.layers]
    if not known:
        raise ValueError(
            f"model {type(model).__name__} calls no supported layer "
            f"({', '.join(SUPPORTED_LAYER_TYPES)}); unsupported: {found.unsupported}"
        )
    if isinstance(layers, str):
        if layers == "all":
            if found.unsupported:
                notes = "; ".join(f"{n!r}: {why}" for n, why in found.unsupported.items())
                warnings.warn(
                    f"layers='all' skips {len(found.unsupported)} layer(s) with weights that "
                    f"are not supported (types {', '.join(SUPPORTED_LAYER_TYPES)}): {notes}",
                    UserWarning,
                    stacklevel=3,
                )
            names = known
            _warn_tied(found, names)
            return names
        if layers == "last":
            lin = [sp.name for sp in found.layers if sp.kind == "linear" and sp.role == "module"]
            if not lin:
                raise ValueError(f"model {type(model).__name__} has no nn.Linear layer")
            _warn_tied(found, lin[-1:])
            return lin[-1:]
        layers = [layers]
    names = list(layers)
    if not names:
        raise ValueError("layers is empty: pass 'last', 'all' or a list of layer names")
    bad = {n: found.unsupported[n] for n in names if n in found.unsupported}
    if bad:
        raise ValueError(
            "layer(s) not supported: "
            + "; ".join(f"{n!r}: {why}" for n, why in bad.items())
            + f" (supported types: {', '.join(SUPPORTED_LAYER_TYPES)})"
        )
    unknown = [n for n in names if n not in known and n not in found.aliases]
    if unknown:
        shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        raise ValueError(f"unknown layer(s) {unknown}; quantizable layers are: {shown}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers must not repeat a name, got {names}")
    kept = list(dict.fromkeys(found.aliases.get(n, n) for n in names))
    _warn_tied(found, kept)
    return sorted(kept, key=known.index)


def _warn_tied(found: Any, names: list[str]) -> None:
    tied = {sp.name: sp.tied for sp in found.layers if sp.name in names and sp.tied}
    if tied:
        warnings.warn(
            "tied weights (one tensor used by several layers) are analysed once, under their "
            "first use, with the Jacobian through every use: "
            + "; ".join(f"{n!r} also as {', '.join(map(repr, t))}" for n, t in tied.items()),
            UserWarning,
            stacklevel=4,
        )


def resolve_quantizable(
    model: nn.Module, layers: str | Sequence[str], example: torch.Tensor
) -> list[str]:
    """Names of the layers to analyse, in the order the forward pass runs them.

    Parameters
    ----------
    model : torch.nn.Module
    layers : "all", "last" or sequence of str
        Every supported layer the forward pass calls (``nn.Conv1d/2d/3d``, grouped and
        depthwise included, ``nn.Linear``, and the input projection ``<attention>.in_proj``
        and output projection ``<attention>.out_proj`` of ``nn.MultiheadAttention``), the
        last ``nn.Linear``, or the named layers.
    example : torch.Tensor of shape (B, ...)
        An input batch, to find the forward order and each layer's batch dimension.

    Raises
    ------
    ValueError
        An unknown layer (the message lists the quantizable layers), or a named layer that
        is not supported (the message names its type).

    Warns
    -----
    UserWarning
        With ``layers="all"``, when layers with weights of an unsupported type are skipped
        (listed); when a chosen weight is tied (used by several modules): it is analysed
        once, under its first use.
    """
    return _select(_discovery(model, example), model, layers)


# ----------------------------------------------------------------------------- per-sample J
def _unfold_nd(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Patches (B, C * prod(k), P) of a padded N-d input, channels then kernel offsets."""
    nd = a.ndim - 2
    for i in range(nd):
        k, d, st = module.kernel_size[i], module.dilation[i], module.stride[i]
        a = a.unfold(2 + i, d * (k - 1) + 1, st)
        if d > 1:
            a = a[..., ::d]
    b, c = a.shape[:2]
    perm = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return a.permute(perm).reshape(b, c * math.prod(module.kernel_size), -1)


def _layer_input(module: nn.Module, a: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """The input as the weight sees it: (B, T, in) for a linear layer (samples along
    ``batch_dim`` of ``a``), the unfolded patches (B, groups, in/groups * prod(k), P) for a
    convolution. ``module=None`` stands for an attention projection (linear)."""
    import torch.nn.functional as F
    from torch import nn

    if module is None or isinstance(module, nn.Linear):
        if batch_dim:
            a = a.movedim(batch_dim, 0)
        return a.reshape(a.shape[0], -1, a.shape[-1])
    b = a.shape[0]
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        pad = tuple(module._reversed_padding_repeated_twice)
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            a = F.pad(a, pad, mode=mode)
        if isinstance(module, nn.Conv2d):
            u = F.unfold(a, module.kernel_size, dilation=module.dilation, stride=module.stride)
        else:
            u = _unfold_nd(module, a)
        return u.reshape(b, module.groups, u.shape[1] // module.groups, -1)
    raise ValueError(
        f"layer type {type(module).__name__} is not supported; only nn.Conv1d/2d/3d, "
        "nn.Linear and the projections of nn.MultiheadAttention"
    )


def _per_sample_jacobian(
    module: nn.Module, u: torch.Tensor, g: torch.Tensor, batch_dim: int = 0
) -> torch.Tensor:
    r"""Per-sample gradient of ``sum(g * module(a))`` w.r.t. the weight, shape (B, n_weights).

    ``u`` is :func:`_layer_input` of the layer input, ``g`` the gradient at the layer's
    output (samples along ``batch_dim``): the weight gradient is ``g U^T`` [1]_, for a
    linear layer on a sequence :math:`\sum_t g_t a_t^\top` (``theory/multilayer.md``,
    eq. L16; ``module=None``: an attention projection).
    """
    import torch
    from torch import nn

    if module is None or isinstance(module, nn.Linear):
        if batch_dim:
            g = g.movedim(batch_dim, 0)
        b = g.shape[0]
        g2 = g.reshape(b, -1, g.shape[-1])
        return torch.bmm(g2.transpose(1, 2), u).reshape(b, -1)  # (B, out * in), (eq. L16)
    b = g.shape[0]
    groups = u.shape[1]
    g2 = g.reshape(b, groups, g.shape[1] // groups, -1)
    return torch.matmul(g2, u.transpose(2, 3)).reshape(b, -1)  # (B, out * in/groups * prod k)


def _attention_recorder(watch: dict[int, str], record: Any) -> Any:
    r"""A ``TorchFunctionMode`` that runs ``F.multi_head_attention_forward`` with its watched
    projections (weights whose ``id`` is in ``watch``) computed outside, so that their
    inputs and outputs can be recorded: ``record(name, a, out, row_offset)``.

    The in-projection is computed here exactly as inside (one packed product for
    self-attention, q and kv for shared key/value, three otherwise) and handed over through
    identity projection weights; the out-projection gets the identity and is applied here
    to the attention output. A product with the identity is exact in floating point, so
    the logits are those of the plain forward pass (section "Any module" of
    ``theory/multilayer.md``).
    """
    import inspect

    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    sig = inspect.signature(F.multi_head_attention_forward)

    class _Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not F.multi_head_attention_forward:
                return func(*args, **kwargs)
            ba = sig.bind(*args, **kwargs)
            ba.apply_defaults()
            p = ba.arguments
            sep = p["use_separate_proj_weight"]
            w_in = (
                [p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]]
                if sep
                else [p["in_proj_weight"]]
            )
            watch_in = [watch.get(id(w)) for w in w_in]
            out_name = watch.get(id(p["out_proj_weight"]))
            if not any(watch_in) and out_name is None:
                return func(*args, **kwargs)
            q, k, v = p["query"], p["key"], p["value"]
            if q.dim() != 3:
                raise ValueError("an attention layer called on an unbatched input is not supported")
            e = p["embed_dim_to_check"]
            eye = torch.eye(e, dtype=q.dtype, device=q.device)
            if any(watch_in):
                b_in = p["in_proj_bias"]
                bq = bk = bv = None
                if b_in is not None:
                    bq, bk, bv = b_in.chunk(3)
                if not sep:
                    w, name = w_in[0], watch_in[0]
                    if k is v and q is k:  # self-attention: one packed product
                        proj = F.linear(q, w, b_in)
                        record(name, q, proj, 0)
                        q, k, v = proj[..., :e], proj[..., e : 2 * e], proj[..., 2 * e :]
                    elif k is v:  # shared key and value
                        b_kv = None if b_in is None else b_in[e:]
                        pq = F.linear(q, w[:e], bq)
                        pkv = F.linear(k, w[e:], b_kv)
                        record(name, q, pq, 0)
                        record(name, k, pkv, e)
                        q, k, v = pq, pkv[..., :e], pkv[..., e:]
                    else:
                        outs = []
                        for i, (t, bi) in enumerate(((q, bq), (k, bk), (v, bv))):
                            outs.append(F.linear(t, w[i * e : (i + 1) * e], bi))
                            record(name, t, outs[-1], i * e)
                        q, k, v = outs
                else:
                    outs = []
                    triples = zip((q, k, v), w_in, (bq, bk, bv), watch_in, strict=True)
                    for t, wi, bi, name in triples:
                        outs.append(F.linear(t, wi, bi))
                        if name is not None:
                            record(name, t, outs[-1], 0)
                    q, k, v = outs
                p.update(query=q, key=k, value=v, in_proj_weight=None, in_proj_bias=None,
                         use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
                         v_proj_weight=eye)  # fmt: skip
            w_out, b_out = p["out_proj_weight"], p["out_proj_bias"]
            if out_name is not None:
                p.update(out_proj_weight=eye, out_proj_bias=None)
            y, weights = func(*ba.args, **ba.kwargs)
            if out_name is not None:
                t, bsz = y.shape[:2]
                out = F.linear(y.reshape(t * bsz, e), w_out, b_out).view(t, bsz, -1)
                record(out_name, y, out, 0)
                y = out.clone()  # later in-place ops must not touch the recorded output
            return y, weights

    return _Recorder()


def channel_profile(w: np.ndarray, granularity: str) -> np.ndarray:
    """The per-output-channel scale of the unit-variance draws (eq. L12): ones per tensor,
    the rms-normalised max |w| of each output channel per channel."""
    if granularity != "channel":
        return np.ones(w.shape[0])
    prof = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    rms = math.sqrt(float(np.mean(prof**2)))
    return prof / rms if rms > 0 else np.ones(w.shape[0])


def _uniform_draws(
    n_weights: int, n_realizations: int, profile: np.ndarray, seed: int, index: int
) -> np.ndarray:
    """Unit-variance uniform draws, shape (n, R), rows scaled by the channel profile (eq. L12)."""
    rng = np.random.default_rng([seed, index, 7741])
    e = rng.uniform(-math.sqrt(3.0), math.sqrt(3.0), size=(n_weights, n_realizations))
    per = n_weights // profile.size
    return e * np.repeat(profile, per)[:, None]


def gradient_grams(
    model: nn.Module,
    data: Any,
    *,
    layers: str | Sequence[str] = "all",
    granularity: Literal["tensor", "channel"] = "tensor",
    n_realizations: int = 40,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    memory_mb: int = 256,
    progress: bool = True,
    competitors: int | None = None,
    tail_probes: int = 2,
    input_means: Any = None,
) -> GradientGrams:
    r"""Per-sample Gram matrices of the logit Jacobian of each layer, cached on disk.

    Parameters
    ----------
    model : torch.nn.Module
        Any network; its quantizable layers are ``nn.Conv1d/2d/3d`` (grouped and depthwise
        included), ``nn.Linear`` and the projections of ``nn.MultiheadAttention`` (see
        :func:`resolve_quantizable`). It is run in eval mode (batch norm uses its running
        statistics, so samples are independent) and left as it was.
    data : ImageDataset, DataLoader, Dataset, (x, y) or tensor
        An :class:`~distortion.experiments.data.ImageDataset` (``batches``, ``labels``,
        ``fingerprint``), a ``torch.utils.data.DataLoader`` of (x, y) batches (not
        shuffled; read once more for the labels and the cache key), a ``TensorDataset`` or
        another map-style ``Dataset`` of (x, y) items, a pair of an input tensor of shape
        (N, ...) and labels of shape (N,), or an input tensor alone (no accuracy then).
    layers : "all", "last" or sequence of str
        Layers to analyse (see :func:`resolve_quantizable`).
    granularity : {"tensor", "channel"}
        Also keep one Gram per output channel (needed for per-channel steps; memory
        N x C x K(K+1)/2 float32).
    n_realizations : int
        Error realizations R kept for the band of one realization (0: none).
    batch_size : int, optional
        Samples per batch (default: from ``memory_mb``).
    seed : int
        Seed of the error realizations.
    device : str
    cache : bool
        Read and write the cache.
    cache_dir : path, optional
        Default ``$DISTORTION_CACHE`` or ``~/.cache/distortion``; files go to ``grams/``.
    memory_mb : int
        Budget for the per-sample Jacobians of one batch (K x sum of layer sizes floats
        per sample).
    progress : bool
        Show a progress bar (on a terminal only).
    competitors : int, optional
        Keep only the m nearest competitors of each sample (the classes of smallest float
        margin, eq. L17): m + tail_probes backward passes per batch instead of K, memory
        N x (m+1)^2 per layer instead of N x K^2 — for many classes (ImageNet's 1 000). The
        result carries a :class:`~distortion.theory.multilayer.Truncation`. None: all K.
    tail_probes : int
        Rademacher probes of the Hutchinson estimate of what the other classes could add
        (eq. L18), behind the bound of eq. L19 (0: no bound). Only with ``competitors``.
    input_means : InputMeans, optional
        The Grams of the bias-corrected network
        (:mod:`~distortion.experiments.bias_correction`): every layer's input patches are
        centred on these calibration means, :math:`U - \bar u\,1^\top` (eq. L23). Must
        cover every analysed layer (convolutions and linear modules only).

    Returns
    -------
    GradientGrams
        ``meta["tied"]`` maps each analysed layer whose weight several modules use to the
        other names (the layer stands for all of them, once); ``meta["skipped"]`` lists the
        layers with weights of unsupported types, with the reason.

    Notes
    -----
    For a layer with input :math:`a` (unfolded to :math:`U` for a convolution) and output
    gradient :math:`g_k = \partial z_k/\partial(\text{output})`, the per-sample weight
    gradient is :math:`g_k U^\top` [1]_, and

    .. math:: [\Gamma_\ell(x)]_{jk} = \langle \partial z_j/\partial W_\ell,
              \partial z_k/\partial W_\ell \rangle \qquad \text{(eq. L3)} .
    """
    from tqdm.auto import tqdm

    if granularity not in ("tensor", "channel"):
        raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")
    if not isinstance(n_realizations, int | np.integer) or n_realizations < 0:
        raise ValueError(f"n_realizations must be an integer >= 0, got {n_realizations!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if competitors is not None and (
        isinstance(competitors, bool) or not isinstance(competitors, int | np.integer)
        or competitors < 1
    ):  # fmt: skip
        raise ValueError(
            f"competitors must be a positive integer (the nearest classes kept), got "
            f"{competitors!r}; pass None to keep all classes"
        )
    if (
        isinstance(tail_probes, bool)
        or not isinstance(tail_probes, int | np.integer)
        or (tail_probes < 0)
    ):
        raise ValueError(f"tail_probes must be an integer >= 0, got {tail_probes!r}")
    truncate = None if competitors is None else (int(competitors), int(tail_probes))
    n_total, labels, data_fp = _data_info(data)
    if n_total == 0:
        raise ValueError("data holds no samples")
    from distortion.experiments._torch_state import evaluated_on

    # the caller's model goes back to its devices and training modes, also on errors
    with evaluated_on(model, device) as dev:
        first_x, _ = next(iter(_batches(data, 2)))
        names = resolve_quantizable(model, layers, first_x.to(dev))
        centre = _centring(model, names, input_means, first_x.to(dev))
        key = _grams_key(
            model, data_fp, names, granularity, int(n_realizations), int(seed), truncate,
            outputs=_output_fingerprint(model, first_x, dev),
            centred=None if input_means is None else input_means.key,
        )  # fmt: skip
        path = _paths.cache_dir(cache_dir) / "grams" / f"grams-{key[:24]}.npz"
        # a missing, unreadable, garbled or stale file: a CacheWarning, then recomputed
        if cache:
            cached = _cache.load_cached(path, load_grams, key=key, key_of=lambda g: g.key)
            if cached is not None:
                return cached
        grams = _compute_grams(
            model, data, names, granularity, int(n_realizations), batch_size, int(seed),
            dev, memory_mb, progress, n_total, labels, key, tqdm, truncate, centre,
        )  # fmt: skip
    meta = dict(grams.meta)
    meta.update({"data": data_fp, "dataset_id": str(getattr(data, "dataset_id", "arrays"))})
    if input_means is not None:
        meta["bias_correction"] = {"n_samples": input_means.n_samples,
                                   "dataset_id": input_means.dataset_id}  # fmt: skip
    info = getattr(model, "distortion_info", None)
    if info is not None and hasattr(info, "to_dict"):
        meta["model"] = info.to_dict()
    grams = _replace_meta(grams, meta)
    if cache:
        try:
            save_grams(grams, path)
        except OSError as exc:
            warnings.warn(
                f"could not write the gradient-gram cache {str(path)!r}: {exc}",
                _cache.CacheWarning,
                stacklevel=2,
            )
    return grams


def _centring(model: nn.Module, names: list[str], means: Any, example: Any) -> Any:
    """The input means of ``names`` as tensors (None without bias correction)."""
    import torch

    if means is None:
        return None
    from distortion.experiments.bias_correction import InputMeans, _check_bias_layers
    from distortion.experiments.models import get_layer

    if not isinstance(means, InputMeans):
        raise ValueError(
            f"input_means must be an InputMeans (distortion.experiments.bias_correction."
            f"input_means(model, calibration_data)), got {type(means).__name__}"
        )
    _check_bias_layers(model, names, example)
    out = {}
    for n in names:
        m = means.mean(n)
        w = get_layer(model, n).weight
        if w.numel() != w.shape[0] * m.shape[1] or w.shape[0] % m.shape[0]:
            raise ValueError(
                f"layer {n!r}: input mean of shape {m.shape} does not fit its weight of shape "
                f"{tuple(w.shape)} (recompute the means on this model)"
            )
        out[n] = torch.as_tensor(m, dtype=w.dtype, device=w.device)  # cast once, not per batch
    return out


def _replace_meta(grams: GradientGrams, meta: dict[str, Any]) -> GradientGrams:
    from dataclasses import replace

    return replace(grams, meta=meta)


def _output_fingerprint(model: nn.Module, x: Any, device: Any) -> str:
    """sha256 of the output shape and the float logits (5 decimals) on the first samples."""
    import torch

    dtype = next(model.parameters()).dtype
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    with torch.no_grad():
        z = model(x)
    if not isinstance(z, torch.Tensor):
        raise ValueError(
            f"the model returns a {type(z).__name__}, not a tensor of logits (B, K); wrap a "
            "multi-head network with distortion.experiments.heads.SelectOutput(model, head=...)"
        )
    a = np.round(z.detach().to(torch.float64).cpu().numpy(), 5) + 0.0  # no -0.0
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def _grams_key(
    model: nn.Module,
    data_fp: str,
    names: list[str],
    granularity: str,
    r: int,
    seed: int,
    truncate: tuple[int, int] | None = None,
    *,
    outputs: str | None = None,
    centred: str | None = None,
) -> str:
    payload = {
        "cache": "grams",
        "version": _CACHE_VERSION,
        "weights": _model_hash(model),
        "data": data_fp,
        "layers": names,
        "granularity": granularity,
        "n_realizations": r,
        "seed": seed if r else None,
        "dtype": str(next(model.parameters()).dtype),
    }
    if outputs is not None:
        # what the network computes, not only its weights: two heads of one network (or
        # one network behind two wrappers) share the state dict but not the logits
        payload["outputs"] = outputs
    if centred is not None:  # absent without bias correction: those keys do not change
        payload["input_means"] = centred
    if truncate is not None:  # absent for full Grams: their keys do not change
        payload["competitors"] = truncate[0]
        payload["tail_probes"] = truncate[1]
        payload["tail_seed"] = seed if truncate[1] else None
    return _cache.content_key(payload)


def _compute_grams(
    model, data, names, granularity, n_real, batch_size, seed, device, memory_mb, progress,
    n_total, labels, key, tqdm, truncate=None, centre=None,
) -> GradientGrams:  # fmt: skip
    import torch

    from distortion.experiments.models import get_layer

    example = next(iter(_batches(data, 2)))[0].to(device)
    found = _discovery(model, example)
    specs = [found.spec(n) for n in names]
    params = [get_layer(model, n).weight for n in names]
    shapes = [tuple(w.shape) for w in params]
    sizes = [math.prod(s) for s in shapes]
    kinds = [sp.kind for sp in specs]
    weights = tuple(w.detach().cpu().numpy().astype(np.float64) for w in params)
    dtype = params[0].dtype
    t0 = time.perf_counter()
    # one forward to learn K
    with torch.no_grad():
        x1 = next(iter(_batches(data, 1)))[0].to(device)
        k = int(model(x1.to(dtype) if x1.is_floating_point() else x1).shape[1])
    # kept columns M: all K, or the float decision and its m nearest competitors (eq. L17)
    n_keep = k if truncate is None else min(truncate[0] + 1, k)
    n_probes = 0 if truncate is None or n_keep == k else truncate[1]
    sample_ids = _sample_ids(data, n_total)
    size_of = dict(zip(names, sizes, strict=True))
    if batch_size is None:
        per_sample = 4.0 * n_keep * sum(sizes) * (2.0 if granularity == "channel" else 1.5)
        batch_size = int(max(1, min(256, memory_mb * 2**20 // max(per_sample, 1.0))))
    profiles = []
    draws = []
    for i, w in enumerate(weights):
        prof = channel_profile(w, granularity)
        profiles.append(prof)
        if n_real:
            e = _uniform_draws(sizes[i], n_real, prof, seed, i)
            draws.append(torch.as_tensor(e, dtype=dtype, device=device))
    iu = torch.triu_indices(n_keep, n_keep)
    # per layer, every use in the forward pass: (input, output, input version, how), with
    # how = (module or None for an attention projection, batch dimension, first output row)
    records: dict[str, list[tuple[Any, Any, int, tuple[Any, int, int]]]] = {n: [] for n in names}

    def make_hook(name: str, bdim: int):
        def hook(module, args, kwargs, output):
            a = (args[0] if args else kwargs["input"]).detach()
            records[name].append((a, output, a._version, (module, bdim, 0)))
            return output.clone()  # later in-place ops must not touch the recorded output

        return hook

    def record(name: str, a: Any, out: Any, row: int) -> None:
        a = a.detach()
        records[name].append((a, out, a._version, (None, 1, row)))

    watch = {id(w): sp.name for sp, w in zip(specs, params, strict=True) if sp.role != "module"}
    # a tied weight may also be used by an attention projection elsewhere
    for sp, w in zip(specs, params, strict=True):
        if sp.tied and sp.role == "module":
            watch[id(w)] = sp.name
    handles = [
        model.get_submodule(m).register_forward_hook(make_hook(sp.name, bd), with_kwargs=True)
        for sp in specs
        for m, bd in zip(sp.hooked, sp.batch_dims, strict=True)
    ]
    saved_flags = [w.requires_grad for w in params]
    out_logits, out_grams, out_cgrams, out_proj = [], [], [], []
    out_classes, out_tail, out_ctail, out_tmargin = [], [], [], []
    n_batches = -(-n_total // batch_size)
    start = 0
    try:
        for w in params:
            w.requires_grad_(True)
        for x, _ in tqdm(
            _batches(data, batch_size), total=n_batches, desc="gradient grams",
            disable=None if progress else True, leave=False,
        ):  # fmt: skip
            for r in records.values():
                r.clear()
            x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
            bsz = x.shape[0]
            recorder = _attention_recorder(watch, record) if watch else nullcontext()
            with torch.enable_grad(), recorder:
                z = model(x)
                if z.ndim != 2 or z.shape[1] != k:
                    raise ValueError(f"model output must have shape (B, {k}), got {tuple(z.shape)}")
                flat = [(n, rec) for n in names for rec in records[n]]
                for n, (a, _, ver, _) in flat:
                    if a._version != ver:
                        raise ValueError(
                            f"the input of layer {n!r} was modified in place during the forward "
                            "pass; per-sample gradients need it intact (use inplace=False)"
                        )
                outs = [rec[1] for _, rec in flat]
                jac = {
                    n: torch.zeros((bsz, n_keep, s), dtype=dtype, device=device)
                    for n, s in zip(names, sizes, strict=True)
                }
                inputs = [_layer_input(rec[3][0], rec[0], rec[3][1]) for _, rec in flat]
                if centre is not None:  # bias correction: U - mean patch (eq. L23)
                    inputs = [
                        u - centre[n].view(1, 1, -1) if u.ndim == 3
                        else u - centre[n][None, :, :, None]
                        for (n, _), u in zip(flat, inputs, strict=True)
                    ]  # fmt: skip
                cols = {n: s[-1] if len(s) == 2 else 0 for n, s in zip(names, shapes, strict=True)}
                # what each backward pass differentiates: logit c (all K kept), or per
                # sample z_j - z_yhat for a kept competitor j (eq. L17), or a Rademacher
                # combination of the classes not kept (eq. L18); None = z[:, c].sum()
                if n_keep == k:
                    kept = None
                    passes = [(c, None) for c in range(k)]
                else:
                    kept = torch.argsort(z.detach(), dim=1, descending=True, stable=True)
                    kept = kept[:, :n_keep]
                    passes = [
                        (r, _margin_seed(kept[:, r], kept[:, 0], k)) for r in range(1, n_keep)
                    ]
                    passes += [
                        (-1, g)
                        for g in _tail_probes(
                            kept, k, n_probes, seed, sample_ids[start : start + bsz]
                        )
                    ]
                tail = None
                if n_probes:
                    tail = {
                        n: torch.zeros((bsz, s), dtype=torch.float64)
                        for n, s in zip(names, sizes, strict=True)
                    }
                for pi, (c, seed_grad) in enumerate(passes):
                    target = z[:, c].sum() if seed_grad is None else z
                    grads = torch.autograd.grad(
                        target, outs,
                        grad_outputs=None if seed_grad is None else seed_grad.to(z.device, z.dtype),
                        retain_graph=pi < len(passes) - 1, allow_unused=True,
                    )  # fmt: skip
                    probe = {} if c < 0 else None
                    for (n, rec), u, g in zip(flat, inputs, grads, strict=True):
                        if g is None:
                            continue
                        mod, bdim, row = rec[3]
                        j = _per_sample_jacobian(mod, u, g, bdim)
                        if j.shape[0] != bsz:
                            raise ValueError(
                                f"layer {n!r}: {j.shape[0]} per-sample gradients for a batch "
                                f"of {bsz}"
                            )
                        off = row * cols[n]
                        if probe is None:
                            jac[n][:, c, off : off + j.shape[1]] += j
                        else:
                            acc = probe.get(n)
                            if acc is None:  # one buffer per layer, not one per use
                                acc = probe[n] = j.new_zeros((bsz, size_of[n]))
                            acc[:, off : off + j.shape[1]] += j
                    if probe is not None:
                        for n, acc in probe.items():
                            tail[n] += acc.to(torch.float64).cpu() ** 2 / n_probes  # (eq. L18)
                del outs, flat, inputs
            for r in records.values():
                r.clear()
            zb = z.detach().to(torch.float64).cpu().numpy()
            if kept is not None:
                kc = kept.cpu().numpy()
                out_classes.append(kc)
                zk = np.take_along_axis(zb, kc, axis=1)
                zz = zb.copy()
                np.put_along_axis(zz, kc, -np.inf, axis=1)
                out_tmargin.append(zk[:, 0] - zz.max(axis=1))
                zb = zk
            out_logits.append(zb)
            bg = np.empty((bsz, len(names), n_keep, n_keep))
            bc = [] if granularity == "channel" else None
            bp = np.empty((bsz, len(names), n_real, n_keep), np.float32) if n_real else None
            if kept is not None:
                bt = np.zeros((bsz, len(names)))
                btc = [] if granularity == "channel" else None
            for li, n in enumerate(names):
                jd = jac[n].to(torch.float64)
                if granularity == "channel":
                    c_out = shapes[li][0]
                    jc = jd.reshape(bsz, n_keep, c_out, -1)
                    gc = torch.einsum("bkci,bjci->bckj", jc, jc)  # (eq. L3), per channel
                    bg[:, li] = gc.sum(1).cpu().numpy()
                    bc.append(gc[:, :, iu[0], iu[1]].to(torch.float32).cpu().numpy())
                else:
                    bg[:, li] = torch.bmm(jd, jd.transpose(1, 2)).cpu().numpy()  # (eq. L3)
                if n_real:
                    bp[:, li] = torch.matmul(jac[n], draws[li]).transpose(1, 2).cpu().numpy()
                if kept is not None and tail is not None:
                    t = tail[n]
                    bt[:, li] = t.sum(1).numpy()
                    if btc is not None:
                        btc.append(t.reshape(bsz, shapes[li][0], -1).sum(2).numpy())
                del jd
            if kept is not None:
                out_tail.append(bt)
                if btc:
                    out_ctail.append(np.concatenate(btc, axis=1).astype(np.float32))
            start += bsz
            out_grams.append(bg)
            if bc is not None:
                out_cgrams.append(np.concatenate(bc, axis=1))
            if bp is not None:
                out_proj.append(bp)
            del jac
    finally:
        for h in handles:
            h.remove()
        for w, f in zip(params, saved_flags, strict=True):
            w.requires_grad_(f)
    seconds = time.perf_counter() - t0
    truncation = None
    if out_classes:
        truncation = Truncation(
            classes=np.concatenate(out_classes),
            n_classes=k,
            tail=np.concatenate(out_tail),
            channel_tail=np.concatenate(out_ctail) if out_ctail else None,
            tail_margin=np.concatenate(out_tmargin),
            n_probes=n_probes,
        )
        labels = _local_labels(labels, truncation.classes)
    return GradientGrams(
        layer_names=tuple(names),
        layer_kinds=tuple(kinds),
        weight_shapes=tuple(shapes),
        logits=np.concatenate(out_logits),
        grams=np.concatenate(out_grams),
        labels=labels,
        channel_grams=np.concatenate(out_cgrams) if out_cgrams else None,
        projections=np.concatenate(out_proj) if out_proj else None,
        projection_scales=tuple(profiles) if n_real else None,
        weights=weights,
        truncation=truncation,
        key=key,
        meta={
            "seconds": seconds,
            "backward_passes": n_keep - 1 + n_probes if truncate is not None else k,
            "batch_size": batch_size,
            "granularity": granularity,
            "n_realizations": n_real,
            "seed": seed,
            "tied": {sp.name: list(sp.tied) for sp in specs if sp.tied},
            "skipped": dict(found.unsupported),
        },
    )


def _sample_ids(data: Any, n: int) -> np.ndarray:
    """Stable ids of the samples (an ImageDataset's source positions, else 0..n-1), which
    seed the tail probes: a shard of a dataset draws what the whole dataset draws."""
    ids = getattr(data, "indices", None)
    if isinstance(ids, np.ndarray) and ids.shape == (n,):
        return ids.astype(np.int64)
    return np.arange(n, dtype=np.int64)


def _margin_seed(j: Any, ref: Any, k: int) -> Any:
    """Per-sample output gradient of :math:`z_j - z_{ref}`, shape (B, K) (eq. L17)."""
    import torch

    g = torch.zeros((j.shape[0], k), dtype=torch.float64)
    rows = torch.arange(j.shape[0])
    g[rows, j] += 1.0
    g[rows, ref] -= 1.0
    return g


def _tail_probes(kept: Any, k: int, n_probes: int, seed: int, ids: np.ndarray) -> list[Any]:
    r"""Output gradients of :math:`\sum_{j \notin S} \varepsilon_j (z_j - z_{\hat y})`
    with Rademacher :math:`\varepsilon` drawn per sample from ``(seed, id)`` (eq. L18)."""
    import torch

    if not n_probes:
        return []
    eps = np.stack(
        [np.random.default_rng([seed, 4409, int(i)]).integers(0, 2, (n_probes, k)) for i in ids]
    )  # (B, P, K)
    eps = 2.0 * eps - 1.0
    kc = kept.cpu().numpy()
    for r in range(kc.shape[1]):
        eps[np.arange(len(ids)), :, kc[:, r]] = 0.0
    eps[np.arange(len(ids)), :, kc[:, 0]] = -eps.sum(axis=2)
    return [torch.as_tensor(eps[:, p]) for p in range(n_probes)]


def _local_labels(labels: np.ndarray | None, classes: np.ndarray) -> np.ndarray | None:
    """Labels as column indices of the kept classes, -1 when a label is not kept."""
    if labels is None:
        return None
    hit = classes == labels[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1).astype(np.int64)


# ----------------------------------------------------------------------------- cache files
def save_grams(grams: GradientGrams, path: str | os.PathLike[str]) -> Path:
    """Write a :class:`GradientGrams` to an ``.npz`` file (atomically); returns the path."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {
        "logits": grams.logits,
        "grams": np.ascontiguousarray(grams.grams),
    }
    if grams.labels is not None:
        arrays["labels"] = grams.labels
    if grams.channel_grams is not None:
        arrays["channel_grams"] = grams.channel_grams
    if grams.projections is not None:
        arrays["projections"] = grams.projections
        arrays["projection_scales"] = np.concatenate(grams.projection_scales)
    if grams.weights is not None:
        arrays["weights"] = np.concatenate([w.ravel() for w in grams.weights])
    tr = grams.truncation
    if tr is not None:
        arrays["kept_classes"] = tr.classes
        arrays["tail"] = tr.tail
        arrays["tail_margin"] = tr.tail_margin
        if tr.channel_tail is not None:
            arrays["channel_tail"] = tr.channel_tail
    header = {
        "format": _FORMAT,
        "version": _CACHE_VERSION,
        "layer_names": list(grams.layer_names),
        "layer_kinds": list(grams.layer_kinds),
        "weight_shapes": [list(s) for s in grams.weight_shapes],
        "key": grams.key,
        "meta": _cache.jsonable(grams.meta),
    }
    if tr is not None:
        header["truncation"] = {"n_classes": tr.n_classes, "n_probes": tr.n_probes}
    arrays["header"] = np.array(json.dumps(header))
    return _cache.atomic_savez(path, **arrays)


def load_grams(path: str | os.PathLike[str], *, expected_key: str | None = None) -> GradientGrams:
    """Read a file written by :func:`save_grams`.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a GradientGrams file, another format version, or a key other than
        ``expected_key``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no gradient-gram file {str(path)!r}; compute it with gradient_grams"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            arrays = {k: z[k] for k in z.files if k != "header"}
    except Exception as exc:
        raise ValueError(f"cannot read gradient-gram file {str(path)!r}: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a {_FORMAT} file (its header is not a dict)")
    if header.get("format") != _FORMAT or header.get("version") != _CACHE_VERSION:
        raise ValueError(f"{str(path)!r} is not a version-{_CACHE_VERSION} {_FORMAT} file")
    if expected_key is not None and header.get("key") != expected_key:
        raise ValueError(f"{str(path)!r} was computed for other weights, data or options")
    try:
        return _grams_from_arrays(header, arrays, path)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"gradient-gram file {str(path)!r} is corrupt ({type(exc).__name__}: {exc})"
        ) from exc


def _grams_from_arrays(header: dict, arrays: dict, path: Path) -> GradientGrams:
    shapes = [tuple(s) for s in header["weight_shapes"]]
    weights = None
    if "weights" in arrays:
        flat = arrays["weights"]
        sizes = np.cumsum([0] + [math.prod(s) for s in shapes])
        weights = tuple(flat[sizes[i] : sizes[i + 1]].reshape(s) for i, s in enumerate(shapes))
    scales = None
    if "projection_scales" in arrays:
        off = np.cumsum([0] + [s[0] for s in shapes])
        ps = arrays["projection_scales"]
        scales = tuple(ps[off[i] : off[i + 1]] for i in range(len(shapes)))
    truncation = None
    if "truncation" in header:
        t = header["truncation"]
        truncation = Truncation(
            classes=arrays["kept_classes"], n_classes=int(t["n_classes"]), tail=arrays["tail"],
            channel_tail=arrays.get("channel_tail"), tail_margin=arrays["tail_margin"],
            n_probes=int(t["n_probes"]),
        )  # fmt: skip
    return GradientGrams(
        layer_names=tuple(header["layer_names"]),
        layer_kinds=tuple(header["layer_kinds"]),
        weight_shapes=tuple(shapes),
        logits=arrays["logits"],
        grams=arrays["grams"],
        labels=arrays.get("labels"),
        channel_grams=arrays.get("channel_grams"),
        projections=arrays.get("projections"),
        projection_scales=scales,
        weights=weights,
        truncation=truncation,
        key=str(header.get("key", "")),
        meta={**header.get("meta", {}), "cache_file": str(path)},
    )


#: Old name, kept for callers of this module.
_jsonable = _cache.jsonable


# ----------------------------------------------------------------------------- Hutchinson
#: How hessian_trace probes: one Rademacher vector per layer, restricted to its own block
#: (the joint probing of version 1 carried the other layers' cross terms). In the cache key.
_HESSIAN_PROBING = "per-layer-block"


def _rademacher_seeds(seed: int, n_draws: int, n_layers: int) -> list[list[int]]:
    """Independent generator seeds for the vector of draw d on layer l."""
    ss = np.random.SeedSequence([int(seed), 40503])
    states = [c.generate_state(1, np.uint64)[0] >> 1 for c in ss.spawn(n_draws * n_layers)]
    return [[int(states[d * n_layers + li]) for li in range(n_layers)] for d in range(n_draws)]


def _block_hutchinson_draws(
    model: nn.Module,
    batches: Iterator[tuple[Any, Any]],
    params: list[torch.Tensor],
    seeds: list[list[int]],
    n_total: int,
    dev: Any,
) -> np.ndarray:
    r"""Per draw and layer, :math:`v_\ell^\top H_{\ell\ell} v_\ell`, shape (m, L) (eq. BL6).

    For each batch one graph of the gradient :math:`g = \nabla_W L` is built; for each draw
    and layer the block product :math:`H_{\ell\ell}v_\ell = \nabla_{W_\ell}(g_\ell\cdot
    v_\ell)` is one backward pass through it (retained), with the same :math:`v_\ell` of a
    draw in every batch so that the sum over batches is the product for the mean loss.
    """
    import torch
    import torch.nn.functional as F

    n_draws, n_layers = len(seeds), len(params)
    acc = np.zeros((n_draws, n_layers))
    for x, y in batches:
        x = x.to(device=dev, dtype=params[0].dtype)
        y = torch.as_tensor(y).to(dev)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y, reduction="sum") / n_total
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for d in range(n_draws):
                for li, (p, g) in enumerate(zip(params, grads, strict=True)):
                    gen = torch.Generator().manual_seed(seeds[d][li])
                    v = (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(dev, p.dtype)
                    last = d == n_draws - 1 and li == n_layers - 1
                    (hv,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=not last)
                    acc[d, li] += float((hv * v).sum())  # v_l^T H_ll v_l (eq. BL6)
            del grads, loss
    return acc


def hessian_trace(
    model: nn.Module,
    data: Any,
    *,
    layers: str | Sequence[str] = "all",
    n_draws: int = 32,
    seed: int = 0,
    batch_size: int = 100,
    device: str = "cpu",
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> HessianTrace:
    r"""Hutchinson estimate of the trace of the cross-entropy Hessian of each layer.

    Parameters
    ----------
    model : torch.nn.Module
        Run on ``device`` in eval mode, then left as it was (its tensors back on their
        devices, every submodule back in its own training mode).
    data : ImageDataset or (x, y)
        Labelled samples; the loss is the mean cross-entropy over all of them.
    layers : "all", "last" or sequence of str
    n_draws : int
        Rademacher vectors m per layer (>= 2, for a standard error).
    seed : int
        Seed of the Rademacher vectors.
    batch_size, device, cache, cache_dir, progress
        As in :func:`gradient_grams` (files go to ``hessian/``).

    Returns
    -------
    HessianTrace
        ``trace[l]`` with its standard error ``stderr[l]`` (sd over the draws
        / :math:`\sqrt m`); ``draws`` holds the m terms of each layer.

    Notes
    -----
    Each layer is probed on its own block [2]_: for draw :math:`d` and layer :math:`\ell`,
    a Rademacher vector :math:`v_\ell` on that layer's weights only gives the unbiased term
    :math:`v_\ell^\top H_{\ell\ell} v_\ell` of :math:`\operatorname{Tr}(H_{\ell\ell})`, of
    variance :math:`2\sum_{i\ne j}(H_{\ell\ell})_{ij}^2` (``theory/baselines.md``,
    eq. BL6). One vector over all layers at once would add the cross terms
    :math:`\sum_{k\ne\ell} v_\ell^\top H_{\ell k} v_k`, of variance
    :math:`\sum_{k\ne\ell}\|H_{\ell k}\|_F^2`, to every layer's term (on ResNet-20 they
    dominate the small last layer). The block products
    :math:`H_{\ell\ell} v_\ell = \nabla_{W_\ell}(\nabla_{W_\ell} L\cdot v_\ell)` come from one
    double-backward graph per batch: :math:`m L` backward passes through it per batch, each
    stopping at the layer it differentiates.
    """
    from tqdm.auto import tqdm

    from distortion.experiments._torch_state import evaluated_on

    if isinstance(n_draws, bool) or not isinstance(n_draws, int | np.integer) or n_draws < 2:
        raise ValueError(f"n_draws must be an integer >= 2 (for a standard error), got {n_draws!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n_draws = int(n_draws)
    n_total, labels, data_fp = _data_info(data)
    if labels is None:
        raise ValueError("hessian_trace needs labels (the cross-entropy loss); pass (x, y)")
    # the caller's model goes back to its devices and training modes, also on errors
    with evaluated_on(model, device) as dev:
        first_x, _ = next(iter(_batches(data, 2)))
        names = resolve_quantizable(model, layers, first_x.to(dev))
        h = hashlib.sha256()
        h.update(
            json.dumps(
                {"version": _CACHE_VERSION, "probing": _HESSIAN_PROBING,
                 "weights": _model_hash(model), "data": data_fp, "layers": names,
                 "n_draws": n_draws, "seed": seed}, sort_keys=True,
            ).encode()
        )  # fmt: skip
        key = h.hexdigest()
        path = _paths.cache_dir(cache_dir) / "hessian" / f"trace-{key[:24]}.npz"
        if cache:
            z = _cache.load_npz(path, key=key)  # missing, unreadable or stale: recomputed
            if z is not None:
                return HessianTrace(
                    layer_names=tuple(names), n_params=z["n_params"], draws=z["draws"],
                    n_samples=int(z["n_samples"]), seed=seed,
                )  # fmt: skip
        from distortion.experiments.models import get_layer

        params = [get_layer(model, n).weight for n in names]  # attention projections too
        saved = [p.requires_grad for p in params]
        total = -(-n_total // batch_size)
        try:
            for p in params:
                p.requires_grad_(True)
            batches = tqdm(
                _batches(data, batch_size), total=total, desc="hessian trace",
                disable=not progress, leave=False,
            )  # fmt: skip
            acc = _block_hutchinson_draws(
                model, batches, params, _rademacher_seeds(seed, n_draws, len(params)),
                n_total, dev,
            )  # fmt: skip
        finally:
            for p, f in zip(params, saved, strict=True):
                p.requires_grad_(f)
        n_params = np.array([p.numel() for p in params], dtype=np.int64)
    res = HessianTrace(
        layer_names=tuple(names), n_params=n_params, draws=acc, n_samples=n_total, seed=seed
    )
    if cache:
        try:
            _cache.atomic_savez(
                path, key=np.array(key), n_params=n_params, draws=acc, n_samples=n_total
            )
        except OSError as exc:
            warnings.warn(
                f"could not write the Hessian-trace cache {str(path)!r}: {exc}",
                _cache.CacheWarning,
                stacklevel=2,
            )
    return res
