"""H_G on the network's features: skewness against excess kurtosis of every penultimate
feature and every logit margin per class (one panel per model, with the verdict boxes: inside
the green one both effects are small enough for "holds", outside the red one the variable
"fails"), and the Wasserstein distance to the normal of the standardized variables (dashed:
its "holds" and "fails" thresholds). The legend below the panels names the boxes and lines."""

from __future__ import annotations

from pathlib import Path

import _style


def make(results: Path, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from distortion.plotting.hypotheses import plot_gaussian_effects
    from distortion.stats import GaussianThresholds

    reports = _style.hypothesis_reports(results)
    if not reports:
        return _style.missing("H_G figure", results / "hypotheses")
    n = len(reports)
    fig, axes = plt.subplots(1, n + 1, figsize=_style.figsize(1.0, 0.3), squeeze=False)
    for ax, (model, rep) in zip(axes[0], reports.items(), strict=False):
        plot_gaussian_effects(rep.gaussian, ax=ax)
        ax.set_title(_style.pretty_model(model))
        ax.get_legend().remove()  # one legend for the figure, below the panels
    th = GaussianThresholds()
    ax = axes[0, n]
    kinds = sorted({k for r in reports.values() for k in r.gaussian["kind"].unique()})
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        data = [r.gaussian.loc[r.gaussian["kind"] == kind, "wasserstein"].dropna().to_numpy()
                for r in reports.values()]  # fmt: skip
        pos = [i - 0.4 + width * (j + 0.5) for i in range(n)]
        bp = ax.boxplot(data, positions=pos, widths=0.8 * width, patch_artist=True,
                        flierprops={"markersize": 1.5}, medianprops={"color": "k"})  # fmt: skip
        for box in bp["boxes"]:
            box.set(facecolor=f"C{j}", linewidth=0.6)
        ax.plot([], [], "s", color=f"C{j}", label=kind)
    for v, c, what in zip(th.wasserstein, ("#4daf4a", "#e41a1c"), ("holds", "fails"),
                          strict=True):  # fmt: skip
        ax.axhline(v, color=c, lw=0.7, ls="--", label=f"$W_1$ {what} threshold ({v:g})")
    ax.set_xticks(range(n), [_style.pretty_model(m) for m in reports])
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, None)
    ax.set_ylabel("$W_1$ to $N(0, 1)$")
    # one legend: the kinds (same colours in every panel) and the W_1 thresholds of this
    # panel, then the verdict boxes of the scatter panels
    handles, labels = ax.get_legend_handles_labels()
    for h, lab in zip(*axes[0, 0].get_legend_handles_labels(), strict=True):
        if lab.startswith(("holds", "fails")):
            handles.append(h)
            labels.append(f"$G_1$, $G_2$: {lab}")
    fig.legend(handles, labels, loc="outside lower center", ncol=3)
    return [_style.save(fig, out, "hypotheses_gaussian")]


if __name__ == "__main__":
    _style.main(make, __doc__)
