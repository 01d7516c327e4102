r"""Figures of the predicted-versus-measured comparison (:mod:`distortion.experiments.compare`).

Every function takes the tidy table of :class:`~distortion.experiments.compare.Comparison`
(``comparison.table``, or the ``comparison.csv`` written by ``distortion run``), ``ax=None``
(a new figure when None) and returns the Axes; matplotlib is imported inside the functions.

What the figures show, per cell (model × problem × layer set × quantizer × bit-width):

* the measured flip rate (level 4, Clopper--Pearson interval) and accuracy loss (paired
  interval) after the network was actually quantized;
* the predictions of levels 1--3 (ARCHITECTURE.md): level 1 under H_G and H_U, level 2 under
  H_G with the actual error, level 3 on the empirical features under H_U, with the band that
  one realization of the uniform error falls in with 95 % probability (eq. M16). When every
  layer is quantized, level 3 is the first-order model under H_U (eq. L4, columns ``L3L_*``)
  and level 2 the same linearization with the actual error (``L2L_*``); level 1 does not
  apply;
* the baseline bound of Sakr et al. [1]_ on the flip rate (Chebyshev + union bound).

Column names (``Comparison.table``): ``<prefix>_flip_rate``, ``<prefix>_accuracy_loss``, their
``_low``/``_high`` band or interval, ``_stderr`` and ``_abs_error``, with the prefix ``L1``,
``L2``, ``L3`` for the last-layer rows, ``L2L``, ``L3L`` for the all-layer rows
(:func:`level_prefix`) and ``measured`` for the measurement; ``sakr_flip_rate_bound`` (clipped
at 1) and ``sakr_flip_rate_abs_error`` for the baseline.

References
----------
.. [1] C. Sakr, Y. Kim and N. Shanbhag, "Analytical guarantees on numerical precision of
   deep neural networks", ICML 2017.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.axes import Axes

__all__ = [
    "ALL_LAYER_LABELS",
    "LEVEL_LABELS",
    "legend_entries",
    "level_label",
    "level_prefix",
    "plot_abs_error_vs_bits",
    "plot_flip_vs_bits",
    "plot_loss_vs_bits",
    "plot_predicted_vs_measured",
    "save_comparison_figures",
]

#: Legend label of each prediction level, last layer alone.
LEVEL_LABELS: dict[int, str] = {
    1: "level 1: Gaussian $x$, uniform $E$",
    2: "level 2: Gaussian $x$, actual $E$",
    3: "level 3: empirical $x$, uniform $E$",
}
#: Legend label of each level when every layer is quantized: level 3 is the first-order
#: (linearized) model under H_U, level 2 the same linearization moved by the actual error,
#: level 1 does not apply (NaN).
ALL_LAYER_LABELS: dict[int, str] = {
    2: "level 2: linearized, actual $E$",
    3: "level 3: linearized, uniform $E$",
}


def level_label(level: int, layers: str | None = "last") -> str:
    """Legend label of a prediction level for the last layer or for all layers."""
    if layers == "all" and level in ALL_LAYER_LABELS:
        return ALL_LAYER_LABELS[level]
    return LEVEL_LABELS.get(level, f"level {level}")


_LEVEL_STYLE: dict[int, dict[str, Any]] = {
    1: {"color": "C0", "marker": "o", "linestyle": "-"},
    2: {"color": "C1", "marker": "s", "linestyle": "--"},
    3: {"color": "C2", "marker": "^", "linestyle": "-."},
}
_MEASURED_STYLE = {"color": "k", "marker": "D", "linestyle": "none", "markersize": 4}
_SAKR_STYLE = {"color": "0.45", "linestyle": ":", "marker": "x", "markersize": 4}
_KEYS = ("model", "problem", "layers", "granularity")
_REQUIRED = ("bits", "measured_flip_rate", "measured_accuracy_loss")
#: ``quantity`` argument -> column suffix ("flip" and "loss" are short aliases).
_QUANTITY = {"flip": "flip_rate", "loss": "accuracy_loss", "flip_rate": "flip_rate",
             "accuracy_loss": "accuracy_loss"}  # fmt: skip


def level_prefix(level: int, layers: str | None = "last") -> str:
    """Column prefix of a prediction level in the comparison table.

    ``L1``, ``L2``, ``L3`` for the last layer; when every layer is quantized (``layers ==
    "all"``) levels 2 and 3 are the linearized model, ``L2L`` and ``L3L`` (level 1 does not
    apply: its ``L1`` columns are NaN in those rows).
    """
    if layers == "all" and level in (2, 3):
        return f"L{level}L"
    return f"L{level}"


def _quantity(quantity: str) -> str:
    if quantity not in _QUANTITY:
        raise ValueError(
            f"quantity must be 'flip' or 'loss' ('flip_rate', 'accuracy_loss'), got {quantity!r}"
        )
    return _QUANTITY[quantity]


def _axes(ax: Axes | None, figsize: tuple[float, float] = (4.0, 3.0)) -> Axes:
    import matplotlib.pyplot as plt

    if ax is None:  # constrained: labels and a legend outside the axes stay in the figure
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _as_table(table: Any) -> pd.DataFrame:
    """The DataFrame of a Comparison, a DataFrame, or a path to comparison.csv."""
    import pandas as pd

    if hasattr(table, "table") and isinstance(table.table, pd.DataFrame):
        table = table.table
    elif isinstance(table, str | Path):
        p = Path(table)
        if not p.is_file():
            raise FileNotFoundError(f"no comparison table at {p}: run `distortion run` first")
        table = pd.read_csv(p)
    if not isinstance(table, pd.DataFrame):
        raise ValueError(
            f"table must be a Comparison, its DataFrame or a path to comparison.csv, "
            f"got {type(table).__name__}"
        )
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        old = {"measured_flip", "measured_loss"} & set(table.columns)
        hint = " (an older comparison.csv: rerun `distortion run`)" if old else ""
        raise ValueError(
            f"table lacks the column(s) {missing}: pass Comparison.table or comparison.csv{hint}"
        )
    return table


def _select(table: pd.DataFrame, **keys: Any) -> pd.DataFrame:
    """Rows matching ``keys`` (None: the column must hold a single value), sorted by bits."""
    t = table
    for k, v in keys.items():
        if k not in t.columns:
            if v is None:
                continue
            raise ValueError(f"the table has no column {k!r} to select {k}={v!r}")
        values = list(dict.fromkeys(t[k].astype(str)))
        if v is None:
            if len(values) > 1:
                raise ValueError(f"the table holds several {k} values {values}: pass {k}=...")
            continue
        t = t[t[k].astype(str) == str(v)]
        if t.empty:
            raise ValueError(f"no rows with {k}={v!r}; the table has {k} in {values}")
    if t["bits"].duplicated().any():
        varying = [
            c
            for c in ("scheme", "clipping", "rounding", "n_classes")
            if c in t and t[c].nunique() > 1
        ]
        raise ValueError(
            f"several rows per bit-width (they differ in {varying or 'unknown columns'}): "
            "filter the table first, e.g. table[table.scheme == 'symmetric']"
        )
    return t.sort_values("bits")


def _layers_of(t: pd.DataFrame) -> str | None:
    """The layer set of a selection, when it holds one."""
    if "layers" in t and t["layers"].nunique() == 1:
        return str(t["layers"].iloc[0])
    return None


def _only_layers(t: pd.DataFrame, layers: str | None) -> pd.DataFrame:
    """Rows of one layer set (all rows when ``layers`` is None)."""
    if layers is None:
        return t
    values = list(dict.fromkeys(t["layers"].astype(str))) if "layers" in t else []
    if str(layers) not in values:
        raise ValueError(f"no rows with layers={layers!r}; the table has layers in {values}")
    return t[t["layers"].astype(str) == str(layers)]


def _col(t: pd.DataFrame, name: str) -> np.ndarray:
    if name not in t.columns:
        return np.full(len(t), np.nan)
    return t[name].to_numpy(dtype=np.float64)


def _row_layers(t: pd.DataFrame) -> np.ndarray:
    """The layer set of each row ("last" when the table has no ``layers`` column)."""
    return t["layers"].astype(str).to_numpy() if "layers" in t else np.full(len(t), "last")


def _level_col(t: pd.DataFrame, level: int, suffix: str) -> np.ndarray:
    """Per row, ``<prefix>_<suffix>`` with the level's prefix for that row's layer set."""
    lay = _row_layers(t)
    out = _col(t, f"{level_prefix(level, 'last')}_{suffix}")
    if (lay == "all").any():
        out = np.where(lay == "all", _col(t, f"{level_prefix(level, 'all')}_{suffix}"), out)
    return out


def _plain_formatter() -> Any:
    """Tick labels as plain numbers (-1, -0.1, 0, 0.1, 1, 10) on a symmetric-log axis."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def _title(t: pd.DataFrame, keys: Sequence[str]) -> str:
    parts = []
    for k in keys:
        if k in t.columns and t[k].nunique() == 1:
            v = str(t[k].iloc[0])
            parts.append({"layers": f"{v} layer{'s' if v == 'all' else ''}",
                          "granularity": f"per {v}"}.get(k, v))  # fmt: skip
    return ", ".join(parts)


