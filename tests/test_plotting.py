"""Figures of the predicted-vs-measured comparison render from a small synthetic table.

The table (``_comparison_data.synthetic_table``) has the schema of ``Comparison.table``; the
tests check what is drawn (the plotted data are the table's columns), the returned Axes, the
files written, and the errors for bad input.
"""

from __future__ import annotations

import subprocess
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _comparison_data import synthetic_table  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from distortion.plotting import compare as P  # noqa: E402

CELL = {"model": "resnet20", "problem": "10-class", "layers": "last", "granularity": "tensor"}


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return synthetic_table(seed=3)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _cell(table: pd.DataFrame, **keys) -> pd.DataFrame:
    t = table
    for k, v in {**CELL, **keys}.items():
        t = t[t[k] == v]
    return t.sort_values("bits")


def _line(ax: Axes, label_start: str):
    lines = [ln for ln in ax.get_lines() if str(ln.get_label()).startswith(label_start)]
    assert len(lines) == 1, [ln.get_label() for ln in ax.get_lines()]
    return lines[0]


def _errorbar_line(ax: Axes, label_start: str):
    found = [c for c in ax.containers if str(c.get_label()).startswith(label_start)]
    assert len(found) == 1, [c.get_label() for c in ax.containers]
    return found[0].lines[0]


def test_flip_vs_bits_draws_each_level_and_the_measurement(table):
    ax = P.plot_flip_vs_bits(table, **CELL)
    assert isinstance(ax, Axes)
    assert ax.get_yscale() == "log"
    t = _cell(table)
    for lv in (1, 2, 3):
        line = _line(ax, f"level {lv}:")
        np.testing.assert_array_equal(line.get_xdata(), t["bits"])
        np.testing.assert_allclose(line.get_ydata(), t[f"L{lv}_flip_rate"])
    sakr = _line(ax, "Sakr")
    np.testing.assert_allclose(sakr.get_ydata(), t["sakr_flip_rate_bound"])
    # the measured points with a positive rate are the errorbar's data line
    measured = _errorbar_line(ax, "measured (95")
    pos = t["measured_flip_rate"] > 0
    np.testing.assert_allclose(measured.get_ydata(), t.loc[pos, "measured_flip_rate"])
    # the synthetic table has no flip at 8 bits: a triangle on the bottom edge
    zero = _line(ax, "measured: no flip")
    np.testing.assert_array_equal(zero.get_xdata(), t.loc[~pos, "bits"])
    assert zero.get_ydata()[0] >= ax.get_ylim()[0]
    # the level-3 band is one filled polygon
    assert len(ax.collections) >= 1
    labels = ax.get_legend_handles_labels()[1]
    assert any(lab.startswith("level 3: 95 % band") for lab in labels)


def test_flip_vs_bits_all_layers_labels_and_missing_level(table):
    ax = P.plot_flip_vs_bits(table, **{**CELL, "layers": "all"})
    labels = [str(ln.get_label()) for ln in ax.get_lines()]
    assert not any(lab.startswith("level 1") for lab in labels)  # NaN for all layers
    assert P.ALL_LAYER_LABELS[2] in labels and P.ALL_LAYER_LABELS[3] in labels
    assert P.LEVEL_LABELS[3] not in labels
    # the all-layer rows' levels 2 and 3 are the L2L / L3L columns, and L3L has the band
    t = _cell(table, layers="all")
    np.testing.assert_allclose(_line(ax, P.ALL_LAYER_LABELS[2]).get_ydata(), t["L2L_flip_rate"])
    np.testing.assert_allclose(_line(ax, P.ALL_LAYER_LABELS[3]).get_ydata(), t["L3L_flip_rate"])
    assert any(c.get_label().startswith("level 3: 95") for c in ax.collections)


def test_level_prefix():
    assert [P.level_prefix(lv) for lv in (1, 2, 3)] == ["L1", "L2", "L3"]
    assert [P.level_prefix(lv, "all") for lv in (1, 2, 3)] == ["L1", "L2L", "L3L"]


def test_flip_vs_bits_uses_given_axes_and_options(table):
    fig, ax = plt.subplots()
    out = P.plot_flip_vs_bits(table, levels=(3,), band=False, sakr=False, legend=False,
                              ax=ax, **CELL)  # fmt: skip
    assert out is ax
    assert ax.get_legend() is None
    labels = [str(ln.get_label()) for ln in ax.get_lines()]
    assert not any(lab.startswith(("level 1", "level 2", "Sakr")) for lab in labels)
    assert len(ax.collections) == 0 or not any(
        c.get_label().startswith("level 3: 95") for c in ax.collections
    )


def test_flip_vs_bits_single_cell_table_needs_no_keys(table):
    ax = P.plot_flip_vs_bits(_cell(table))
    assert "resnet20" in ax.get_title() and "per tensor" in ax.get_title()


