r"""Activation quantization of a torch model: calibration, fake-quantizing hooks, real int8.

* :func:`calibrate_activations` runs the model on ``n_images`` seeded calibration images,
  collects the input of every chosen convolution and linear layer, and calibrates one
  :class:`~distortion.activations.ActivationQParams` per layer (with the statistics the error
  model needs, ``theory/activations.md`` eq. A7);
* :func:`quantize_activations` is a context manager that fake-quantizes the inputs of those
  layers (forward pre-hooks, removed on exit; the model itself is never changed);
* :func:`convert_int8_fx` builds a real int8 model of a backend with torch.ao's FX graph mode
  (``prepare_fx`` / ``convert_fx`` with the backend's default qconfig mapping).

The inputs are quantized as the layer receives them: the input of ``conv1`` is the image,
that of a layer after a ReLU is non-negative (an unsigned grid then has zero point 0). A module
called several times in one forward pass is quantized (and calibrated) at every call.

torch is imported inside the functions.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from distortion.activations import (
    ActivationQParams,
    ActivationQuantizer,
    ActivationStats,
    activation_stats,
    fake_quantize,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from distortion.theory.error_models import ErrorModel

__all__ = [
    "ActivationCalibration",
    "calibrate_activations",
    "convert_int8_fx",
    "quantize_activations",
]


@dataclass(frozen=True)
class ActivationCalibration:
    r"""Result of :func:`calibrate_activations`.

    Attributes
    ----------
    qparams : dict of str to ActivationQParams
        One grid per layer, in the order the forward pass calls the layers.
    stats : dict of str to ActivationStats
        Zero share, clipped share and clipping moments of each layer's calibration inputs on
        its grid (eq. A7).
    quantizers : dict of str to ActivationQuantizer
    indices : ndarray of int64, shape (n_images,)
        The calibration images (sorted indices into the data).
    seed : int
    """

    qparams: dict[str, ActivationQParams]
    stats: dict[str, ActivationStats] = field(repr=False)
    quantizers: dict[str, ActivationQuantizer] = field(repr=False)
    indices: np.ndarray = field(repr=False)  # (n_images,)
    seed: int = 0

    @property
    def layers(self) -> tuple[str, ...]:
        """The calibrated layers, in forward order."""
        return tuple(self.qparams)

    @property
    def n_images(self) -> int:
        return int(self.indices.size)

    def error_models(self) -> dict[str, ErrorModel]:
        """The error model of each layer's input quantization (eq. A5–A6)."""
        return {
            name: self.quantizers[name].error_model(self.stats[name], qp)
            for name, qp in self.qparams.items()
        }

    def to_frame(self):
        """One row per layer (per-tensor values; the mean over channels if per channel)."""
        import pandas as pd

        rows = []
        for name, qp in self.qparams.items():
            st, em = self.stats[name], self.error_models()[name]
            rows.append(
                {
                    "layer": name,
                    "granularity": qp.granularity,
                    "scale": float(np.mean(qp.scale)),
                    "zero_point": float(np.mean(qp.zero_point)),
                    "zero_fraction": float(np.mean(st.zero_fraction)),
                    "clipped_fraction": float(np.mean(st.clipped_fraction)),
                    "second_moment": float(np.mean(em.second_moment)),
                    "mean": float(np.mean(em.mean)),
                }
            )
        return pd.DataFrame(rows)


def _hookable(module: Any) -> bool:
    from torch import nn

    return isinstance(module, nn.modules.conv._ConvNd | nn.Linear)


def _named_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        known = [n for n, m in model.named_modules() if _hookable(m)]
        raise ValueError(
            f"model {type(model).__name__} has no layer {name!r}; its convolution and linear "
            f"layers are: {', '.join(known)}"
        ) from None
    if not _hookable(module):
        raise ValueError(
            f"the input of layer {name!r} ({type(module).__name__}) cannot be hooked: only "
            "convolution and linear layers are activation-quantized"
        )
    return module