def _plot_measured_flips(
    ax: Axes, x: np.ndarray, t: pd.DataFrame, positive: list[np.ndarray]
) -> tuple[float, np.ndarray]:
    """The measured flip rate at ``x`` with its interval; a measured 0 (no flip) as a
    downward triangle on the bottom edge with its upper limit. ``positive``: the other drawn
    series (for the axis range). Returns the bottom edge and every positive value drawn."""
    m = _col(t, "measured_flip_rate")
    mlo, mhi = _col(t, "measured_flip_rate_low"), _col(t, "measured_flip_rate_high")
    allv = np.concatenate([*positive, m, mhi])
    allv = allv[np.isfinite(allv) & (allv > 0)]
    floor = float(allv.min()) / 3 if allv.size else 1e-4
    ok = m > 0
    yerr = np.vstack([m - np.where(np.isfinite(mlo), np.maximum(mlo, floor), m),
                      np.where(np.isfinite(mhi), mhi - m, 0.0)])  # fmt: skip
    ax.errorbar(x[ok], m[ok], yerr=yerr[:, ok], capsize=2, elinewidth=0.8,
                label="measured (95 % CI)", **_MEASURED_STYLE)  # fmt: skip
    zero = (m == 0) & np.isfinite(m)
    if zero.any():
        ax.plot(x[zero], np.full(zero.sum(), floor), "v", color="k", markersize=5,
                label="measured: no flip")  # fmt: skip
        for b, h in zip(x[zero], mhi[zero], strict=True):
            if np.isfinite(h):
                ax.plot([b, b], [floor, h], color="k", lw=0.8)
    return floor, allv


