"""The all-layer comparison for any compressor: every family runs, 2L is exact for the last
layer, no compression changes nothing, the table has its key columns, and the cache works."""

from __future__ import annotations

import numpy as np
import pytest

from distortion.compressors import (
    Compose,
    KMeansQuantizer,
    LowRank,
    MagnitudePruner,
    NonUniformQuantizer,
    ResidualExpansion,
)
from distortion.experiments import compare_compression as cc
from distortion.experiments.compare import KEY_COLUMNS, Comparison
from distortion.quantize import UniformQuantizer

torch = pytest.importorskip("torch")

from _array_data import ArrayData  # noqa: E402
from test_multilayer import tiny_net  # noqa: E402

LAYERS = ["conv1", "conv2", "conv3", "fc1", "fc2"]


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(1)
    net = tiny_net(seed=3, dtype=torch.float32)
    x = torch.randn(300, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    flip = torch.rand(300, generator=g) < 0.2  # some wrong labels: accuracy < 1
    return net, ArrayData(x, torch.where(flip, (y + 1) % 4, y))


def _run(tiny, configs, **kw):
    net, data = tiny
    kw.setdefault("n_realizations", 40)
    return cc.compare_compression(net, data, configs, model_name="tiny", progress=False, **kw)


# every family except 2:4 (the rows of conv1 and conv2 have 27 entries): all layers
FAMILIES = [
    ("prune-layer", 0.5, MagnitudePruner(0.5)),
    ("prune-global", 0.5, MagnitudePruner(0.5, scope="global")),
    ("prune-filter", 0.25, MagnitudePruner(0.25, pattern="filter")),
    ("svd-energy", 0.8, LowRank(energy=0.8)),
    ("kmeans", 8, KMeansQuantizer(8)),
    ("power", 4, NonUniformQuantizer(4, grid="power")),
    ("log2", 4, NonUniformQuantizer(4, grid="log2")),
    ("nf4", 4, NonUniformQuantizer(4, grid="nf4")),
    ("rex", 2, ResidualExpansion(3, order=2)),
    ("prune+uniform", 0.5, Compose(MagnitudePruner(0.5), UniformQuantizer(4))),
    ("uniform", 4, UniformQuantizer(4, granularity="channel")),
]


def test_every_family_runs_and_the_table_has_its_columns(tiny):
    res = _run(tiny, FAMILIES)
    t = res.table
    assert isinstance(res, Comparison) and len(t) == len(FAMILIES)
    for c in (*KEY_COLUMNS, "family", "strength", *cc.COMPRESSION_COLUMNS):
        assert c in t.columns, c
    assert t["bits"].dtype.kind == "i"
    assert list(t["family"]) == [f for f, _, _ in FAMILIES]
    assert (t["layers"] == "all").all() and (t["n_classes"] == 4).all()
    for col in ("measured_flip_rate", "L2L_flip_rate", "L3L_flip_rate", "noise_check"):
        assert np.all(np.isfinite(t[col].astype(float))), col
    assert t["L3L_flip_rate_low"].notna().all()  # the Grams hold realizations: a band
    by = t.set_index("family")
    assert by.loc["prune-layer", "bits"] == 0 and by.loc["prune-layer", "scheme"] == "unstructured"
    assert by.loc["kmeans", "bits"] == 3 and by.loc["nf4", "scheme"] == "nf4"
    assert by.loc["prune+uniform", "bits"] == 4
    assert by.loc["prune+uniform", "scheme"] == "unstructured+symmetric"
    assert not by.loc["prune-layer", "error_model_random"]
    assert by.loc["uniform", "error_model_random"]
    # pruning half the weights perturbs more than 4-bit rounding does
    energy = by["relative_error_energy"]
    assert energy["prune-layer"] > energy["uniform"]
    s = cc.compression_summary(res, max_flip_rate=1.0)
    assert len(s) == len(FAMILIES) and (s["cells_used"] == 1).all()
    for c in ("band_coverage", "L2L_flip_rate_abs_error", "L3L_flip_rate_abs_error",
              "breaks_at", "noise_breaks_at", "linear_breaks_at"):  # fmt: skip
        assert c in s.columns


def test_two_four_on_the_layers_it_fits_the_others_float(tiny):
    nm = MagnitudePruner(None, pattern="n:m")
    res = _run(tiny, [("2:4", 0.5, {k: nm for k in ("conv3", "fc1", "fc2")})])
    row = res.table.iloc[0]
    assert row["scheme"] == "2:4" and row["strength"] == 0.5
    assert 0 < row["relative_error_energy"] < 1


def test_global_pruning_ranks_all_layers_jointly(tiny):
    net, _ = tiny
    w = {k: net.get_submodule(k).weight.detach() for k in LAYERS}
    comp = cc.compress_layers(MagnitudePruner(0.6, scope="global"), w)
    pruned = sum(int(np.sum(c.detail.pruned)) for c in comp.values())
    total = sum(c.detail.pruned.size for c in comp.values())
    assert pruned == round(0.6 * total)
    per_layer = [c.detail.sparsity for c in comp.values()]
    assert max(per_layer) - min(per_layer) > 0.05  # not the per-layer 60 %


@pytest.mark.parametrize(
    "comp",
    [
        MagnitudePruner(0.5),
        LowRank(rank=2),
        KMeansQuantizer(4),
        UniformQuantizer(3),
        NonUniformQuantizer(3, grid="log2"),
    ],  # fmt: skip
    ids=repr,
)
def test_level_2l_is_the_measurement_for_the_last_layer(tiny, comp):
    # the logits are affine in the last layer's weight: the linearization is exact
    res = _run(tiny, [("x", 0.0, comp)], layers="last")
    row = res.table.iloc[0]
    assert row["layers"] == "last"
    assert row["measured_flip_rate"] > 0  # something to predict
    assert row["L2L_flip_rate"] == row["measured_flip_rate"]
    assert row["L2L_accuracy_loss"] == pytest.approx(row["measured_accuracy_loss"], abs=1e-12)
    assert row["L2L_flip_rate_abs_error"] == 0.0


def test_no_pruning_changes_nothing(tiny):
    res = _run(
        tiny,
        [("prune-layer", 0.0, MagnitudePruner(0.0)),
         ("prune-global", 0.0, MagnitudePruner(0.0, scope="global"))],
    )  # fmt: skip
    t = res.table
    for col in ("measured_flip_rate", "L2L_flip_rate", "L3L_flip_rate", "measured_accuracy_loss",
                "L2L_accuracy_loss", "relative_error_energy", "noise_check"):  # fmt: skip
        assert np.all(t[col].to_numpy(dtype=float) == 0.0), col
    assert t["L3L_accuracy_loss"].abs().max() < 1e-12
    assert t["L3L_flip_rate_in_band"].all() and t["noise_in_band"].all()


def test_dither_acts_like_noise(tiny):
    # subtractive dither: the error is exactly uniform and independent of everything, so the
    # first-order margin energy matches the model's up to one realization's fluctuation
    res = _run(tiny, [("dither", 3, UniformQuantizer(3, rounding="dither"))], seed=5)
    rho = float(res.table["noise_energy_ratio"].iloc[0])
    assert 0.5 < rho < 2.0


def test_measurements_are_cached(tiny, tmp_path, monkeypatch):
    configs = [("prune-layer", 0.3, MagnitudePruner(0.3)), ("svd", 0.9, LowRank(energy=0.9))]
    first = _run(tiny, configs, cache_dir=tmp_path)
    assert len(list((tmp_path / "measurements").glob("*.json"))) == 2
    assert len(list((tmp_path / "grams").iterdir())) >= 1

    def refuse(*a, **k):
        raise AssertionError("the measurement should come from the cache")

    monkeypatch.setattr(cc, "compressed_model", refuse)
    second = _run(tiny, configs, cache_dir=tmp_path)
    cols = ["measured_flip_rate", "measured_accuracy_loss", "L2L_flip_rate", "L3L_flip_rate"]
    np.testing.assert_array_equal(first.table[cols].to_numpy(), second.table[cols].to_numpy())
    # another compressor is not served from the cache
    with pytest.raises(AssertionError, match="from the cache"):
        _run(tiny, [("prune-layer", 0.4, MagnitudePruner(0.4))], cache_dir=tmp_path)


def test_bad_configurations_are_refused(tiny):
    with pytest.raises(ValueError, match="tuple"):
        _run(tiny, [MagnitudePruner(0.5)])
    with pytest.raises(ValueError, match="not a compressor"):
        _run(tiny, [("x", 0.0, object())])
    net, _ = tiny
    w = {k: net.get_submodule(k).weight.detach() for k in LAYERS}
    with pytest.raises(ValueError, match="no layer"):
        cc.compress_layers({"nope": MagnitudePruner(0.5)}, w)


def test_measure_compressed_matches_measure_for_a_quantizer(tiny):
    from distortion.experiments.measure import measure

    net, data = tiny
    q = UniformQuantizer(3)
    w = {k: net.get_submodule(k).weight.detach() for k in LAYERS}
    m1 = cc.measure_compressed(net, data, cc.compress_layers(q, w), progress=False)
    m2 = measure(net, data, q, layers=LAYERS, progress=False)
    assert m1.flip_rate == m2.flip_rate and m1.accuracy_loss == m2.accuracy_loss
    assert m1.flip_rate_interval == m2.flip_rate_interval


@pytest.mark.parametrize("comp", [MagnitudePruner(0.5, pattern="filter"), LowRank(energy=0.6)])
def test_bias_corrected_linearization_is_exact_for_the_last_layer(tiny, comp):
    # the corrected bias b - (W~ - W) u_bar is affine in the weight too: 2L stays exact
    from distortion.experiments.bias_correction import input_means

    net, data = tiny
    means = input_means(net, data, layers="last", progress=False)
    res = _run(tiny, [("x", 0.0, comp)], layers="last", bias_correction=means)
    plain = _run(tiny, [("x", 0.0, comp)], layers="last")
    row = res.table.iloc[0]
    assert row["layers"] == "last, bias-corrected"
    assert row["measured_flip_rate"] > 0
    assert row["L2L_flip_rate"] == row["measured_flip_rate"]
    assert row["measured_flip_rate"] != plain.table.iloc[0]["measured_flip_rate"]
