r"""The noise each layer's input carries when the layers before it are compressed.

The first-order model (``theory/multilayer.md`` eq. L2) lets layer :math:`\ell`'s error act on
its float input :math:`u`; in the compressed network it acts on :math:`u + n_\ell`, where
:math:`n_\ell` is the noise the errors of the layers before it have put there. Under H_U the
product :math:`E_\ell n_\ell` is zero-mean and adds the variance
:math:`\sigma_\ell^2\,E\|n_\ell\|^2` to that of :math:`E_\ell u` (section 16, eq. L24-L26),
so the layer's second moment is inflated by :math:`1 + \rho_\ell`, with
:math:`\rho_\ell = \sum_j \bar\sigma_j^2 A_{\ell j}` and

.. math:: A_{\ell j} = \frac{E\,\|\partial u_\ell/\partial W_j\,\varepsilon_j\|^2}
                            {E\,\|u_\ell - \bar u_\ell\|^2} \qquad \text{(eq. L26)}

for a unit-variance error :math:`\varepsilon_j` in layer :math:`j` (shaped by the channel
profile the Grams' realizations use, eq. L12). :func:`input_noise` estimates :math:`A` by
forward-mode differentiation: one pass per layer :math:`j` and draw gives the first-order
noise at every later layer's input at once. The matrix does not depend on the bit-width, so
it is a one-time cost like the Grams, and cached with them.

torch is imported inside the functions only.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from distortion.experiments import _cache, _paths

__all__ = ["InputNoise", "input_noise"]

_CACHE_VERSION = 1


@dataclass(frozen=True)
class InputNoise:
    r"""The energy ratios :math:`A_{\ell j}` of eq. L26.

    Attributes
    ----------
    layer_names : tuple of str
    granularity : {"tensor", "channel"}
        The channel profile of the unit-variance draws (per channel: rms-normalised
        :math:`\max_c |w|`, as the Grams' realizations).
    ratios : ndarray of shape (L, L)
        Row :math:`\ell`: noise energy at layer :math:`\ell`'s input per unit variance of
        layer :math:`j`'s error, relative to the input's energy (centred on its calibration
        mean when ``bias_corrected``).
    ratios_stderr : ndarray of shape (L, L)
        Standard error of each ratio over the draws.
    n_samples, n_draws : int
    bias_corrected : bool
        Whether the noise is that of the bias-corrected network (eq. L22).
    key : str
    meta : dict
    """

    layer_names: tuple[str, ...]
    granularity: str
    ratios: np.ndarray
    ratios_stderr: np.ndarray
    n_samples: int
    n_draws: int
    bias_corrected: bool
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def rho(self, variances: Sequence[Any]) -> np.ndarray:
        r""":math:`\rho_\ell` of each layer for these second moments (eq. L25)."""
        from distortion.theory.multilayer import input_noise_inflation

        return input_noise_inflation(variances, self.ratios)[1]

    def inflate(self, variances: Sequence[Any]) -> list[np.ndarray]:
        r"""The second moments :math:`\sigma^2_{\ell c}(1 + \rho_\ell)` (eq. L25)."""
        from distortion.theory.multilayer import input_noise_inflation

        return input_noise_inflation(variances, self.ratios)[0]

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, upstream layer) with a non-zero ratio."""
        rows = [
            {"layer": a, "upstream": b, "ratio": float(self.ratios[i, j]),
             "ratio_stderr": float(self.ratios_stderr[i, j])}
            for i, a in enumerate(self.layer_names)
            for j, b in enumerate(self.layer_names)
            if self.ratios[i, j] > 0
        ]  # fmt: skip
        return pd.DataFrame(rows, columns=["layer", "upstream", "ratio", "ratio_stderr"])


def input_noise(
    model: Any,
    data: Any,
    *,
    layers: str | Sequence[str] = "all",
    granularity: Literal["tensor", "channel"] = "tensor",
    n_draws: int = 2,
    bias_correction: Any = None,
    batch_size: int = 100,
    seed: int = 0,
    device: str = "cpu",
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> InputNoise:
    r"""Estimate the input-noise ratios :math:`A_{\ell j}` (eq. L26) by forward-mode JVPs.

    Parameters
    ----------
    model : torch.nn.Module
        The float network (eval mode during the passes; left as it was).
    data : ImageDataset, DataLoader, Dataset, (x, y) or tensor
        Images (a few hundred are plenty: the ratios average over images and positions).
    layers : "all" or sequence of str
        The layers of the Grams the ratios go with (same order).
    granularity : {"tensor", "channel"}
        Channel profile of the draws: match the quantizer's.
    n_draws : int
        Uniform draws per layer (>= 2 for a standard error).
    bias_correction : InputMeans, optional
        The noise of the bias-corrected network: each layer's output also moves by
        :math:`-E\bar u` (eq. L22), and the input energies are centred on these means.
    batch_size, seed, device, cache, cache_dir, progress

    Returns
    -------
    InputNoise
    """
    import torch
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call
    from tqdm.auto import tqdm

    from distortion.experiments._torch_state import evaluated_on
    from distortion.experiments.bias_correction import (
        InputMeans,
        _check_bias_layers,
        corrected_output,
    )
    from distortion.experiments.models import get_layer
    from distortion.experiments.sensitivity import (
        _batches,
        _data_info,
        _model_hash,
        channel_profile,
        resolve_quantizable,
    )

    if granularity not in ("tensor", "channel"):
        raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")
    if isinstance(n_draws, bool) or not isinstance(n_draws, int | np.integer) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if bias_correction is not None and not isinstance(bias_correction, InputMeans):
        raise ValueError(
            "bias_correction must be an InputMeans (distortion.experiments.bias_correction."
            f"input_means), got {type(bias_correction).__name__}"
        )
    n_total, _, data_fp = _data_info(data)
    if n_total == 0:
        raise ValueError("data holds no samples; pass at least one image")
    with evaluated_on(model, device) as dev:
        x0, _ = next(iter(_batches(data, 2)))
        dtype = next(model.parameters()).dtype
        x0 = x0.to(device=dev, dtype=dtype) if x0.is_floating_point() else x0.to(dev)
        names = resolve_quantizable(model, layers, x0)
        _check_bias_layers(model, names, x0, "the input-noise estimate")
        key = _cache.content_key({
            "cache": "input-noise", "version": _CACHE_VERSION, "weights": _model_hash(model),
            "data": data_fp, "layers": names, "granularity": granularity,
            "n_draws": int(n_draws), "seed": int(seed),
            "input_means": None if bias_correction is None else bias_correction.key,
        })  # fmt: skip
        path = _paths.cache_dir(cache_dir) / "input_noise" / f"input-noise-{key[:24]}.npz"
        if cache:
            found = _cache.load_cached(path, _load, key=key, key_of=lambda r: r.key)
            if found is not None:
                return found
        t0 = time.perf_counter()
        mods = [get_layer(model, n) for n in names]
        w0 = [m.weight.detach() for m in mods]
        params = {f"{n}.weight": w for n, w in zip(names, w0, strict=True)}
        profiles = [channel_profile(w.cpu().numpy().astype(np.float64), granularity) for w in w0]
        means = None
        if bias_correction is not None:
            means = [torch.as_tensor(bias_correction.mean(n), dtype=dtype, device=dev)
                     for n in names]  # fmt: skip
        n_layers = len(names)
        energy = np.zeros((n_draws, n_layers, n_layers))  # [draw, layer, upstream]
        sq = np.zeros(n_layers)  # sum of squares of each input (per channel sums below)
        s1: list[Any] = [0.0] * n_layers
        counts = np.zeros(n_layers)
        seen: dict[int, Any] = {}

        def make_hook(i: int):
            def hook(module, args, out):
                seen[i] = args[0]
                if means is None:
                    return out
                # the corrected bias moves with the weight (eq. L22)
                return corrected_output(out, module.weight, w0[i], means[i])

            return hook

        def one_pass(j: int, tangent: Any, r: int, first: bool) -> None:
            """Layer j's weight moved along ``tangent``: noise energy at every later input."""
            with torch.no_grad():
                for x, _ in _batches(data, batch_size):
                    x = x.to(device=dev, dtype=dtype) if x.is_floating_point() else x.to(dev)
                    seen.clear()
                    with fwad.dual_level():
                        p = dict(params)
                        p[f"{names[j]}.weight"] = fwad.make_dual(w0[j], tangent)
                        functional_call(model, p, (x,))
                        for i in range(j + 1, n_layers):
                            t = fwad.unpack_dual(seen[i]).tangent
                            if t is not None:
                                energy[r, i, j] += float((t.double() ** 2).sum())
                        if first:
                            for i in range(n_layers):
                                a = fwad.unpack_dual(seen[i]).primal.double()
                                if isinstance(mods[i], torch.nn.Linear):
                                    a = a.reshape(-1, a.shape[-1])
                                else:  # channels last, then the rest
                                    a = a.movedim(1, -1).reshape(-1, a.shape[1])
                                sq[i] += float((a**2).sum())
                                s1[i] = s1[i] + a.sum(dim=0)
                                counts[i] += a.shape[0]

        handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(mods)]
        bar = tqdm(total=max(n_layers - 1, 1) * n_draws, desc="input noise", leave=False,
                   disable=None if progress else True)  # fmt: skip
        try:
            for j in range(max(n_layers - 1, 1)):  # the last layer's error reaches no input
                for r in range(n_draws):
                    rng = np.random.default_rng([seed, j, r, 9127])
                    e = rng.uniform(-math.sqrt(3.0), math.sqrt(3.0), size=tuple(w0[j].shape))
                    e *= profiles[j].reshape(-1, *([1] * (w0[j].ndim - 1)))
                    one_pass(j, torch.as_tensor(e, dtype=dtype, device=dev), r, j == r == 0)
                    bar.update(1)
        finally:
            bar.close()
            for h in handles:
                h.remove()
        signal = sq.copy()
        if means is not None:  # energy about the per-channel mean: sum a^2 - N mean^2
            for i in range(n_layers):
                mu = np.asarray(s1[i].cpu()) / counts[i]
                signal[i] = sq[i] - counts[i] * float(np.sum(mu**2))
        if np.any(signal <= 0):
            bad = [names[i] for i in np.flatnonzero(signal <= 0)]
            raise ValueError(f"layer input(s) {bad} carry no energy on these images")
        ratios = energy / signal[None, :, None]
        a = ratios.mean(axis=0)
        se = ratios.std(axis=0, ddof=1) / math.sqrt(n_draws) if n_draws > 1 else np.zeros_like(a)
        result = InputNoise(
            layer_names=tuple(names), granularity=granularity, ratios=a, ratios_stderr=se,
            n_samples=int(n_total), n_draws=int(n_draws), bias_corrected=means is not None,
            key=key, meta={"seconds": time.perf_counter() - t0},
        )  # fmt: skip
    if cache:
        try:
            _save(result, path)
        except OSError as exc:
            import warnings

            warnings.warn(f"could not write the input-noise cache {str(path)!r}: {exc}",
                          _cache.CacheWarning, stacklevel=2)  # fmt: skip
    return result


def _save(r: InputNoise, path: Any) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "layer_names": list(r.layer_names), "granularity": r.granularity,
        "n_samples": r.n_samples, "n_draws": r.n_draws, "bias_corrected": r.bias_corrected,
        "key": r.key, "meta": r.meta,
    }  # fmt: skip
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, header=np.array(json.dumps(header)), ratios=r.ratios, se=r.ratios_stderr)
    os.replace(tmp, path)


def _load(path: Any) -> InputNoise:
    import json

    with np.load(path, allow_pickle=False) as z:
        h = json.loads(str(z["header"]))
        return InputNoise(
            layer_names=tuple(h["layer_names"]), granularity=h["granularity"],
            ratios=np.array(z["ratios"]), ratios_stderr=np.array(z["se"]),
            n_samples=int(h["n_samples"]), n_draws=int(h["n_draws"]),
            bias_corrected=bool(h["bias_corrected"]), key=h["key"], meta=h["meta"],
        )  # fmt: skip