@contextmanager
def quantize_activations(
    model: nn.Module, quantizers: Mapping[str, ActivationQParams] | ActivationCalibration
) -> Iterator[nn.Module]:
    r"""Fake-quantize the inputs of some layers of ``model`` inside a ``with`` block.

    Parameters
    ----------
    model : torch.nn.Module
    quantizers : dict of layer name to ActivationQParams, or ActivationCalibration
        The grid of each layer's input (e.g. ``calibrate_activations(...).qparams``).

    Yields
    ------
    torch.nn.Module
        ``model`` itself, with a forward pre-hook on each layer that replaces its first
        input :math:`x` by :func:`~distortion.activations.fake_quantize` :math:`(x)`. The hooks
        are removed on exit, also when the block raises; no parameter, buffer or mode of the
        model is changed.

    Examples
    --------
    ::

        cal = calibrate_activations(model, x, "all", ActivationQuantizer(8), n_images=64)
        with quantize_activations(model, cal):
            logits = model(x)
    """
    qps = quantizers.qparams if isinstance(quantizers, ActivationCalibration) else quantizers
    if not isinstance(qps, Mapping) or not qps:
        raise ValueError("quantizers must be a non-empty dict of layer name to ActivationQParams")
    modules = {}
    for name, qp in qps.items():
        if not isinstance(qp, ActivationQParams):
            raise ValueError(
                f"quantizers[{name!r}] must be an ActivationQParams, got {type(qp).__name__}"
            )
        modules[name] = _named_layer(model, name)

    def make_hook(qp: ActivationQParams):
        def hook(module, inputs):
            return (fake_quantize(inputs[0], qp), *inputs[1:])

        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make_hook(qps[name])))
        yield model
    finally:
        for h in handles:
            h.remove()


def _n_items(data: Any) -> int:
    import torch

    if isinstance(data, torch.Tensor | np.ndarray):
        return int(data.shape[0]) if data.ndim else 0
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and isinstance(data[0], torch.Tensor | np.ndarray)
    ):
        return int(data[0].shape[0])
    return len(data)


def _batch(data: Any, idx: np.ndarray) -> torch.Tensor:
    """The images ``idx`` of ``data`` (a tensor, an (x, y) pair, or an indexable dataset)."""
    import torch

    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and isinstance(data[0], torch.Tensor | np.ndarray)
    ):
        data = data[0]
    if isinstance(data, np.ndarray):
        return torch.as_tensor(data[idx])
    if isinstance(data, torch.Tensor):
        return data[torch.as_tensor(idx)]
    items = [data[int(i)] for i in idx]
    return torch.stack([it[0] if isinstance(it, tuple | list) else it for it in items])


def calibrate_activations(
    model: nn.Module,
    data: Any,
    layers: str | Sequence[str],
    quantizer: ActivationQuantizer | Mapping[str, ActivationQuantizer],
    *,
    n_images: int,
    seed: int = 0,
    batch_size: int = 256,
) -> ActivationCalibration:
    r"""Calibrate the input grids of ``layers`` on ``n_images`` seeded calibration images.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode on its own device; its modes are restored afterwards.
    data : torch.Tensor, ndarray, (x, y) pair or dataset
        Calibration images: a batch of shape (N, ...), a pair whose first item is such a batch,
        or an indexable dataset of ``(image, label)`` (e.g. an ``ImageDataset``).
    layers : "all" or list of str
        ``"all"``: every convolution and linear layer the forward pass calls.
    quantizer : ActivationQuantizer or dict of layer name to ActivationQuantizer
        One configuration for every layer, or one per layer (then ``layers`` may be its keys).
    n_images : int
        Calibration images, drawn without replacement with ``numpy.random.default_rng(seed)``.
    seed : int
    batch_size : int

    Returns
    -------
    ActivationCalibration

    Raises
    ------
    ValueError
        If the calibration set is empty, ``n_images`` exceeds it, a layer is unknown or is not
        a convolution or linear layer, or the forward pass never calls a layer (its input
        cannot be hooked).

    Notes
    -----
    Every input of every layer is kept in memory (as numpy, on the CPU) until calibrated.
    """
    import torch

    from distortion.experiments._torch_state import model_device, modes_kept

    n = _n_items(data)
    if n == 0:
        raise ValueError("the calibration set is empty: pass at least one image")
    if isinstance(n_images, bool) or not isinstance(n_images, int | np.integer) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    if n_images > n:
        raise ValueError(f"n_images={n_images} exceeds the {n} images of the calibration set")
    if isinstance(layers, str) and layers != "all":
        layers = [layers]
    if isinstance(layers, str):
        names = [name for name, m in model.named_modules() if _hookable(m)]
        explicit = False
    else:
        names = list(layers)
        if not names:
            raise ValueError("layers is empty: pass 'all' or a list of layer names")
        explicit = True
    modules = {name: _named_layer(model, name) for name in names}
    if isinstance(quantizer, Mapping):
        missing = [name for name in names if name not in quantizer]
        if missing and explicit:
            raise ValueError(f"no quantizer for layer(s) {missing}")
        modules = {k: v for k, v in modules.items() if k in quantizer}
        per_layer = {name: quantizer[name] for name in modules}
    else:
        per_layer = dict.fromkeys(modules, quantizer)
    for name, q in per_layer.items():
        if not isinstance(q, ActivationQuantizer):
            raise ValueError(
                f"the quantizer of {name!r} must be an ActivationQuantizer, got {type(q).__name__}"
            )

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=int(n_images), replace=False)).astype(np.int64)
    seen: dict[str, list[np.ndarray]] = {name: [] for name in modules}
    order: list[str] = []

    def make_hook(name: str):
        def hook(module, inputs):
            if name not in order:
                order.append(name)
            seen[name].append(inputs[0].detach().cpu().numpy().copy())

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in modules.items()]
    dev = model_device(model)
    try:
        with modes_kept(model), torch.inference_mode():
            model.eval()
            p = next(iter(model.parameters()), None)
            for start in range(0, idx.size, batch_size):
                x = _batch(data, idx[start : start + batch_size])
                x = x.to(device=dev, dtype=p.dtype if p is not None else x.dtype)
                model(x)
    finally:
        for h in handles:
            h.remove()
    never = [name for name in modules if not seen[name]]
    if never and explicit:
        raise ValueError(
            f"the input of layer(s) {never} cannot be hooked: the forward pass never calls them"
        )
    qparams, stats = {}, {}
    for name in order:
        samples = np.concatenate(seen.pop(name), axis=0)
        q = per_layer[name]
        qp = q.calibrate(samples)
        qparams[name] = qp
        stats[name] = activation_stats(samples, qp)
    return ActivationCalibration(qparams, stats, {k: per_layer[k] for k in order}, idx, int(seed))


