"""Style, sizes, input and output shared by the figure scripts (paths: ``_paths.py``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _paths

__all__ = [
    "figsize",
    "hypothesis_reports",
    "load_comparison",
    "main",
    "missing",
    "pretty_model",
    "save",
    "series_grid",
    "setup",
]


def setup() -> None:
    """Seaborn's paper style, then the committed ``paper/matplotlibrc`` on top of it."""
    import matplotlib

    matplotlib.use("agg")
    import seaborn as sns

    sns.set_theme(context="paper", style="ticks", palette="colorblind")
    matplotlib.rc_file(_paths.MATPLOTLIBRC)


def figsize(width: float = 1.0, height: float = 0.62) -> tuple[float, float]:
    """(width, height) in inches: ``width`` times the text width, ``height`` times that."""
    w = width * _paths.TEXT_WIDTH_IN
    return w, height * w


def load_comparison(results: Path) -> Any:
    """The comparison table of a results folder (a clear error when it is missing)."""
    import pandas as pd

    csv = results / "comparison.csv"
    if not csv.is_file():
        raise FileNotFoundError(
            f"no {csv}: run `distortion run` first (or pass --results DIR of a finished run)"
        )
    return pd.read_csv(csv)


def save(fig: Any, out: Path, name: str) -> Path:
    """Write ``<out>/<name>.pdf`` and close the figure."""
    import matplotlib.pyplot as plt

    path = out / f"{name}.pdf"
    fig.savefig(path, metadata={"CreationDate": None})
    plt.close(fig)
    return path


def missing(what: str, path: Path) -> list[Path]:
    """Report an input that this results folder does not have; draw nothing."""
    print(f"skipped: {what} (no {path})", file=sys.stderr)
    return []


def main(make: Callable[[Path, Path], list[Path]], description: str) -> None:
    """Command line of a figure script: ``--results DIR --out DIR``."""
    args = _paths.parse_args(description)
    setup()
    try:
        paths = make(_paths.results_dir(args.results), _paths.figures_dir(args.out))
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    for p in paths:
        print(p)


def pretty_model(name: str) -> str:
    """``resnet20`` -> ``ResNet-20`` (other names unchanged)."""
    import re

    m = re.fullmatch(r"resnet(\d+)", str(name))
    return f"ResNet-{m.group(1)}" if m else str(name)


def series_grid(
    table: Any, plot: Callable[..., Any], out: Path, name: str, *, quantity: str
) -> list[Path]:
    """One figure per granularity: rows = models, columns = (problem, layer set) series.

    ``plot`` is :func:`distortion.plotting.compare.plot_flip_vs_bits` or
    ``plot_loss_vs_bits``. The first granularity's figure is ``<name>.pdf``, the others
    ``<name>_<granularity>.pdf``.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    from distortion.plotting.compare import legend_entries

    models = list(dict.fromkeys(table["model"]))
    series = table[["problem", "layers"]].drop_duplicates()
    series = series.assign(_all=series["layers"] == "all").sort_values("_all", kind="stable")
    series = list(series[["problem", "layers"]].itertuples(index=False, name=None))
    paths = []
    for k, gran in enumerate(dict.fromkeys(table["granularity"])):
        nr, nc = len(models), len(series)
        fig, axes = plt.subplots(
            nr, nc, figsize=figsize(1.0, 0.27 * nr + 0.12), squeeze=False, sharex=True
        )
        for i, model in enumerate(models):
            for j, (problem, layers) in enumerate(series):
                ax = axes[i, j]
                sel = dict(model=model, problem=problem, layers=layers, granularity=gran)
                mask = np.logical_and.reduce([table[c] == v for c, v in sel.items()])
                if not mask.any():
                    ax.set_visible(False)
                    continue
                plot(table, legend=False, ax=ax, **sel)
                what = "last layer" if layers == "last" else "all layers"
                ax.set_title(f"{problem}, {what}" if i == 0 else "")
                ax.set_ylabel(f"{pretty_model(model)}\n{quantity}" if j == 0 else "")
                if i < nr - 1:
                    ax.set_xlabel("")
        handles, labels = legend_entries(axes.ravel())
        fig.legend(handles, labels, loc="outside lower center", ncol=3)
        paths.append(save(fig, out, name if k == 0 else f"{name}_{gran}"))
    return paths


def hypothesis_reports(results: Path) -> dict[str, Any]:
    """``{model: HypothesisReport}`` of ``<results>/hypotheses/<model>/`` (maybe empty)."""
    from distortion.experiments.hypotheses import HypothesisReport

    root = results / "hypotheses"
    if not root.is_dir():
        return {}
    dirs = sorted(d for d in root.iterdir() if (d / "hypotheses_gaussian.csv").is_file())
    # the order of the experiment's configuration, when run.json has it
    order = _run_config(results).get("models") or []
    dirs.sort(key=lambda d: order.index(d.name) if d.name in order else len(order))
    return {d.name: HypothesisReport.load(d) for d in dirs}


def _run_config(results: Path) -> dict[str, Any]:
    import json

    f = results / "run.json"
    if not f.is_file():
        return {}
    return json.loads(f.read_text()).get("config", {})
