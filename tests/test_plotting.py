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
        np.testing.assert_allclose(line.get_ydata(), t[f"L{lv}_flip"])
    sakr = _line(ax, "Sakr")
    np.testing.assert_allclose(sakr.get_ydata(), np.minimum(t["sakr_flip_bound"], 1.0))
    # the measured points with a positive rate are the errorbar's data line
    measured = _errorbar_line(ax, "measured (95")
    pos = t["measured_flip"] > 0
    np.testing.assert_allclose(measured.get_ydata(), t.loc[pos, "measured_flip"])
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
    np.testing.assert_allclose(_line(ax, "level 3:").get_ydata(), 100 * t["L3_loss"])
    np.testing.assert_allclose(_errorbar_line(ax, "measured").get_ydata(), 100 * t["measured_loss"])


def test_predicted_vs_measured_flip_scatter_on_log_axes(table):
    ax = P.plot_predicted_vs_measured(table)
    assert isinstance(ax, Axes)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    ident = _line(ax, "identity")
    x, y = ident.get_xdata(), ident.get_ydata()
    np.testing.assert_allclose(x, y)
    # one point per (level, cell) with positive measured and predicted rates
    expected = sum(
        int(((table[f"L{lv}_flip"] > 0) & (table["measured_flip"] > 0)).sum()) for lv in (1, 2, 3)
    )
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
    expected = sum(int(last[f"L{lv}_loss"].notna().sum()) for lv in (1, 2, 3))
    n_points = sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))
    assert n_points == expected


def test_abs_error_vs_bits_is_the_mean_over_cells(table):
    ax = P.plot_abs_error_vs_bits(table, layers="last")
    last = table[table["layers"] == "last"]
    expected = 100 * last.groupby("bits")["L1_flip_abs_error"].mean()
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
        P.plot_flip_vs_bits(table.drop(columns="measured_flip"), **CELL)
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
