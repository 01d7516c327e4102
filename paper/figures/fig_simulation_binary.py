"""Numerical check of the two-class closed forms (``experiments/simulation_binary.py``):
relative error, against the Monte Carlo that is exact under H_G and H_U (eq. B16-B17), of
the Taylor distortion (eq. B9), the moment-matched distortion (eq. B11) and the closed flip
probability (eq. B14), against bit-width: median over the synthetic cases and 10-90 %
range, isotropic and spiked covariances apart."""

from __future__ import annotations

from pathlib import Path

import _paths
import _style

METHODS = {
    "rel_taylor": ("Taylor (B9)", "C0", "o"),
    "rel_moment": ("moment matching (B11)", "C1", "s"),
    "rel_flip": ("flip probability (B14)", "C2", "^"),
}


def make(results: Path, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    csv = _paths.simulation_table(results)
    if not csv.is_file():
        return _style.missing("simulation figure", csv)
    t = pd.read_csv(csv)
    covs = list(dict.fromkeys(t["covariance"]))
    fig, axes = plt.subplots(
        1, len(covs), figsize=_style.figsize(1.0, 0.36), squeeze=False, sharey=True
    )
    for ax, cov in zip(axes[0], covs, strict=True):
        tc = t[t["covariance"] == cov]
        for col, (label, color, marker) in METHODS.items():
            if col not in tc:
                continue
            g = tc.assign(err=tc[col].abs()).groupby("bits")["err"]
            q = g.quantile([0.1, 0.5, 0.9]).unstack()
            floor = 1e-5  # relative errors below this are Monte Carlo noise
            q = q.clip(lower=floor)
            ax.fill_between(q.index, q[0.1], q[0.9], color=color, alpha=0.15, lw=0)
            ax.plot(q.index, q[0.5], color=color, marker=marker, label=label)
        ax.axhline(0.05, color="0.4", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xticks(np.unique(tc["bits"]))
        ax.set_xlabel("bits")
        n_cases = tc.groupby(["d", "separation", "weights"]).ngroups
        ax.set_title(f"{cov} covariances ({n_cases} cases)")
    axes[0, 0].set_ylabel("|relative error| vs Monte Carlo")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3)
    return [_style.save(fig, out, "simulation_binary")]


if __name__ == "__main__":
    _style.main(make, __doc__)
