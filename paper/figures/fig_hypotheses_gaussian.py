"""H_G on the network's features: skewness against excess kurtosis of every penultimate
feature and every logit margin per class (one panel per model, with the verdict boxes), and
the Wasserstein distance to the normal of the standardized variables."""

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
        ax.legend(loc="upper left")
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
    for v, c in zip(th.wasserstein, ("#4daf4a", "#e41a1c"), strict=True):
        ax.axhline(v, color=c, lw=0.7, ls="--")
    ax.set_xticks(range(n), [_style.pretty_model(m) for m in reports])
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, None)
    ax.set_ylabel("Wasserstein distance $W_1$")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    return [_style.save(fig, out, "hypotheses_gaussian")]


if __name__ == "__main__":
    _style.main(make, __doc__)
