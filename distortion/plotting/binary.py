"""Figures of the two-class distortion theory (matplotlib imported inside the functions)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["plot_distortion_curve"]

_STYLE = {
    "taylor": {"marker": "o", "linestyle": "-"},
    "moment": {"marker": "s", "linestyle": "--"},
    "montecarlo": {"marker": "x", "linestyle": ":"},
    "actual": {"marker": "^", "linestyle": "none"},
}


def plot_distortion_curve(
    frame: Any,
    ax: Any = None,
    *,
    quantity: str = "distortion",
    show_spread: bool = False,
    methods: tuple[str, ...] | None = None,
) -> Any:
    r"""Distortion (or flip probability) against bit-width, one line per method.

    Parameters
    ----------
    frame : pandas.DataFrame
        ``DistortionCurve.to_frame()``: columns ``bits``, ``method``, ``distortion``,
        ``stderr``, ``spread``, ``flip_probability``, ``flip_stderr``.
    ax : matplotlib Axes, optional
        Axes to draw on; a new figure when None.
    quantity : {"distortion", "flip_probability"}, default "distortion"
        What to plot. Monte Carlo points get error bars of 2 standard errors.
    show_spread : bool, default False
        Shade :math:`D \pm` spread (eq. B12) of one realization around the Monte Carlo curve
        (or the first method when there is none).
    methods : tuple of str, optional
        Methods to draw (default: all in the frame, in order).

    Returns
    -------
    matplotlib.axes.Axes

    Notes
    -----
    The y axis is logarithmic when every plotted value is positive, otherwise symmetric-log
    with a linear range set by the smallest non-zero magnitude.
    """
    import matplotlib.pyplot as plt

    need = {"bits", "method", quantity}
    missing = need - set(frame.columns)
    if missing:
        raise ValueError(
            f"frame must be DistortionCurve.to_frame(); missing columns {sorted(missing)}"
        )
    if quantity not in ("distortion", "flip_probability"):
        raise ValueError(f"quantity must be 'distortion' or 'flip_probability', got {quantity!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2))
    present = list(dict.fromkeys(frame["method"]))
    methods = tuple(present if methods is None else methods)
    err_col = "stderr" if quantity == "distortion" else "flip_stderr"
    values = []
    for m in methods:
        sub = frame[frame["method"] == m].sort_values("bits")
        if sub.empty:
            raise ValueError(f"method {m!r} is not in the frame; it has {present}")
        y = sub[quantity].to_numpy(dtype=float)
        if np.all(np.isnan(y)):
            continue
        values.append(y[np.isfinite(y)])
        style = _STYLE.get(m, {"marker": ".", "linestyle": "-"})
        err = sub[err_col].to_numpy(dtype=float) if err_col in sub else None
        if err is not None and np.any(np.isfinite(err)):
            ax.errorbar(sub["bits"], y, yerr=2 * np.nan_to_num(err), label=m, capsize=2, **style)
        else:
            ax.plot(sub["bits"], y, label=m, **style)
    if show_spread and quantity == "distortion" and "spread" in frame:
        base = "montecarlo" if "montecarlo" in methods else methods[0]
        sub = frame[frame["method"] == base].sort_values("bits")
        y, sp = sub["distortion"].to_numpy(float), sub["spread"].to_numpy(float)
        ax.fill_between(sub["bits"], y - sp, y + sp, alpha=0.2, label=f"{base} ± spread")
        values.append(np.concatenate([y - sp, y + sp]))
    allv = np.concatenate(values) if values else np.array([1.0])
    allv = allv[np.isfinite(allv)]
    if allv.size and np.all(allv > 0):
        ax.set_yscale("log")
    elif allv.size:
        nz = np.abs(allv[allv != 0])
        ax.set_yscale("symlog", linthresh=float(nz.min()) if nz.size else 1.0)
    ax.set_xlabel("bits")
    ax.set_ylabel("distortion $D$" if quantity == "distortion" else "flip probability")
    ax.legend(frameon=False)
    return ax