def convert_int8_fx(
    model: nn.Module,
    calibration_data: Any,
    backend: str = "x86",
    *,
    keep_float: Sequence[str] = (),
    batch_size: int = 256,
) -> torch.fx.GraphModule:
    r"""A real int8 model of ``model`` for a PyTorch quantized backend (FX graph mode).

    ``prepare_fx`` with ``get_default_qconfig_mapping(backend)`` on a float32 CPU copy of
    ``model`` (the input model is not modified), calibration on every image of
    ``calibration_data`` (a batch, an (x, y) pair or a dataset, as in
    :func:`calibrate_activations`), then ``convert_fx``. Convolutions with a string padding
    (``padding="same"``, which torch's quantized convolutions do not take) and the modules
    named in ``keep_float`` stay in float32 (their qconfig is None).

    Parameters
    ----------
    model : torch.nn.Module
    calibration_data : torch.Tensor, ndarray, (x, y) pair or dataset
    backend : {"x86", "fbgemm", "qnnpack", "onednn"}
        Must be in ``torch.backends.quantized.supported_engines``; it becomes
        ``torch.backends.quantized.engine`` (the int8 kernels are chosen from it when the
        converted model runs).
    keep_float : sequence of str
        Names of submodules to leave unquantized.
    batch_size : int

    Returns
    -------
    torch.fx.GraphModule
        The quantized model (float32 inputs and outputs, CPU).
    """
    from torch.ao.quantization.quantize_fx import convert_fx

    return convert_fx(prepare_calibrated(model, calibration_data, backend, keep_float, batch_size))


def prepare_calibrated(
    model: nn.Module,
    calibration_data: Any,
    backend: str,
    keep_float: Sequence[str] = (),
    batch_size: int = 256,
) -> torch.fx.GraphModule:
    """``prepare_fx`` of a float32 CPU copy of ``model`` with the backend's default qconfig
    mapping, its observers run on every calibration image (see :func:`convert_int8_fx`)."""
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if backend not in engines:
        raise ValueError(
            f"backend {backend!r} is not a quantized engine of this torch; this machine "
            f"supports: {', '.join(engines)}"
        )
    n = _n_items(calibration_data)
    if n == 0:
        raise ValueError("the calibration set is empty: pass at least one image")
    torch.backends.quantized.engine = backend
    float_model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    example = _batch(calibration_data, np.arange(1)).to(torch.float32)
    mapping = get_default_qconfig_mapping(backend)
    for name, m in float_model.named_modules():
        if name in keep_float or isinstance(getattr(m, "padding", None), str):
            mapping = mapping.set_module_name(name, None)
    prepared = prepare_fx(float_model, mapping, (example,))
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(n, start + batch_size))
            prepared(_batch(calibration_data, idx).to(torch.float32))
    return prepared
