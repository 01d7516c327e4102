"""Predicted against measured flip rate (log axes) and accuracy loss (symmetric log), every
cell of the experiment, each level in its colour; circles: last layer, squares: all layers."""

from __future__ import annotations

from pathlib import Path

import _style


def make(results: Path, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from distortion.plotting.compare import plot_predicted_vs_measured

    table = _style.load_comparison(results)
    from distortion.plotting.compare import legend_entries

    fig, (a, b) = plt.subplots(1, 2, figsize=_style.figsize(1.0, 0.5))
    plot_predicted_vs_measured(table, a, quantity="flip", legend=False)
    plot_predicted_vs_measured(table, b, quantity="loss", legend=False)
    a.set_title("flip rate")
    b.set_title("accuracy loss")
    fig.legend(*legend_entries([a, b]), loc="outside lower center", ncol=3)
    return [_style.save(fig, out, "predicted_vs_measured")]


if __name__ == "__main__":
    _style.main(make, __doc__)