def plot_flip_vs_bits(
    table: Any,
    *,
    model: str | None = None,
    problem: str | None = None,
    layers: str | None = None,
    granularity: str | None = None,
    levels: Sequence[int] = (1, 2, 3),
    band: bool = True,
    sakr: bool = True,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    r"""Flip rate against bit-width: measured, each level's prediction, the level-3 band.

    Parameters
    ----------
    table : Comparison, DataFrame or path
        The comparison table (one row per cell).
    model, problem, layers, granularity : str, optional
        The cell series to draw; each may be left out when the table holds one value.
    levels : sequence of int, default (1, 2, 3)
        Prediction levels to draw (levels whose column is missing or all NaN are skipped,
        e.g. level 1 of the all-layer rows). For all layers, levels 2 and 3 are the
        first-order model with the actual and with uniform errors (:data:`ALL_LAYER_LABELS`).
    band : bool, default True
        Shade the level-3 95 % band of one realization of the error (eq. M16).
    sakr : bool, default True
        Draw the bound of Sakr et al. [1]_ (clipped at 1).
    legend : bool, default True
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
        Logarithmic y axis. A measured flip rate of exactly 0 (no flip among the evaluated
        images) is drawn as a downward triangle on the bottom edge, with its upper limit.

    Notes
    -----
    Under H_U the flip probability is linear in the step (eq. B15): it halves with each
    extra bit, so the curves are straight lines of slope :math:`-\log_{10}2` per bit.
    """
    t = _select(_as_table(table), model=model, problem=problem, layers=layers,
                granularity=granularity)  # fmt: skip
    ax = _axes(ax)
    bits = t["bits"].to_numpy()
    positive: list[np.ndarray] = []
    if band and 3 in levels:
        lo, hi = _level_col(t, 3, "flip_rate_low"), _level_col(t, 3, "flip_rate_high")
        if np.any(np.isfinite(hi)):
            ax.fill_between(bits, lo, hi, color=_LEVEL_STYLE[3]["color"], alpha=0.18, lw=0,
                            label="level 3: 95 % band, one realization")  # fmt: skip
            positive.append(hi)  # not lo: a band reaching 0 would stretch the axis down
    for lv in levels:
        y = _level_col(t, lv, "flip_rate")
        if np.all(~np.isfinite(y)):
            continue
        ax.plot(bits, y, label=level_label(lv, _layers_of(t)), markersize=4,
                **_LEVEL_STYLE.get(lv, {}))  # fmt: skip
        positive.append(y)
    if sakr and "sakr_flip_rate_bound" in t.columns:
        s = np.minimum(_col(t, "sakr_flip_rate_bound"), 1.0)
        if np.any(np.isfinite(s)):
            ax.plot(bits, s, label="Sakr et al. bound", **_SAKR_STYLE)
            positive.append(s)
    floor, allv = _plot_measured_flips(ax, bits, t, positive)
    ax.set_yscale("log")
    top = float(allv.max()) * 2 if allv.size else 1.0
    ax.set_ylim(floor / 1.5, min(1.5, top))
    ax.set_xticks(np.unique(bits))
    ax.set_xlabel("bits")
    ax.set_ylabel("flip rate")
    ax.set_title(_title(t, _KEYS), fontsize="small")
    if legend:
        ax.legend(fontsize="x-small", frameon=False)
    return ax


def plot_loss_vs_bits(
    table: Any,
    *,
    model: str | None = None,
    problem: str | None = None,
    layers: str | None = None,
    granularity: str | None = None,
    levels: Sequence[int] = (1, 2, 3),
    band: bool = True,
    linthresh: float = 0.1,
    legend: bool = True,
    ax: Axes | None = None,
) -> Axes:
    r"""Accuracy loss (percentage points) against bit-width, measured and predicted.

    Parameters
    ----------
    table : Comparison, DataFrame or path
    model, problem, layers, granularity : str, optional
        The cell series (see :func:`plot_flip_vs_bits`).
    levels : sequence of int, default (1, 2, 3)
    band : bool, default True
        Shade the level-3 95 % band of the loss of one realization.
    linthresh : float, default 0.1
        Linear range of the symmetric-log y axis, in percentage points: a measured loss
        can be negative (quantization may correct a few errors by chance).
    legend : bool, default True
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
    """
    if not linthresh > 0:
        raise ValueError(f"linthresh must be positive (percentage points), got {linthresh!r}")
    t = _select(_as_table(table), model=model, problem=problem, layers=layers,
                granularity=granularity)  # fmt: skip
    ax = _axes(ax)
    bits = t["bits"].to_numpy()
    pp = 100.0
    if band and 3 in levels:
        lo, hi = _level_col(t, 3, "accuracy_loss_low"), _level_col(t, 3, "accuracy_loss_high")
        if np.any(np.isfinite(hi)):
            ax.fill_between(bits, pp * lo, pp * hi, color=_LEVEL_STYLE[3]["color"], alpha=0.18,
                            lw=0, label="level 3: 95 % band, one realization")  # fmt: skip
    for lv in levels:
        y = _level_col(t, lv, "accuracy_loss")
        if np.all(~np.isfinite(y)):
            continue
        ax.plot(bits, pp * y, label=level_label(lv, _layers_of(t)), markersize=4,
                **_LEVEL_STYLE.get(lv, {}))  # fmt: skip
    m = _col(t, "measured_accuracy_loss")
    mlo = _col(t, "measured_accuracy_loss_low")
    mhi = _col(t, "measured_accuracy_loss_high")
    yerr = np.vstack([np.where(np.isfinite(mlo), m - mlo, 0.0),
                      np.where(np.isfinite(mhi), mhi - m, 0.0)])  # fmt: skip
    ax.errorbar(bits, pp * m, yerr=pp * yerr, capsize=2, elinewidth=0.8,
                label="measured (95 % CI)", **_MEASURED_STYLE)  # fmt: skip
    ax.axhline(0.0, color="0.6", lw=0.5)
    ax.set_yscale("symlog", linthresh=linthresh, linscale=0.5)
    lo, hi = ax.get_ylim()  # head room: markers at the edge of a log range hide in the spine
    ax.set_ylim(lo * 1.6 if lo < -linthresh else lo, hi * 1.6 if hi > linthresh else hi)
    ax.yaxis.set_major_formatter(_plain_formatter())
    ax.set_xticks(np.unique(bits))
    ax.set_xlabel("bits")
    ax.set_ylabel("accuracy loss (pp)")
    ax.set_title(_title(t, _KEYS), fontsize="small")
    if legend:
        ax.legend(fontsize="x-small", frameon=False)
    return ax


def plot_predicted_vs_measured(
    table: Any,
    ax: Axes | None = None,
    *,
    quantity: Literal["flip", "loss", "flip_rate", "accuracy_loss"] = "flip",
    levels: Sequence[int] = (1, 2, 3),
    layers: str | None = None,
    errorbars: bool | None = None,
    legend: bool = True,
) -> Axes:
    r"""Predicted against measured flip rate (or loss) of every cell, with the identity line.

    Parameters
    ----------
    table : Comparison, DataFrame or path
        Every row is one point per level (all models, problems, quantizers, bits).
    ax : matplotlib Axes, optional
    quantity : {"flip", "loss"}, default "flip"
        (Or ``"flip_rate"``, ``"accuracy_loss"``.) Flip rate on log--log axes (cells with a
        measured flip rate of 0 are left out: they have no place on a log axis), or accuracy
        loss in percentage points on symmetric-log axes (a measured loss can be negative).
    levels : sequence of int, default (1, 2, 3)
    layers : {"last", "all"}, optional
        Only these rows (default: all; the marker tells them apart: circles for the last
        layer, squares for all layers, whose levels 2-3 are the linearized model).
    errorbars : bool, optional
        Horizontal bars: the measurement's 95 % interval (default: for the flip rate only;
        the interval of an accuracy difference is wide and would hide the points).
    legend : bool, default True
        Outside the axes, on the right (inside, it would hide points: they fill the
        diagonal, and with several problems the corners too).

    Returns
    -------
    matplotlib Axes
        Dotted lines mark a factor of 2 either side of the identity.
    """
    col = _quantity(quantity)
    quantity = "flip" if col == "flip_rate" else "loss"
    t = _only_layers(_as_table(table), layers)
    if errorbars is None:
        errorbars = quantity == "flip"
    ax = _axes(ax, (3.6, 3.4))
    scale = 1.0 if quantity == "flip" else 100.0
    meas = scale * _col(t, f"measured_{col}")
    lo = scale * _col(t, f"measured_{col}_low")
    hi = scale * _col(t, f"measured_{col}_high")
    lay = _row_layers(t)
    vals = [meas]
    drawn = False
    for lv in levels:
        pred = scale * _level_col(t, lv, col)
        for lname, marker in (("last", "o"), ("all", "s")):
            keep = np.isfinite(pred) & np.isfinite(meas) & (lay == lname)
            if quantity == "flip":
                keep &= (pred > 0) & (meas > 0)
            if not keep.any():
                continue
            if errorbars:
                xerr = np.vstack([np.nan_to_num(meas[keep] - lo[keep]),
                                  np.nan_to_num(hi[keep] - meas[keep])])  # fmt: skip
                if quantity == "flip":  # a log axis cannot show a bar down to 0
                    xerr[0] = np.minimum(xerr[0], 0.9 * meas[keep])
                color = _LEVEL_STYLE.get(lv, {}).get("color")
                ax.errorbar(meas[keep], pred[keep], xerr=xerr, fmt="none", ecolor=color,
                            alpha=0.3, elinewidth=0.6)  # fmt: skip
            label = level_label(lv, lname)
            ax.scatter(meas[keep], pred[keep], s=12, marker=marker,
                       color=_LEVEL_STYLE.get(lv, {}).get("color"), label=label,
                       edgecolors="none", alpha=0.85)  # fmt: skip
            vals.append(pred[keep])
            drawn = True
    if drawn and (lay == "all").any() and (lay == "last").any():
        ax.scatter([], [], s=12, marker="o", color="0.5", label="(circles: last layer)")
        ax.scatter([], [], s=12, marker="s", color="0.5", label="(squares: all layers)")
    allv = np.concatenate(vals)
    allv = allv[np.isfinite(allv)]
    if quantity == "flip":
        allv = allv[allv > 0]
        lo_lim = float(allv.min()) / 2 if allv.size else 1e-4
        hi_lim = min(1.0, float(allv.max()) * 2) if allv.size else 1.0
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured flip rate")
        ax.set_ylabel("predicted flip rate")
    else:
        lo_lim = float(min(allv.min(), 0.0)) * 1.5 if allv.size else 0.0
        hi_lim = float(max(allv.max(), 0.2)) * 1.5 if allv.size else 1.0
        ax.set_xscale("symlog", linthresh=0.1, linscale=0.5)
        ax.set_yscale("symlog", linthresh=0.1, linscale=0.5)
        ax.xaxis.set_major_formatter(_plain_formatter())
        ax.yaxis.set_major_formatter(_plain_formatter())
        ax.set_xlabel("measured accuracy loss (pp)")
        ax.set_ylabel("predicted accuracy loss (pp)")
    # y = x is a straight line in display space: both axes share the transform
    ax.plot([lo_lim, hi_lim], [lo_lim, hi_lim], color="0.3", lw=0.8, label="identity")
    if quantity == "flip":
        ax.plot([lo_lim, hi_lim], [2 * lo_lim, 2 * hi_lim], color="0.6", lw=0.6, ls=":")
        ax.plot([lo_lim, hi_lim], [lo_lim / 2, hi_lim / 2], color="0.6", lw=0.6, ls=":")
    ax.set_xlim(lo_lim, hi_lim)
    ax.set_ylim(lo_lim, hi_lim)
    ax.set_box_aspect(1)
    if legend and drawn:
        ax.legend(*legend_entries([ax]), fontsize="x-small", frameon=False, loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # fmt: skip
    return ax


def plot_abs_error_vs_bits(
    table: Any,
    ax: Axes | None = None,
    *,
    quantity: Literal["flip", "loss", "flip_rate", "accuracy_loss"] = "flip",
    levels: Sequence[int] = (1, 2, 3),
    layers: str | None = None,
    sakr: bool = True,
    legend: bool = True,
) -> Axes:
    r"""Mean absolute error of each level's prediction against bit-width.

    The mean runs over every cell of that bit-width (models, problems, granularities). For
    the all-layer rows, levels 2 and 3 are their linearized model (``L2L``, ``L3L``); with
    ``layers=None`` and both layer sets in the table, each set gets its own lines.

    Parameters
    ----------
    table : Comparison, DataFrame or path
    ax : matplotlib Axes, optional
    quantity : {"flip", "loss"}, default "flip"
        Error of the flip rate or of the accuracy loss, in percentage points (also
        ``"flip_rate"``, ``"accuracy_loss"``).
    levels : sequence of int, default (1, 2, 3)
    layers : {"last", "all"}, optional
        Only these rows (default: all rows).
    sakr : bool, default True
        Also the error of the Sakr et al. bound (flip rate only; the bound clipped at 1).
    legend : bool, default True

    Returns
    -------
    matplotlib Axes
        Logarithmic y axis (percentage points).
    """
    q = _quantity(quantity)
    t = _as_table(table)
    t = _only_layers(t, layers)
    ax = _axes(ax)
    sets = list(dict.fromkeys(_row_layers(t)))
    cols = []
    for lv in levels:
        for lname in sets:
            style = _LEVEL_STYLE.get(lv, {})
            if lname == "all" and len(sets) > 1:  # both sets on one axes: all layers hollow
                style = {**style, "markerfacecolor": "none"}
            cols.append((lname, f"{level_prefix(lv, lname)}_{q}_abs_error",
                         level_label(lv, lname), style))  # fmt: skip
    if sakr and q == "flip_rate":
        cols.append((None, "sakr_flip_rate_abs_error", "Sakr et al. bound", _SAKR_STYLE))
    lay = _row_layers(t)
    for lname, col, label, style in cols:
        if col not in t.columns:
            continue
        rows = t if lname is None else t[lay == lname]
        mean = rows.groupby("bits")[col].mean().dropna()
        mean = mean[mean > 0]
        if mean.empty:
            continue
        ax.plot(mean.index, 100 * mean.to_numpy(), label=label, **{"markersize": 4, **style})
    ax.set_yscale("log")
    ax.set_xticks(np.unique(t["bits"]))
    ax.set_xlabel("bits")
    name = "flip rate" if q == "flip_rate" else "accuracy loss"
    # two lines: one would be longer than a short panel is high, and be cut at its ends
    ax.set_ylabel(f"mean |error| of the\n{name} (pp)")
    if legend:
        ax.legend(fontsize="x-small", frameon=False)
    return ax


def legend_entries(axes: Sequence[Axes]) -> tuple[list, list]:
    """Handles and labels of several Axes, each label once, measurement and levels in order.

    For one legend shared by several panels: ``fig.legend(*legend_entries(axes))``.
    """
    seen: dict[str, Any] = {}
    for ax in axes:
        for hnd, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, hnd)
    order = ["measured (", "measured", "level 1", "level 2: G", "level 3: e", "level 2: l",
             "level 3: l", "level 3: 9", "Sakr"]  # fmt: skip

    def rank(label: str) -> int:
        return next((i for i, p in enumerate(order) if label.startswith(p)), len(order))

    labels = sorted(seen, key=rank)  # stable: ties keep their order
    return [seen[lab] for lab in labels], labels


def _slug(*parts: Any) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(p)).strip("-") for p in parts)


