"""Figures of the compression study render from a small synthetic compression table: what is
drawn is the table's columns, in the order of the perturbation's size, and bad input is a
clear error."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from distortion.plotting import compression as PC  # noqa: E402


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for model in ("resnet20", "resnet56"):
        for family, strengths in (("prune-layer", (0.5, 0.1, 0.3)), ("svd-energy", (0.9, 0.99))):
            for s in strengths:  # not in the order of the error energy
                energy = (s if family == "prune-layer" else 1 - s) ** 2
                p3 = min(0.9, 2 * energy)
                rows.append({
                    "model": model, "layers": "all", "family": family, "strength": s,
                    "relative_error_energy": energy,
                    "measured_flip_rate": 0.0 if s == 0.1 else p3 * rng.uniform(0.5, 1.5),
                    "measured_flip_rate_low": 0.0, "measured_flip_rate_high": p3 * 1.8,
                    "L2L_flip_rate": p3 * rng.uniform(0.7, 1.3), "L3L_flip_rate": p3,
                    "L3L_flip_rate_low": p3 / 2, "L3L_flip_rate_high": 1.5 * p3,
                    "noise_energy_ratio": rng.uniform(0.5, 3.0), "bits": 0,
                    "measured_accuracy_loss": p3 / 4, "L2L_accuracy_loss": p3 / 5,
                    "L3L_accuracy_loss": p3 / 5,
                })  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _line(ax, start):
    lines = [ln for ln in ax.get_lines() if str(ln.get_label()).startswith(start)]
    assert len(lines) == 1, [ln.get_label() for ln in ax.get_lines()]
    return lines[0]


def test_flip_vs_error_energy_draws_the_levels_in_order_of_the_perturbation(table):
    ax = PC.plot_flip_vs_error_energy(table, "prune-layer", model="resnet20")
    want = table[(table.model == "resnet20") & (table.family == "prune-layer")]
    want = want.sort_values("relative_error_energy")
    for lv in (2, 3):
        line = _line(ax, f"{lv}L:")
        np.testing.assert_array_equal(line.get_xdata(), want["relative_error_energy"])
        np.testing.assert_array_equal(line.get_ydata(), want[f"L{lv}L_flip_rate"])
    # the measured points with a flip are error bars; the one with none is a triangle
    bars = [c for c in ax.containers if str(c.get_label()).startswith("measured")]
    assert len(bars) == 1
    m = want[want["measured_flip_rate"] > 0]
    np.testing.assert_array_equal(bars[0].lines[0].get_ydata(), m["measured_flip_rate"])
    tri = _line(ax, "measured: no flip")
    assert tri.get_xdata()[0] == want.loc[want["measured_flip_rate"] == 0,
                                          "relative_error_energy"].iloc[0]  # fmt: skip
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_title() == "resnet20, prune-layer"
    assert len(ax.collections) >= 1  # the band
    assert {t.get_text() for t in ax.texts} == {"0.1", "0.3", "0.5"}


def test_noise_energy_ratio_one_line_per_family(table):
    fig, ax = plt.subplots()
    assert PC.plot_noise_energy_ratio(table, model="resnet56", ax=ax) is ax
    g = table[(table.model == "resnet56") & (table.family == "svd-energy")]
    g = g.sort_values("relative_error_energy")
    np.testing.assert_array_equal(_line(ax, "svd-energy").get_ydata(), g["noise_energy_ratio"])
    _line(ax, "prune-layer")


def test_bad_input_is_a_clear_error(table, tmp_path):
    with pytest.raises(ValueError, match="several family values"):
        PC.plot_flip_vs_error_energy(table, model="resnet20")
    with pytest.raises(ValueError, match="several model values"):
        PC.plot_flip_vs_error_energy(table, "svd-energy")
    with pytest.raises(ValueError, match="no rows with family='kmeans'"):
        PC.plot_flip_vs_error_energy(table, "kmeans", model="resnet20")
    with pytest.raises(ValueError, match="lacks the column"):
        PC.plot_flip_vs_error_energy(table.drop(columns="L2L_flip_rate"), "svd-energy",
                                     model="resnet20")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="compression stage"):
        PC.plot_noise_energy_ratio(tmp_path / "none.csv")
    with pytest.raises(ValueError, match="table must be"):
        PC.plot_noise_energy_ratio([1, 2])
    two = pd.concat([table, table.assign(layers="last")])
    with pytest.raises(ValueError, match="several layer sets"):
        PC.plot_flip_vs_error_energy(two, "svd-energy", model="resnet20")


def test_save_compression_figures_one_panel_per_family(table, tmp_path):
    """What `distortion run`'s compression stage draws: per model the families' panels and
    the noise energy ratio, and every cell predicted against measured (the rounding figures,
    one row per bit-width, do not apply: every compression cell has bits 0)."""
    import matplotlib.image as mpimg

    paths = PC.save_compression_figures(table, tmp_path / "fig")
    names = sorted(p.name for p in paths)
    assert names == sorted([
        "flip_vs_error_energy_resnet20_all.png", "noise_energy_ratio_resnet20_all.png",
        "flip_vs_error_energy_resnet56_all.png", "noise_energy_ratio_resnet56_all.png",
        "predicted_vs_measured.png",
    ])  # fmt: skip
    for p in paths:
        assert mpimg.imread(p).shape[0] > 100
    assert PC.save_compression_figures(table.iloc[:0], tmp_path / "none") == []