def test_loss_vs_bits_in_percentage_points(table):
    ax = P.plot_loss_vs_bits(table, **CELL)
    assert isinstance(ax, Axes)
    assert ax.get_yscale() == "symlog"
    t = _cell(table)
    np.testing.assert_allclose(_line(ax, "level 3:").get_ydata(), 100 * t["L3_accuracy_loss"])
    np.testing.assert_allclose(
        _errorbar_line(ax, "measured").get_ydata(), 100 * t["measured_accuracy_loss"]
    )


def test_predicted_vs_measured_flip_scatter_on_log_axes(table):
    ax = P.plot_predicted_vs_measured(table)
    assert isinstance(ax, Axes)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    ident = _line(ax, "identity")
    x, y = ident.get_xdata(), ident.get_ydata()
    np.testing.assert_allclose(x, y)
    # one point per (level, cell) with positive measured and predicted rates: levels 1-3 of
    # the last-layer rows, levels 2-3 (L2L, L3L) of the all-layer rows
    pred = ["L1", "L2", "L3", "L2L", "L3L"]
    measured = table["measured_flip_rate"] > 0
    expected = sum(int(((table[f"{c}_flip_rate"] > 0) & measured).sum()) for c in pred)
    from matplotlib.collections import PathCollection

    n_points = sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))
    assert n_points == expected
    lo, hi = ax.get_xlim()
    assert lo > 0 and hi <= 1.0


def test_predicted_vs_measured_loss_and_layer_filter(table):
    ax = P.plot_predicted_vs_measured(table, quantity="loss", layers="last")
    assert ax.get_xscale() == "symlog"
    from matplotlib.collections import PathCollection

    last = table[table["layers"] == "last"]
    expected = sum(int(last[f"L{lv}_accuracy_loss"].notna().sum()) for lv in (1, 2, 3))
    n_points = sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))
    assert n_points == expected


def test_abs_error_vs_bits_is_the_mean_over_cells(table):
    ax = P.plot_abs_error_vs_bits(table, layers="last")
    last = table[table["layers"] == "last"]
    expected = 100 * last.groupby("bits")["L1_flip_rate_abs_error"].mean()
    line = _line(ax, "level 1:")
    np.testing.assert_allclose(line.get_ydata(), expected.loc[line.get_xdata()])
    assert ax.get_yscale() == "log"


def test_accepts_comparison_and_csv(table, tmp_path):
    from distortion.experiments.compare import Comparison

    paths = Comparison(table).save(tmp_path)
    ax1 = P.plot_flip_vs_bits(Comparison(table), **CELL)
    ax2 = P.plot_flip_vs_bits(paths["csv"], **CELL)
    np.testing.assert_allclose(
        _line(ax1, "level 2:").get_ydata(), _line(ax2, "level 2:").get_ydata()
    )


def test_save_comparison_figures_writes_pngs(table, tmp_path):
    out = tmp_path / "figs"
    paths = P.save_comparison_figures(table, out)
    n_series = table.groupby(["model", "problem", "layers"]).ngroups
    assert len(paths) == 2 * n_series + 2
    assert len(set(paths)) == len(paths)
    for p in paths:
        assert p.parent == out and p.suffix == ".png"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 5000
    names = {p.name for p in paths}
    assert "flip_vs_bits_resnet20_cat-vs-dog_last.png" in names
    assert "predicted_vs_measured.png" in names
    # nothing is left open in pyplot: the figures are not pyplot figures
    assert plt.get_fignums() == []


