r"""Figures of the compression study (:mod:`distortion.experiments.compare_compression`).

The families (pruning, low rank, codebooks, non-uniform grids, compositions) have strengths
in different units (sparsity, energy kept, clusters, bits), so the common axis is the
perturbation's size, ``relative_error_energy`` :math:`\sum_\ell \|\hat W_\ell -
W_\ell\|^2 / \sum_\ell \|W_\ell\|^2`. Per cell:

* the measured flip rate with its Clopper--Pearson interval (a triangle on the bottom edge
  when no image flipped);
* level 2L, the first-order model moved by the actual perturbation, and level 3L, the same
  model under the compressor's error model taken as noise, with the band that one
  realization falls in with 95 % probability;
* ``noise_energy_ratio`` :math:`\rho` (1 when the perturbation behaves like the modelled
  noise with respect to the decisions, :mod:`~distortion.experiments.compare_compression`).

Every function takes the compression comparison (``Comparison``, its table or the path of
``compression.csv``), ``ax=None`` (a new figure when None) and returns the Axes; matplotlib
is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from distortion.plotting.compare import (
    _LEVEL_STYLE,
    _axes,
    _col,
    _plain_formatter,
    _plot_measured_flips,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.axes import Axes

__all__ = ["plot_flip_vs_error_energy", "plot_noise_energy_ratio", "save_compression_figures"]

_NEEDED = ("family", "relative_error_energy", "measured_flip_rate", "L2L_flip_rate",
           "L3L_flip_rate")  # fmt: skip


def _compression_table(table: Any) -> pd.DataFrame:
    """The DataFrame of a compression Comparison, a DataFrame, or a path to its csv."""
    import pandas as pd

    if hasattr(table, "table") and isinstance(table.table, pd.DataFrame):
        table = table.table
    elif isinstance(table, str | Path):
        p = Path(table)
        if not p.is_file():
            raise FileNotFoundError(f"no compression table at {p}: run the compression stage "
                                    "(`distortion run --config experiments/compression.toml`)")
        table = pd.read_csv(p)
    if not isinstance(table, pd.DataFrame):
        raise ValueError("table must be a compression Comparison, its DataFrame or the path "
                         f"of compression.csv, got {type(table).__name__}")  # fmt: skip
    missing = [c for c in _NEEDED if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks the column(s) {missing}: pass the result of "
                         "compare_compression (or compression.csv), not a rounding comparison")
    return table


def _one(t: pd.DataFrame, key: str, value: Any) -> pd.DataFrame:
    """Rows with ``key == value``; None: the column must hold a single value."""
    if key not in t.columns:
        return t
    values = list(dict.fromkeys(t[key].astype(str)))
    if value is None:
        if len(values) > 1:
            raise ValueError(f"the table holds several {key} values {values}: pass {key}=...")
        return t
    s = t[t[key].astype(str) == str(value)]
    if s.empty:
        raise ValueError(f"no rows with {key}={value!r}; the table has {key} in {values}")
    return s


def _plain_log_ticks(ax: Axes) -> None:
    """Decade ticks as plain numbers (0.01, 0.1, 1); on an axis spanning less than about
    1.5 decades also the minor ticks at 2 and 5 (sci-notation minor labels would overlap)."""
    import math

    from matplotlib.ticker import FuncFormatter

    def minor(axis: Any) -> FuncFormatter:
        def label(v: float, _pos: Any) -> str:
            lo, hi = sorted(axis.get_view_interval())
            if v <= 0 or lo <= 0 or hi / lo > 30:
                return ""
            mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
            return f"{v:g}" if mantissa in (2.0, 5.0) else ""

        return FuncFormatter(label)

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(_plain_formatter())
        axis.set_minor_formatter(minor(axis))


def plot_flip_vs_error_energy(
    table: Any,
    family: str | None = None,
    *,
    model: str | None = None,
    band: bool = True,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    r"""Flip rate against the relative error energy, one compression family.

    Parameters
    ----------
    table : Comparison, DataFrame or path
        The compression comparison (:func:`~distortion.experiments.compare_compression.
        compare_compression`).
    family, model : str, optional
        The series to draw; each may be left out when the table holds one value.
    band : bool, default True
        Shade the 3L band of one realization of the error model.
    legend : bool, default True
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
        Logarithmic axes; the strengths (sparsity, energy kept, bits...) label the points.
    """
    t = _one(_one(_compression_table(table), "family", family), "model", model)
    t = t.sort_values("relative_error_energy", kind="stable")
    if "layers" in t and t["layers"].nunique() > 1:
        raise ValueError(f"several layer sets {sorted(set(t['layers'].astype(str)))}: filter "
                         "the table first, e.g. table[table.layers == 'all']")  # fmt: skip
    ax = _axes(ax)
    x = _col(t, "relative_error_energy")
    positive: list[np.ndarray] = []
    if band and "L3L_flip_rate_high" in t:
        lo, hi = _col(t, "L3L_flip_rate_low"), _col(t, "L3L_flip_rate_high")
        label = "3L: 95 % band, one realization"
        if len(t) > 1:
            ax.fill_between(x, lo, hi, color=_LEVEL_STYLE[3]["color"], alpha=0.18, lw=0,
                            label=label)  # fmt: skip
        else:  # one cell (e.g. nf4): a band without width would not show
            ax.vlines(x, lo, hi, color=_LEVEL_STYLE[3]["color"], alpha=0.3, lw=8, label=label)
        positive.append(hi)
    for lv, label in ((2, "2L: linearized, actual error"), (3, "3L: linearized, error model")):
        y = _col(t, f"L{lv}L_flip_rate")
        ax.plot(x, y, label=label, markersize=4, **_LEVEL_STYLE[lv])
        positive.append(y)
    floor, allv = _plot_measured_flips(ax, x, t, positive)
    m = _col(t, "measured_flip_rate")
    ok = m > 0
    if "strength" in t:
        for xi, yi, s in zip(x, np.where(ok, m, floor), t["strength"], strict=True):
            ax.annotate(f"{s:g}", (xi, yi), textcoords="offset points", xytext=(3, 3),
                        fontsize="xx-small", color="0.35")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_ylim(floor / 1.5, min(1.5, float(allv.max()) * 2 if allv.size else 1.0))
    ax.set_xlabel(r"relative error energy $\sum\|\hat W - W\|^2 / \sum\|W\|^2$")
    ax.set_ylabel("flip rate")
    parts = [str(t[k].iloc[0]) for k in ("model", "family") if k in t and t[k].nunique() == 1]
    ax.set_title(", ".join(parts), fontsize="small")
    if legend:
        ax.legend(fontsize="x-small", frameon=False)
    return ax


def plot_noise_energy_ratio(
    table: Any, *, model: str | None = None, legend: bool = True, ax: Axes | None = None
) -> Axes:
    r"""The noise energy ratio :math:`\rho` of every cell against the relative error energy,
    one colour per family; :math:`\rho = 1` where the perturbation acts on the decisions as
    the modelled noise would, :math:`\rho > 1` where it is aligned with the directions the
    decisions depend on."""
    t = _one(_compression_table(table), "model", model)
    if "noise_energy_ratio" not in t:
        raise ValueError("table lacks the column 'noise_energy_ratio' (compare_compression)")
    ax = _axes(ax, figsize=(5.0, 3.2))
    for fam, g in t.groupby("family", sort=False):
        g = g.sort_values("relative_error_energy", kind="stable")
        ax.plot(_col(g, "relative_error_energy"), _col(g, "noise_energy_ratio"), "o-", ms=3,
                lw=0.8, label=str(fam))  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("relative error energy")
    ax.set_ylabel(r"noise energy ratio $\rho$")
    if legend:
        ax.legend(fontsize="xx-small", frameon=False, ncols=2)
    return ax


def save_compression_figures(
    comparison: Any, out_dir: str | Path, *, dpi: int = 120, panel_size: tuple[float, float] =
    (4.0, 3.0),
) -> list[Path]:
    """Draw the compression study's figures into ``out_dir`` as PNG files; return the paths.

    Per model (and layer set): ``flip_vs_error_energy_<model>.png``, one panel per family
    (:func:`plot_flip_vs_error_energy`), and ``noise_energy_ratio_<model>.png``
    (:func:`plot_noise_energy_ratio`); for every cell at once ``predicted_vs_measured.png``
    (:func:`~distortion.plotting.compare.plot_predicted_vs_measured`, flip rate and loss).
    """
    from matplotlib.figure import Figure

    from distortion.plotting.compare import _save_predicted_vs_measured, _slug, legend_entries

    t = _compression_table(comparison)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if t.empty:
        return paths
    w, h = panel_size
    keys = [k for k in ("model", "layers") if k in t.columns]
    for key, g in t.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        families = list(dict.fromkeys(g["family"]))
        ncols = min(4, len(families))
        nrows = -(-len(families) // ncols)
        fig = Figure(figsize=(w * ncols + 2.2, h * nrows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, fam in zip(axes, families, strict=False):
            plot_flip_vs_error_energy(g, fam, legend=False, ax=ax)
        for ax in axes[len(families):]:
            ax.set_axis_off()
        fig.legend(*legend_entries(axes[: len(families)]), loc="outside right upper",
                   fontsize="x-small", frameon=False)  # fmt: skip
        path = out / f"flip_vs_error_energy_{_slug(*key)}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
        if "noise_energy_ratio" in g:
            fig = Figure(figsize=(w * 1.4, h * 1.1), layout="constrained")
            plot_noise_energy_ratio(g, ax=fig.subplots())
            path = out / f"noise_energy_ratio_{_slug(*key)}.png"
            fig.savefig(path, dpi=dpi)
            paths.append(path)
    paths.append(_save_predicted_vs_measured(t, out, panel_size, dpi))
    return paths
