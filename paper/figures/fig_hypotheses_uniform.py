"""H_U on the network's weights: the second moment of the quantization error in units of
the uniform one, E[e^2] / (step^2/12), against bit-width, for every quantized layer (grey),
the last layer and all layers pooled; one panel per model and quantizer. Shaded: the
"holds" (±5 %) and "marginal" (±20 %) ranges of the verdict thresholds."""

from __future__ import annotations

from pathlib import Path

import _style


def make(results: Path, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from distortion.experiments.hypotheses import ALL_LAYERS
    from distortion.stats import UniformThresholds

    reports = _style.hypothesis_reports(results)
    if not reports:
        return _style.missing("H_U figure", results / "hypotheses")
    quantizers = list(dict.fromkeys(q for r in reports.values() for q in r.uniform["quantizer"]))
    th = UniformThresholds().second_moment
    nr, nc = len(reports), len(quantizers)
    fig, axes = plt.subplots(
        nr, nc, figsize=_style.figsize(1.0, 0.26 * nr + 0.08), squeeze=False, sharey=True
    )
    for i, (model, rep) in enumerate(reports.items()):
        u = rep.uniform
        last = rep.provenance.get("last_layer")
        for j, q in enumerate(quantizers):
            ax = axes[i, j]
            uq = u[u["quantizer"] == q]
            ax.axhspan(1 - th[1], 1 + th[1], color="0.93", lw=0)
            ax.axhspan(1 - th[0], 1 + th[0], color="0.82", lw=0)
            for layer, g in uq.groupby("layer", sort=False):
                g = g.sort_values("bits")
                if layer == ALL_LAYERS:
                    style = dict(color="C1", lw=1.4, ls="--", marker="s", label="all layers")
                elif layer == last:
                    style = dict(color="C0", lw=1.4, marker="o", label=f"last layer ({layer})")
                else:
                    style = dict(color="0.55", lw=0.5, label="one layer", zorder=1)
                ax.plot(g["bits"], g["second_moment_ratio"], **style)
            ax.set_xticks(sorted(uq["bits"].unique()))
            ax.set_title(f"{_style.pretty_model(model)}, {q.replace('_', ' ')}")
            ax.set_xlabel("bits" if i == nr - 1 else "")
            ax.set_ylabel(r"$E[e^2]\,/\,(\Delta^2/12)$" if j == 0 else "")
    from distortion.plotting.compare import legend_entries

    fig.legend(*legend_entries(axes.ravel()), loc="outside lower center", ncol=3)
    return [_style.save(fig, out, "hypotheses_uniform")]


if __name__ == "__main__":
    _style.main(make, __doc__)
