r"""Figures of the hypothesis tests of :mod:`distortion.stats` and its experiments runner.

Each function takes ``ax=None`` (a new figure when None) and returns the Axes; matplotlib is
imported inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.axes import Axes

    from distortion.stats import QQData

__all__ = ["plot_error_histogram", "plot_gaussian_effects", "plot_qq", "plot_uniform_verdicts"]

_VERDICT_COLORS = {"holds": "#4daf4a", "marginal": "#ff9f1c", "fails": "#e41a1c"}


def _axes(ax: Axes | None, figsize: tuple[float, float] = (4.0, 4.0)) -> Axes:
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_qq(qq: QQData | Any, *, ax: Axes | None = None, band: bool = True) -> Axes:
    """Normal Q--Q plot with the pointwise band of :func:`distortion.stats.qq_data`.

    Parameters
    ----------
    qq : QQData or array_like of shape (n,)
        Q--Q data, or a sample (passed to :func:`~distortion.stats.qq_data`).
    ax : matplotlib Axes, optional
    band : bool, default True
        Shade the pointwise band.

    Returns
    -------
    matplotlib Axes
    """
    from distortion.stats import QQData, qq_data

    if not isinstance(qq, QQData):
        qq = qq_data(qq)
    ax = _axes(ax)
    if band:
        ax.fill_between(qq.theoretical, qq.lower, qq.upper, color="0.85", lw=0,
                        label=f"{100 * qq.level:.0f} % pointwise band")  # fmt: skip
    lim = [float(qq.theoretical.min()), float(qq.theoretical.max())]
    ax.plot(lim, lim, color="0.4", lw=0.8)
    ax.plot(qq.theoretical, qq.sample, ".", ms=2.5, color="C0")
    ax.set_xlabel("N(0, 1) quantile")
    ax.set_ylabel("standardized sample quantile")
    if qq.name:
        ax.set_title(qq.name, fontsize=8)
    return ax


def plot_error_histogram(w: Any, quantized: Any, *, ax: Axes | None = None, bins: int = 30) -> Axes:
    r"""Histogram of the normalized error :math:`e/\Delta` against the U(-1/2, 1/2) density.

    Parameters
    ----------
    w : array_like of shape (C, ...)
        The weights.
    quantized : QuantizedTensor
        Their quantization (``error`` and ``step``; per-channel steps on axis 0).
    ax : matplotlib Axes, optional
    bins : int
        Number of bins inside [-1/2, 1/2] (the bins continue outside, same width).

    Returns
    -------
    matplotlib Axes
    """
    ax = _axes(ax, (3.0, 2.6))
    w = np.asarray(w, dtype=np.float64)
    step = np.asarray(quantized.step, dtype=np.float64)
    delta = step if step.ndim == 0 else step.reshape((-1,) + (1,) * (w.ndim - 1))
    delta = np.broadcast_to(delta, w.shape)
    keep = delta > 0
    u = np.asarray(quantized.error)[keep] / delta[keep]
    # bin edges on a grid that contains +-1/2, extended to cover the (clipped) tails
    width = 1.0 / bins
    reach = max(0.6, float(np.quantile(np.abs(u), 0.999)) * 1.05) if u.size else 0.6
    extra = int(np.ceil((reach - 0.5) / width))
    edges = (np.arange(-bins // 2 - extra, bins - bins // 2 + extra + 1)) * width
    edges = edges - (0.5 if bins % 2 else 0.0) * width
    lim = float(edges[-1])
    ax.hist(u, bins=edges, density=True, color="C0", alpha=0.7)
    ax.plot([-lim, -0.5, -0.5, 0.5, 0.5, lim], [0, 0, 1, 1, 0, 0], color="k", lw=1,
            label="U(-1/2, 1/2)")  # fmt: skip
    ax.set_xlabel(r"$e/\Delta$")
    ax.set_ylabel("density")
    return ax


def plot_uniform_verdicts(
    uniform: pd.DataFrame,
    *,
    quantizer: str | None = None,
    ax: Axes | None = None,
    colorbar: bool = True,
) -> Axes:
    """Heatmap of the uniform-error verdict per layer (rows) and bit-width (columns).

    Parameters
    ----------
    uniform : DataFrame
        :attr:`HypothesisReport.uniform` (columns ``layer``, ``quantizer``, ``bits``,
        ``verdict``, ``second_moment_ratio``).
    quantizer : str, optional
        Which quantizer's rows (default: the first).
    ax : matplotlib Axes, optional
    colorbar : bool, default True
        The colour key of the verdicts (holds, marginal, fails), right of the heatmap.

    Returns
    -------
    matplotlib Axes
        Cells are coloured by verdict and annotated with :math:`E[e^2]/(\\Delta^2/12)`.
    """
    from matplotlib.colors import ListedColormap

    if quantizer is None:
        quantizer = str(uniform["quantizer"].iloc[0])
    df = uniform[uniform["quantizer"] == quantizer]
    if df.empty:
        raise ValueError(f"quantizer {quantizer!r} has no rows in the table")
    layers = list(dict.fromkeys(df["layer"]))
    bits = sorted(df["bits"].unique())
    code = {"holds": 0, "marginal": 1, "fails": 2}
    grid = np.full((len(layers), len(bits)), np.nan)
    ratio = np.full_like(grid, np.nan)
    for _, r in df.iterrows():
        i, j = layers.index(r["layer"]), bits.index(r["bits"])
        grid[i, j] = code[r["verdict"]]
        ratio[i, j] = r["second_moment_ratio"]
    ax = _axes(ax, (1 + 0.5 * len(bits), 1 + 0.22 * len(layers)))
    cmap = ListedColormap([_VERDICT_COLORS[v] for v in code])
    im = ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=2.5, aspect="auto")
    fs = 6 if len(layers) > 20 else 7
    for i in range(len(layers)):
        for j in range(len(bits)):
            if np.isfinite(ratio[i, j]):
                ax.text(j, i, f"{ratio[i, j]:.2f}", ha="center", va="center", fontsize=fs)
    ax.set_xticks(range(len(bits)), [str(b) for b in bits])
    ax.set_yticks(range(len(layers)), layers, fontsize=fs)
    ax.set_xlabel("bits")
    ax.set_title(f"H_U verdict ({quantizer}); cell: E[e²]/(Δ²/12)", fontsize=8)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, ticks=list(code.values()), fraction=0.08, pad=0.03,
                                aspect=max(5, 3 * len(layers)))  # fmt: skip
        cb.ax.set_yticklabels(list(code), fontsize=7)
        cb.ax.tick_params(length=0)
        cb.set_label("verdict", fontsize=7)
    return ax


def plot_gaussian_effects(
    gaussian: pd.DataFrame, *, ax: Axes | None = None, thresholds: Any = None
) -> Axes:
    """Skewness against excess kurtosis of every feature and margin, with the verdict boxes.

    Parameters
    ----------
    gaussian : DataFrame
        :attr:`HypothesisReport.gaussian` (columns ``kind``, ``skewness``,
        ``excess_kurtosis``).
    ax : matplotlib Axes, optional
    thresholds : GaussianThresholds, optional
        Draws its "holds" and "fails" boxes (default thresholds when None).

    Returns
    -------
    matplotlib Axes
        The legend names the two boxes: inside the inner one both effects are small enough
        for the verdict "holds"; outside the outer one, "fails" (between: "marginal"; the
        Wasserstein distance and the p-value gate also enter the verdict).
    """
    from matplotlib.patches import Rectangle

    from distortion.stats import GaussianThresholds

    th = GaussianThresholds() if thresholds is None else thresholds
    ax = _axes(ax, (5.0, 4.0))
    for i, (kind, g) in enumerate(gaussian.groupby("kind", sort=True)):
        ax.scatter(g["skewness"], g["excess_kurtosis"], s=6, alpha=0.6, color=f"C{i}",
                   label=f"{kind} ({len(g)})")  # fmt: skip
    for (s, k), color, label in (
        ((th.skewness[0], th.excess_kurtosis[0]), _VERDICT_COLORS["holds"],
         "holds inside: |skew| ≤ {:g}, |kurt| ≤ {:g}"),
        ((th.skewness[1], th.excess_kurtosis[1]), _VERDICT_COLORS["fails"],
         "fails outside: |skew| > {:g} or |kurt| > {:g}"),
    ):  # fmt: skip
        ax.add_patch(Rectangle((-s, -k), 2 * s, 2 * k, fill=False, ec=color, lw=1,
                               label=label.format(s, k)))  # fmt: skip
    ax.axhline(0, color="0.6", lw=0.5)
    ax.axvline(0, color="0.6", lw=0.5)
    ax.set_xlabel("skewness")
    ax.set_ylabel("excess kurtosis")
    ax.legend(fontsize=7)
    return ax