def test_save_comparison_figures_empty_table(tmp_path):
    empty = synthetic_table().iloc[:0]
    assert P.save_comparison_figures(empty, tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "vgg"}, "no rows with model='vgg'"),
        ({"problem": "10-class", "layers": "last", "granularity": "tensor"}, "several model"),
        ({**CELL, "granularity": "row"}, "granularity in"),
    ],
)
def test_bad_selection_is_a_clear_error(table, kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.plot_flip_vs_bits(table, **kwargs)


def test_other_bad_input(table, tmp_path):
    with pytest.raises(ValueError, match="several rows per bit-width"):
        P.plot_flip_vs_bits(pd.concat([table, table.assign(scheme="asymmetric")]), **CELL)
    with pytest.raises(ValueError, match="lacks the column"):
        P.plot_flip_vs_bits(table.drop(columns="measured_flip_rate"), **CELL)
    with pytest.raises(ValueError, match="quantity must be"):
        P.plot_predicted_vs_measured(table, quantity="accuracy")
    with pytest.raises(ValueError, match="layers="):
        P.plot_abs_error_vs_bits(table, layers="first")
    with pytest.raises(ValueError, match="linthresh"):
        P.plot_loss_vs_bits(table, linthresh=0, **CELL)
    with pytest.raises(FileNotFoundError, match="distortion run"):
        P.plot_flip_vs_bits(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="table must be"):
        P.plot_flip_vs_bits([1, 2, 3])


def test_import_is_lazy():
    code = (
        "import sys, distortion.plotting.compare; "
        "assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- what a reader sees
def _drawn(fig):
    """Draw ``fig`` with Agg (the layout engine runs) and return its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _inside(inner, outer, tol: float = 0.5) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol
            and inner.x1 <= outer.x1 + tol and inner.y1 <= outer.y1 + tol)  # fmt: skip


def test_abs_error_vs_bits_y_labels_are_inside_the_figure(table):
    """Both panels of abs_error_vs_bits.png (4 x 3 in each): no y-label is cut at the edge
    (the accuracy-loss label, on one line, was longer than the panel is high)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.0), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    P.plot_abs_error_vs_bits(table, a1, quantity="flip")
    P.plot_abs_error_vs_bits(table, a2, quantity="loss", legend=False)
    renderer = _drawn(fig)
    for ax in (a1, a2):
        label = ax.yaxis.label.get_window_extent(renderer)
        assert _inside(label, fig.bbox), (ax.get_ylabel(), label, fig.bbox)


def test_abs_error_vs_bits_all_layers_are_the_linearized_levels(table):
    ax = P.plot_abs_error_vs_bits(table, layers="all")
    labels = {str(ln.get_label()) for ln in ax.get_lines()}
    assert {P.ALL_LAYER_LABELS[2], P.ALL_LAYER_LABELS[3]} <= labels
    assert not any(lab.startswith("level 1") for lab in labels)
    a = table[table["layers"] == "all"]
    expected = 100 * a.groupby("bits")["L3L_flip_rate_abs_error"].mean()
    line = _line(ax, P.ALL_LAYER_LABELS[3])
    np.testing.assert_allclose(line.get_ydata(), expected.loc[line.get_xdata()])


def test_predicted_vs_measured_legend_hides_no_point(table):
    """The legend of plot_predicted_vs_measured lies in the figure and covers no point."""
    from matplotlib.collections import PathCollection

    for quantity in ("flip", "loss"):
        ax = P.plot_predicted_vs_measured(table, quantity=quantity)
        fig = ax.figure
        renderer = _drawn(fig)
        box = ax.get_legend().get_window_extent(renderer)
        assert _inside(box, fig.bbox), quantity
        pts = np.concatenate([c.get_offset_transform().transform(c.get_offsets())
                              for c in ax.collections if isinstance(c, PathCollection)
                              and len(c.get_offsets())])  # fmt: skip
        covered = ((pts[:, 0] >= box.x0) & (pts[:, 0] <= box.x1)
                   & (pts[:, 1] >= box.y0) & (pts[:, 1] <= box.y1))  # fmt: skip
        assert not covered.any(), f"{quantity}: the legend covers {covered.sum()} points"
        plt.close(fig)


def _uniform_report_table() -> pd.DataFrame:
    rows = []
    for layer, shift in (("conv1", 0.0), ("layer1.0.conv1", 0.1), ("fc", 0.3)):
        for b, r in zip((2, 4, 8), (1.3 + shift, 1.1 + shift, 1.0 + shift / 10), strict=True):
            v = "holds" if abs(r - 1) <= 0.05 else "marginal" if abs(r - 1) <= 0.2 else "fails"
            rows.append({"layer": layer, "quantizer": "per_tensor", "bits": b, "verdict": v,
                         "second_moment_ratio": r})  # fmt: skip
    return pd.DataFrame(rows)


def test_uniform_verdict_heatmap_has_a_colour_key():
    from distortion.plotting.hypotheses import plot_uniform_verdicts

    ax = plot_uniform_verdicts(_uniform_report_table())
    others = [a for a in ax.figure.axes if a is not ax]
    assert len(others) == 1, "no colour bar beside the heatmap"
    _drawn(ax.figure)
    keys = [t.get_text() for t in others[0].get_yticklabels()]
    assert keys == ["holds", "marginal", "fails"]


def test_gaussian_effects_legend_names_the_threshold_boxes():
    from distortion.plotting.hypotheses import plot_gaussian_effects
    from distortion.stats import GaussianThresholds

    rng = np.random.default_rng(0)
    g = pd.DataFrame({"kind": ["feature"] * 50 + ["margin"] * 20,
                      "skewness": rng.normal(0.3, 0.3, 70),
                      "excess_kurtosis": rng.normal(0.5, 1.0, 70)})  # fmt: skip
    ax = plot_gaussian_effects(g)
    th = GaussianThresholds()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    holds = [lab for lab in labels if lab.startswith("holds")]
    fails = [lab for lab in labels if lab.startswith("fails")]
    assert len(holds) == 1 and f"{th.skewness[0]:g}" in holds[0], labels
    assert len(fails) == 1 and f"{th.excess_kurtosis[1]:g}" in fails[0], labels
