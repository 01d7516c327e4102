"""Mean absolute error of each level's flip-rate prediction (and of Sakr's bound) against
bit-width, averaged over models, problems and granularities: last layer (levels 1-3) and all
layers (levels 2-3: the linearized model, columns L2L and L3L)."""

from __future__ import annotations

from pathlib import Path

import _style


def make(results: Path, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from distortion.plotting.compare import legend_entries, plot_abs_error_vs_bits

    table = _style.load_comparison(results)
    sets = [s for s in ("last", "all") if (table["layers"] == s).any()]
    fig, axes = plt.subplots(1, len(sets), figsize=_style.figsize(1.0, 0.4), squeeze=False)
    for i, (ax, s) in enumerate(zip(axes[0], sets, strict=True)):
        plot_abs_error_vs_bits(table, ax, quantity="flip", layers=s, legend=False)
        ax.set_title("last layer" if s == "last" else "all layers")
        if i:
            ax.set_ylabel("")
    # one legend for both panels (the all-layer levels have their own labels), below them
    fig.legend(*legend_entries(axes[0]), loc="outside lower center", ncol=3)
    return [_style.save(fig, out, "abs_error_vs_bits")]


if __name__ == "__main__":
    _style.main(make, __doc__)
