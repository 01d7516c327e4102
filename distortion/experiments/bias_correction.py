r"""Empirical bias correction of compressed layers (``theory/multilayer.md`` section 16).

Data-free post-training quantization (DFQ, Nagel et al. 2019) and most toolkits since
(AIMET, NNCF) remove the *mean* of each output channel's error: with :math:`\bar u_\ell` the
mean of the layer's input as its weight sees it (the unfolded patch of a convolution, zero
padding included) over calibration images and positions, the compressed layer gets the bias

.. math:: \tilde b_\ell = b_\ell - (\tilde W_\ell - W_\ell)\,\bar u_\ell \qquad \text{(eq. L22)}

so that its output error at position :math:`p` is :math:`E_\ell(u_p - \bar u_\ell)` instead
of :math:`E_\ell u_p`. The correction is computed from the float network's inputs, layer by
layer (the first-order view: each layer's correction does not depend on the others').

One rule, one place: :func:`bias_corrections` gives the shifts, :func:`apply_bias_correction`
writes them into a compressed copy; the measurement (``measure(..., bias_correction=)``,
``measure_compressed(..., bias_correction=)``), the linearization (level 2L) and the Grams of
the prediction (:func:`~distortion.experiments.sensitivity.gradient_grams` with
``input_means=``: the centred patches of eq. L23) all ask these functions.

torch is imported inside the functions only.

References
----------
.. [1] M. Nagel, M. van Baalen, T. Blankevoort and M. Welling, "Data-free quantization through
   weight equalization and bias correction", ICCV 2019.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "InputMeans",
    "apply_bias_correction",
    "bias_corrections",
    "correct_compressed",
    "corrected_output",
    "input_means",
]


@dataclass(frozen=True)
class InputMeans:
    r"""The mean input :math:`\bar u_\ell` of each layer, as its weight sees it.

    Attributes
    ----------
    layer_names : tuple of str
    means : tuple of ndarray of float64
        Per layer, shape ``(groups, in_per_group)``: ``in_per_group`` is
        ``in_channels / groups * prod(kernel_size)`` for a convolution (channels, then kernel
        offsets: the column order of ``weight.reshape(out, -1)``), ``in_features`` for a
        linear layer (``groups = 1``).
    n_samples : int
        Calibration samples averaged.
    dataset_id : str
        What they were (for the record).
    """

    layer_names: tuple[str, ...]
    means: tuple[np.ndarray, ...]
    n_samples: int
    dataset_id: str = ""

    def __post_init__(self) -> None:
        if len(self.layer_names) != len(self.means):
            raise ValueError(
                f"{len(self.layer_names)} layer names but {len(self.means)} mean arrays"
            )
        for name, m in zip(self.layer_names, self.means, strict=True):
            a = np.asarray(m)
            if a.ndim != 2 or not np.all(np.isfinite(a)):
                raise ValueError(
                    f"the input mean of layer {name!r} must be a finite (groups, in) array, "
                    f"got shape {a.shape}"
                )

    def mean(self, name: str) -> np.ndarray:
        """The (groups, in_per_group) mean input of layer ``name``."""
        try:
            return self.means[self.layer_names.index(name)]
        except ValueError:
            raise ValueError(
                f"no input mean for layer {name!r}; the means cover {list(self.layer_names)} "
                "(compute them with input_means(model, data, layers=...) for these layers)"
            ) from None

    @property
    def key(self) -> str:
        """A content hash of the means (part of the Grams' cache key)."""
        h = hashlib.sha256()
        for name, m in zip(self.layer_names, self.means, strict=True):
            h.update(name.encode())
            h.update(np.ascontiguousarray(m, dtype=np.float64).tobytes())
        return h.hexdigest()

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: groups, inputs per group, the rms of the mean input."""
        return pd.DataFrame(
            {
                "layer": list(self.layer_names),
                "groups": [m.shape[0] for m in self.means],
                "in_per_group": [m.shape[1] for m in self.means],
                "mean_rms": [float(np.sqrt(np.mean(m**2))) for m in self.means],
                "n_samples": self.n_samples,
            }
        )


def _check_bias_layers(
    model: Any, names: Sequence[str], example: Any, what: str = "bias correction"
) -> None:
    """Bias correction (and the input noise of ``input_noise``) needs each layer to be one
    module with a bias it can shift and an input a hook can watch."""
    from distortion.experiments.sensitivity import _discovery

    found = _discovery(model, example)
    for name in names:
        sp = found.spec(name)
        if sp.role != "module":
            raise ValueError(
                f"{what} is not supported for {name!r}, a {sp.role} projection of "
                "nn.MultiheadAttention (its bias is packed with the other projections'); "
                f"leave it out of the layers, or compress it without {what}"
            )
        if sp.tied:
            raise ValueError(
                f"{what} is not supported for {name!r}: its weight is tied to "
                f"{list(sp.tied)}, whose biases would need the same shift"
            )


def input_means(
    model: Any,
    data: Any,
    *,
    layers: str | Sequence[str] = "all",
    batch_size: int = 250,
    device: str = "cpu",
    progress: bool = True,
) -> InputMeans:
    r"""Mean input :math:`\bar u_\ell` of each layer over the calibration ``data`` (eq. L22).

    Parameters
    ----------
    model : torch.nn.Module
        The float network (run in eval mode, left as it was).
    data : ImageDataset, DataLoader, Dataset, (x, y) or tensor
        Calibration samples: disjoint from the evaluation images for an honest measurement.
    layers : "all", "last" or sequence of str
        Convolution and linear modules (not attention projections, not tied weights).
    batch_size, device, progress

    Returns
    -------
    InputMeans

    Notes
    -----
    Unfolding is linear, so the mean patch is the unfolded mean input, averaged over the
    positions (float64): one accumulation per layer and batch, no per-sample patches.
    """
    import torch
    from tqdm.auto import tqdm

    from distortion.experiments._torch_state import evaluated_on
    from distortion.experiments.models import get_layer
    from distortion.experiments.sensitivity import (
        _batches,
        _data_info,
        _layer_input,
        resolve_quantizable,
    )

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n_total, _, _ = _data_info(data, fingerprint=False)
    if n_total == 0:
        raise ValueError("the calibration data holds no samples; pass at least one image")
    with evaluated_on(model, device) as dev:
        x0, _ = next(iter(_batches(data, 2)))
        dtype = next(model.parameters()).dtype
        x0 = x0.to(device=dev, dtype=dtype) if x0.is_floating_point() else x0.to(dev)
        names = resolve_quantizable(model, layers, x0)
        _check_bias_layers(model, names, x0)
        sums: dict[str, Any] = {}
        counts = dict.fromkeys(names, 0)

        def make_hook(name: str):
            def hook(module, args, output):
                a = args[0].detach().to(torch.float64)
                if isinstance(module, torch.nn.Linear):
                    s = a.reshape(-1, a.shape[-1]).sum(0)[None, None]  # (1, 1, in)
                    counts[name] += a.numel() // a.shape[-1]
                else:
                    s = a.sum(0, keepdim=True)  # (1, C, *spatial): unfolded below
                    counts[name] += a.shape[0]
                sums[name] = s if name not in sums else sums[name] + s

            return hook

        handles = [get_layer(model, n).register_forward_hook(make_hook(n)) for n in names]
        n_seen = 0
        try:
            with torch.no_grad():
                for x, _ in tqdm(
                    _batches(data, batch_size), total=-(-n_total // batch_size),
                    desc="input means", disable=None if progress else True, leave=False,
                ):  # fmt: skip
                    x = x.to(device=dev, dtype=dtype) if x.is_floating_point() else x.to(dev)
                    model(x)
                    n_seen += x.shape[0]
        finally:
            for h in handles:
                h.remove()
        means = []
        for n in names:
            if n not in sums:
                raise ValueError(f"layer {n!r} was not called by the forward pass")
            module = get_layer(model, n)
            mean_in = sums[n] / counts[n]
            if isinstance(module, torch.nn.Linear):
                means.append(mean_in.reshape(1, -1).cpu().numpy())
            else:
                u = _layer_input(module, mean_in)  # (1, groups, in_per_group, P)
                means.append(u.mean(-1)[0].cpu().numpy())
    return InputMeans(
        layer_names=tuple(names), means=tuple(np.asarray(m, np.float64) for m in means),
        n_samples=int(n_seen), dataset_id=str(getattr(data, "dataset_id", "arrays")),
    )  # fmt: skip


def bias_corrections(
    original: Mapping[str, Any], compressed: Mapping[str, Any], means: InputMeans
) -> dict[str, np.ndarray]:
    r"""The shift :math:`(\tilde W_\ell - W_\ell)\,\bar u_\ell` of each layer's output mean.

    Parameters
    ----------
    original, compressed : mapping of layer name to weight (tensor or array)
        The float and the compressed weights (same keys, same shapes).
    means : InputMeans

    Returns
    -------
    dict of str to ndarray of shape (out_channels,), float64
        To be *subtracted* from each layer's bias (eq. L22).
    """
    from distortion.quantize import _to_numpy

    if not isinstance(means, InputMeans):
        raise ValueError(
            "bias_correction must be an InputMeans (distortion.experiments.bias_correction."
            f"input_means(model, calibration_data)), got {type(means).__name__}"
        )
    if set(original) != set(compressed):
        raise ValueError(
            f"original and compressed weights name different layers: {sorted(original)} vs "
            f"{sorted(compressed)}"
        )
    out = {}
    for name, w in original.items():
        w0, _ = _to_numpy(w)
        w1, _ = _to_numpy(compressed[name])
        if w0.shape != w1.shape:
            raise ValueError(f"layer {name!r}: compressed shape {w1.shape} != {w0.shape}")
        m = means.mean(name)
        g, d = m.shape
        if w0.shape[0] % g or w0.size != w0.shape[0] * d:
            raise ValueError(
                f"layer {name!r}: the input mean has shape {m.shape}, which does not fit a "
                f"weight of shape {w0.shape} (recompute the means on this model)"
            )
        e = (w1 - w0).reshape(g, w0.shape[0] // g, d)
        out[name] = np.einsum("god,gd->go", e, m).reshape(-1)
    return out


def apply_bias_correction(model: Any, corrections: Mapping[str, np.ndarray]) -> Any:
    """Subtract ``corrections`` from the biases of ``model``'s layers, in place.

    A layer without a bias gets one (``-correction``): the corrected network is an ordinary
    module a user can save and deploy. Returns ``model``.
    """
    import torch

    from distortion.experiments.models import get_layer

    with torch.no_grad():
        for name, c in corrections.items():
            module = get_layer(model, name)
            w = module.weight
            shift = torch.as_tensor(np.asarray(c), dtype=w.dtype, device=w.device)
            if shift.shape != (w.shape[0],):
                raise ValueError(
                    f"layer {name!r}: correction of shape {tuple(shift.shape)}, expected "
                    f"({w.shape[0]},)"
                )
            if module.bias is None:
                module.bias = torch.nn.Parameter(-shift, requires_grad=False)
            else:
                module.bias.sub_(shift)
    return model


def correct_compressed(
    model: Any, compressed_model: Any, values: Mapping[str, Any], means: InputMeans
) -> Any:
    """Shift the biases of ``compressed_model`` (a copy of ``model`` whose layers ``values``
    hold the compressed weights) by eq. L22, in place; returns it."""
    from distortion.experiments.models import get_layer

    shifts = bias_corrections(
        {n: get_layer(model, n).weight.detach() for n in values}, values, means
    )
    return apply_bias_correction(compressed_model, shifts)


def corrected_output(out: Any, weight: Any, w0: Any, mean: Any) -> Any:
    r"""A layer's output with the corrected bias following its weight (eq. L22):
    ``out - (weight - w0) u_bar`` broadcast over the positions. Zero shift at the float
    weight; inside ``torch.func`` or forward-mode AD, ``weight`` carries the tangent, so this
    is the bias-corrected network's tangent. ``mean`` is a (groups, in_per_group) tensor."""
    import torch

    e = (weight - w0).reshape(mean.shape[0], w0.shape[0] // mean.shape[0], -1)
    c = torch.einsum("god,gd->go", e, mean).reshape(-1)
    return out - (c.view(1, -1, *([1] * (out.ndim - 2))) if out.ndim > 2 else c)