def _save_predicted_vs_measured(
    t: pd.DataFrame, out: Path, panel_size: tuple[float, float], dpi: int
) -> Path:
    """``predicted_vs_measured.png``: every cell, flip rate and loss, one shared legend."""
    from matplotlib.figure import Figure

    w, h = panel_size
    fig = Figure(figsize=(2 * w * 0.9 + 2.2, h * 1.1), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    plot_predicted_vs_measured(t, a1, quantity="flip", legend=False)
    plot_predicted_vs_measured(t, a2, quantity="loss", legend=False)
    # one legend for both panels, outside them: inside, it would hide points
    fig.legend(*legend_entries([a1, a2]), loc="outside right upper", fontsize="x-small",
               frameon=False)  # fmt: skip
    path = out / "predicted_vs_measured.png"
    fig.savefig(path, dpi=dpi)
    return path


def save_comparison_figures(
    comparison: Any,
    out_dir: str | Path,
    *,
    dpi: int = 120,
    panel_size: tuple[float, float] = (4.0, 3.0),
) -> list[Path]:
    """Draw every comparison figure into ``out_dir`` as PNG files; return their paths.

    Parameters
    ----------
    comparison : Comparison, DataFrame or path
        The comparison (``distortion run`` passes its ``Comparison``).
    out_dir : path
        Created when missing.
    dpi : int, default 120
    panel_size : (float, float), default (4.0, 3.0)
        Size in inches of one panel.

    Returns
    -------
    list of Path
        ``flip_vs_bits_<model>_<problem>_<layers>.png`` and ``loss_vs_bits_...png`` (one
        panel per granularity), ``predicted_vs_measured.png`` (flip rate and loss) and
        ``abs_error_vs_bits.png`` (mean error of each level).
    """
    from matplotlib.figure import Figure

    t = _as_table(comparison)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if t.empty:
        return paths
    w, h = panel_size
    keys = [k for k in ("model", "problem", "layers") if k in t.columns]
    grans = list(dict.fromkeys(t["granularity"])) if "granularity" in t else [None]
    groups = t.groupby(keys, sort=False) if keys else [((), t)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        sel = dict(zip(keys, key, strict=True))
        present = [gr for gr in grans if gr is None or (g["granularity"] == gr).any()]
        for name, fn in (("flip_vs_bits", plot_flip_vs_bits), ("loss_vs_bits", plot_loss_vs_bits)):
            fig = Figure(figsize=(w * len(present) + 2.2, h), layout="constrained")
            axes = np.atleast_1d(fig.subplots(1, len(present), squeeze=False)).ravel()
            for ax, gr in zip(axes, present, strict=True):
                fn(g, granularity=gr, legend=False, ax=ax, **sel)
            fig.legend(*legend_entries(axes), loc="outside right upper", fontsize="x-small",
                       frameon=False)  # fmt: skip
            path = out / f"{name}_{_slug(*key)}.png"
            fig.savefig(path, dpi=dpi)
            paths.append(path)
    paths.append(_save_predicted_vs_measured(t, out, panel_size, dpi))
    fig = Figure(figsize=(2 * w + 2.2, h), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    plot_abs_error_vs_bits(t, a1, quantity="flip", legend=False)
    plot_abs_error_vs_bits(t, a2, quantity="loss", legend=False)
    fig.legend(*legend_entries([a1, a2]), loc="outside right upper", fontsize="x-small",
               frameon=False)  # fmt: skip
    path = out / "abs_error_vs_bits.png"
    fig.savefig(path, dpi=dpi)
    paths.append(path)
    return paths
