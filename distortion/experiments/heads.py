r"""Several heads on one backbone, and multi-label sigmoid outputs: predicted and measured.

A multi-task network returns several logit tensors (a tuple, a list or a dict of heads); a
multi-label head returns one logit :math:`z_l` per label, each deciding on its own
(:math:`z_l > 0`). Each such decision is a classifier of its own, and everything of
``theory/multilayer.md`` applies to it unchanged once it is seen as one:

* a head ``h`` is the network :math:`x \mapsto z^{(h)}(x)` (:class:`SelectOutput` with
  ``head=h``);
* a sigmoid label ``l`` decides as the two-class softmax of the logits
  :math:`(0, z_l)`: :math:`\arg\max(0, z_l) = 1 \iff z_l > 0`, and its margin is
  :math:`z_l` itself (``label=l``, eq. H1 of ``theory/multilayer.md`` §14).

The quantized weights are the backbone's and every head's; a head's logits do not depend on
the other heads' weights, whose Jacobian is zero, so quantizing all of them at once is what
each head sees. :func:`compare_outputs` fits the first-order model (level 3L) per output on
the same images, measures the quantized network per output, and returns one row per output
and bit-width with the band and whether the measured flip rate lies in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

__all__ = ["OutputComparison", "OutputSpec", "SelectOutput", "compare_outputs"]


def _torch_module():
    import torch
    from torch import nn

    return torch, nn


def SelectOutput(model: nn.Module, head: Any = None, label: int | None = None) -> nn.Module:  # noqa: N802
    r"""One decision of a multi-output network as a classifier (eq. H1).

    Parameters
    ----------
    model : torch.nn.Module
        Returns a tensor (B, K), or a tuple / list / dict of them (one per head).
    head : int or str, optional
        Which head (index or key); None when the network returns one tensor.
    label : int, optional
        For a multi-label sigmoid head: the label whose decision :math:`z_l > 0` is wanted;
        the wrapper returns the logits :math:`(0, z_l)` of shape (B, 2).

    Returns
    -------
    torch.nn.Module
        Its submodule ``model`` is the given network (layer names get the prefix
        ``model.``); in eval mode when the network is.
    """
    torch, nn = _torch_module()

    class _Select(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.head = head
            self.label = label
            self.train(model.training)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model(x)
            if self.head is not None:
                try:
                    out = out[self.head]
                except (KeyError, IndexError, TypeError) as exc:
                    keys = list(out.keys()) if hasattr(out, "keys") else ""
                    raise ValueError(
                        f"the network has no head {self.head!r} (its output is "
                        f"{type(out).__name__}{keys})"
                    ) from exc
            elif not isinstance(out, torch.Tensor):
                raise ValueError(
                    f"the network returns a {type(out).__name__}: pass head= to pick one output"
                )
            if out.ndim != 2:
                raise ValueError(f"a head must give logits of shape (B, K), got {tuple(out.shape)}")
            if self.label is not None:
                if not 0 <= self.label < out.shape[1]:
                    raise ValueError(f"label must lie in 0..{out.shape[1] - 1}, got {self.label}")
                z = out[:, self.label]
                out = torch.stack([torch.zeros_like(z), z], dim=1)  # (eq. H1)
            return out

    return _Select()


@dataclass(frozen=True)
class OutputSpec:
    """One output to predict: a head (index or key), optionally one sigmoid label of it, and
    the true classes of the images for that output (class indices; 0/1 for a label)."""

    name: str
    labels: np.ndarray = field(repr=False)
    head: Any = None
    label: int | None = None


@dataclass(frozen=True)
class OutputComparison:
    """Predicted (level 3L) and measured flip rate and accuracy loss per output and bit-width.

    Attributes
    ----------
    table : DataFrame
        One row per (output, bits): ``predicted_flip_rate`` and its band, ``measured_flip_rate``
        and its interval, ``in_band``, the same for the accuracy loss.
    """

    table: pd.DataFrame = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """The table (a copy)."""
        return self.table.copy()

    def coverage(self) -> float:
        """Share of rows whose measured flip rate lies in the predicted band."""
        return float(self.table["in_band"].mean())


def _check_specs(outputs: Sequence[OutputSpec], n: int) -> list[OutputSpec]:
    outs = list(outputs)
    if not outs:
        raise ValueError("outputs is empty: give at least one OutputSpec")
    names = [o.name for o in outs]
    if len(set(names)) != len(names):
        raise ValueError(f"output names must be unique, got {names}")
    for o in outs:
        y = np.asarray(o.labels)
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels of output {o.name!r} must be integers of shape ({n},)")
    return outs


def compare_outputs(
    model: nn.Module,
    x: torch.Tensor,
    outputs: Sequence[OutputSpec],
    quantizers: Sequence[Any],
    *,
    n_realizations: int = 40,
    seed: int = 0,
    cache_dir: Any = None,
    progress: bool = False,
) -> OutputComparison:
    """Predict and measure every output of a multi-head / multi-label network.

    Parameters
    ----------
    model : torch.nn.Module
        The float multi-output network (see :class:`SelectOutput`).
    x : tensor of shape (N, ...)
        The images (the same for every output).
    outputs : sequence of OutputSpec
    quantizers : sequence of UniformQuantizer
        Every layer of the network gets each quantizer in turn.
    n_realizations, seed, cache_dir, progress
        As in :class:`~distortion.estimator.AccuracyLossEstimator`.
    """
    import pandas as pd
    import torch

    from distortion.estimator import AccuracyLossEstimator
    from distortion.experiments.measure import measure

    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError("x must be a tensor of images of shape (N, ...)")
    outs = _check_specs(outputs, int(x.shape[0]))
    qs = list(quantizers)
    if not qs:
        raise ValueError("quantizers is empty: give at least one UniformQuantizer")
    rows = []
    for o in outs:
        net = SelectOutput(model, head=o.head, label=o.label)
        y = torch.as_tensor(np.asarray(o.labels), dtype=torch.int64)
        est = AccuracyLossEstimator(
            qs[0], layers="all", n_realizations=n_realizations, seed=seed, cache_dir=cache_dir,
            progress=progress,
        ).fit_model(net, (x, y), granularity="channel" if any(
            q.granularity == "channel" for q in qs) else "tensor")  # fmt: skip
        for q in qs:
            p = est.predict(int(q.bits), quantizer=q).to_frame().iloc[0]
            m = measure(net, (x, y), q, layers=list(est.layers_), seed=seed, progress=progress)
            lo, hi = float(p["flip_rate_low"]), float(p["flip_rate_high"])
            rows.append({
                "output": o.name, "head": o.head, "label": o.label, "bits": int(q.bits),
                "granularity": q.granularity, "n": int(m.n),
                "predicted_flip_rate": float(p["flip_rate"]), "predicted_flip_rate_low": lo,
                "predicted_flip_rate_high": hi, "measured_flip_rate": float(m.flip_rate),
                "measured_flips": int(m.flip_counts[0]),
                "in_band": bool(lo <= m.flip_rate <= hi),
                "predicted_accuracy_loss": float(p["accuracy_loss"]),
                "measured_accuracy_loss": float(m.accuracy_loss),
            })  # fmt: skip
    return OutputComparison(pd.DataFrame(rows))
