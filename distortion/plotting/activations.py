"""Figures of the weight / activation split of a W+A prediction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from distortion.plotting.compare import _axes

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

__all__ = ["plot_weight_activation_split"]


def plot_weight_activation_split(split: Any, *, ax: Axes | None = None, top: int = 30) -> Axes:
    """Bars of each part's share of the logit noise energy, weights and activations in two
    colours, in forward order (the ``top`` largest parts; the rest are summed in "others").

    Parameters
    ----------
    split : WeightActivationSplit
        From :func:`distortion.experiments.activation_grams.weight_activation_split`.
    ax : matplotlib Axes, optional
    top : int
        Parts shown.
    """
    parts = split.to_frame()
    if parts.empty:
        raise ValueError("the split has no parts to plot")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    ax = _axes(ax, (max(4.0, 0.22 * min(top, len(parts)) + 1.5), 3.0))
    keep = parts.nlargest(top, "noise_share").sort_index()
    rest = float(parts["noise_share"].sum() - keep["noise_share"].sum())
    colours = np.where(keep["kind"] == "weights", "tab:blue", "tab:orange")
    x = np.arange(len(keep))
    ax.bar(x, keep["noise_share"], color=colours)
    labels = list(keep["name"])
    if rest > 0:
        ax.bar([len(keep)], [rest], color="0.6")
        labels.append("others")
    ax.set_xticks(np.arange(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("share of the logit noise")
    ax.set_title(
        f"flip rate {split.flip_rate:.3%} (weights alone {split.weights_flip_rate:.3%}, "
        f"activations alone {split.activations_flip_rate:.3%})",
        fontsize=8,
    )
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", label="weights"),
                       Patch(color="tab:orange", label="activations")], fontsize=7)  # fmt: skip
    return ax
