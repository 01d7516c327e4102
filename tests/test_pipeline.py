"""End-to-end test of `distortion run` on a small configuration, and of its configuration."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from distortion.cli import main
from distortion.experiments.pipeline import ExperimentConfig

SMALL = """
name = "ci-small"
[data]
n = 1000
[models]
names = ["resnet20"]
[quantizer]
granularity = ["tensor", "channel"]
[last_layer]
bits = [3, 5, 8]
n_realizations = 100
[all_layers]
bits = [3, 5, 8]
n = 150
[hypotheses]
bits = [3, 5, 8]
"""


@pytest.fixture(scope="module")
def small_run(real_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    cfg = d / "small.toml"
    cfg.write_text(SMALL)
    out = d / "out"
    status = main(["run", "--config", str(cfg), "--out", str(out), "--cache-dir",
                   str(d / "cache"), "--quiet"])  # fmt: skip
    assert status == 0
    return out


@pytest.mark.real_data
@pytest.mark.slow
def test_small_run_outputs_schema_and_sanity(small_run):
    t = pd.read_csv(small_run / "comparison.csv")
    # 2 problems x 2 granularities x 3 bits (last layer) + 2 x 3 (all layers)
    assert len(t) == 12 + 6
    assert set(t["layers"]) == {"last", "all"}
    assert set(t["problem"]) == {"10-class", "cat-vs-dog"}
    ends = ("_flip_rate", "_flip_rate_low", "_flip_rate_high")
    rates = [c for c in t.columns if c.endswith(ends)]
    for c in rates:
        v = t[c].dropna()
        assert ((v >= 0) & (v <= 1)).all(), c
    last, every = t[t["layers"] == "last"], t[t["layers"] == "all"]
    for part, p in ((last, "L3"), (every, "L3L")):
        assert (part[f"{p}_flip_rate_low"] <= part[f"{p}_flip_rate_high"]).all()  # ordered
        # the band is of a count of flips: the mean rate lies within it, up to one image
        assert (part[f"{p}_flip_rate_low"] <= part[f"{p}_flip_rate"] + 1.0 / part["n_eval"]).all()
        assert (part[f"{p}_flip_rate"] <= part[f"{p}_flip_rate_high"] + 1.0 / part["n_eval"]).all()
    assert (t["measured_flip_rate_low"] <= t["measured_flip_rate"]).all()
    assert (t["measured_flip_rate"] <= t["measured_flip_rate_high"]).all()
    assert (t["measured_accuracy_loss_low"] <= t["measured_accuracy_loss"]).all()
    assert (t["measured_accuracy_loss"] <= t["measured_accuracy_loss_high"]).all()
    assert t["sakr_flip_rate_bound"].between(0, 1).all() and (t["hawq_v2"] >= 0).all()
    assert last[["L1_flip_rate", "L2_flip_rate", "L3_flip_rate"]].notna().all().all()
    assert last[["L2L_flip_rate", "L3L_flip_rate"]].isna().all().all()  # one meaning a prefix
    assert every[["L2L_flip_rate", "L3L_flip_rate"]].notna().all().all()
    assert every[["L1_flip_rate", "L2_flip_rate", "L3_flip_rate"]].isna().all().all()
    # more bits, fewer flips: the measured and predicted flip rates fall from 3 to 8 bits
    for (_, layers, _), g in t.groupby(["problem", "layers", "granularity"]):
        g = g.sort_values("bits")
        p = "L3" if layers == "last" else "L3L"
        assert g[f"{p}_flip_rate"].iloc[-1] < g[f"{p}_flip_rate"].iloc[0]
        assert g["measured_flip_rate"].iloc[-1] <= g["measured_flip_rate"].iloc[0]
    # float accuracy of ResNet-20 on the first 1000 images
    meta = json.loads((small_run / "run.json").read_text())
    assert 0.88 < meta["accuracies"]["resnet20"] < 0.96
    assert (small_run / "summary.txt").read_text().startswith("float accuracy: resnet20")
    assert (small_run / "hypotheses" / "resnet20" / "hypotheses_uniform.csv").is_file()
    s = pd.read_csv(small_run / "comparison_summary.csv")
    assert {"cells", "band_coverage", "L3_flip_rate_abs_error", "bits_min"} <= set(s.columns)
    assert list((small_run / "figures").glob("*.png"))
    # the verdicts behind the summary's H_U / H_G columns: shares in [0, 1], one row per cell
    v = pd.read_csv(small_run / "hypothesis_verdicts.csv")
    hu = v.dropna(subset=["H_U_fails"])
    assert set(hu["bits"]) == {3, 5, 8} and set(hu["layers"]) == {"last", "all"}
    assert hu[["H_U_fails", "H_U_marginal"]].stack().between(0, 1).all()
    assert (hu["H_U_fails"] + hu["H_U_marginal"] <= 1 + 1e-12).all()
    assert set(v["problem"].dropna()) == {"10-class", "cat-vs-dog"}
    assert "H_U fails" in (small_run / "summary.txt").read_text()


@pytest.mark.real_data
@pytest.mark.slow
def test_small_run_writes_a_column_dictionary_and_integer_bits(small_run):
    t = pd.read_csv(small_run / "comparison.csv")
    s = pd.read_csv(small_run / "comparison_summary.csv")
    v = pd.read_csv(small_run / "hypothesis_verdicts.csv")
    meta = json.loads((small_run / "run.json").read_text())
    # bit-widths are integers in the file (3, not 3.0); the H_G rows leave them empty
    raw = (small_run / "hypothesis_verdicts.csv").read_text()
    assert ",3.0," not in raw and ",3," in raw
    # the column dictionary names every column of every table the run wrote
    columns = (small_run / "columns.md").read_text()
    tables = {"hypothesis_verdicts.csv": v}
    from distortion.experiments import compare

    if hasattr(compare, "COLUMN_DICTIONARY"):  # the comparison columns are described there
        tables.update({"comparison.csv": t, "comparison_summary.csv": s})
    for name, table in tables.items():
        missing = [c for c in table.columns if f"| `{c}` |" not in columns]
        assert not missing, (name, missing)
    assert meta["runs"][0]["timings_s"] == meta["timings_s"] == meta["first_run"]["timings_s"]


@pytest.mark.real_data
@pytest.mark.slow
def test_rerun_uses_the_caches_and_compare_prints(small_run, capsys):
    cfg = small_run.parent / "small.toml"
    import time

    t0 = time.perf_counter()
    assert main(["run", "--config", str(cfg), "--out", str(small_run), "--cache-dir",
                 str(small_run.parent / "cache"), "--quiet", "--no-figures"]) == 0  # fmt: skip
    meta = json.loads((small_run / "run.json").read_text())
    extraction = [v for k, v in meta["timings_s"].items() if "extract" in k]
    assert extraction and extraction[0] < 5.0, meta["timings_s"]  # served from the cache
    # the cold run's timings are kept beside the rerun's
    assert len(meta["runs"]) >= 2 and meta["runs"][-1]["timings_s"] == meta["timings_s"]
    assert meta["first_run"] == meta["runs"][0] and "figures" in meta["first_run"]["timings_s"]
    assert time.perf_counter() - t0 < 600
    capsys.readouterr()
    assert main(["compare", str(small_run), "--layers", "last", "--problem", "cat-vs-dog"]) == 0
    out = capsys.readouterr().out
    assert "measured_flip_rate" in out and "cat-vs-dog" in out
    assert main(["compare", str(small_run), "--model", "resnet99"]) == 2
    assert "no cells with model='resnet99'" in capsys.readouterr().err


def test_config_defaults_match_the_default_file():
    from distortion.experiments.pipeline import DEFAULT_CONFIG

    cfg = ExperimentConfig.from_toml(DEFAULT_CONFIG)
    assert cfg.models == ("resnet20", "resnet56")
    assert cfg.last_layer_bits == tuple(range(2, 9))
    assert [p.name for p in cfg.problems] == ["10-class", "cat-vs-dog"]
    assert cfg.problems[1].classes == ("cat", "dog")
    assert cfg.granularity == ("tensor", "channel")
    assert len(cfg.quantizers(cfg.last_layer_bits)) == 14


def test_low_bits_config_is_the_default_with_the_section_16_terms():
    import dataclasses

    from distortion.experiments.pipeline import DEFAULT_CONFIG

    base = ExperimentConfig.from_toml(DEFAULT_CONFIG)
    low = ExperimentConfig.from_toml(DEFAULT_CONFIG.parent / "low_bits.toml")
    assert (low.all_layers_input_noise, low.all_layers_bias_correction) == (200, 1000)
    assert (base.all_layers_input_noise, base.all_layers_bias_correction) == (0, 0)
    assert (low.all_layers_smoothed, low.all_layers_smoothed_bits) == (16, (2, 3))
    assert (base.all_layers_smoothed, base.all_layers_smoothed_bits) == (0, None)
    assert (low.all_layers_dither, low.all_layers_dither_bits) == (40, (2, 3))
    assert (base.all_layers_dither, base.all_layers_dither_bits) == (0, None)
    differ = {"name", "source_file", "all_layers_input_noise", "all_layers_bias_correction",
              "all_layers_smoothed", "all_layers_smoothed_bits", "all_layers_dither",
              "all_layers_dither_bits"}  # fmt: skip
    for f in dataclasses.fields(ExperimentConfig):
        if f.name not in differ:
            assert getattr(low, f.name) == getattr(base, f.name), f.name


@pytest.mark.parametrize(
    "text,match",
    [
        ("[data]\nfit_fraction = 1.5", "fit_fraction"),
        ("[last_layer]\nbits = [0, 3]", "bit-widths in 1..16"),
        ("[models]\nnames = []", "at least one model"),
        ("[data]\nsourse = 'x'", r"unknown configuration key\(s\): data.sourse"),
        ("[quantizr]\nbits = 3", "unknown configuration key"),
        ("name = ", "not valid TOML"),
        ("stages = ['activation']", "stages names stages among"),
        ("[activations]\ngrid = ['W8A1']", "W\\+A cells like"),
        ("[activations]\nint8 = ['tensorrt']", "activations.int8 must be one of"),
        ("[activations]\nn = -1", "activations.n must be an integer >= 0"),
        ("[compression]\nfamilies = ['prune']", "compression.families must be one of"),
        ("[compression]\nmax_flip_rate = 0", "compression.max_flip_rate must be a number"),
        ("[all_layers]\nsmoothed_probes = 1", "all_layers.smoothed_probes must be 0"),
        ("[all_layers]\nsmoothed_bits = 3", "all_layers.smoothed_bits must be a list"),
        ("[all_layers]\ndither_bits = [0]", "all_layers.dither_bits"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        ExperimentConfig.from_toml(p)


def test_cli_reports_missing_config_and_failed_stage(tmp_path, capsys, monkeypatch):
    assert main(["run", "--config", str(tmp_path / "none.toml")]) == 2
    assert "no configuration file" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nsource = "nowhere/test.npz"\n[models]\nnames = ["resnet20"]\n')
    monkeypatch.setenv("DISTORTION_DATA", str(tmp_path))
    status = main(["run", "--config", str(cfg), "--out", str(tmp_path / "o"), "--quiet"])
    assert status == 1
    err = capsys.readouterr().err
    assert "stage 'load data' failed" in err and "--data" in err
    assert main(["run", "--weights", "resnet20", "--config", str(cfg)]) == 2
    assert "MODEL=FILE" in capsys.readouterr().err


def test_summary_table_formats_rates_in_points():
    from distortion.experiments.compare import Comparison
    from distortion.experiments.pipeline import summary_table

    t = pd.DataFrame({
        "model": ["m"] * 2, "problem": ["p"] * 2, "layers": ["last"] * 2,
        "granularity": ["tensor"] * 2, "bits": [3, 4], "L3_flip_rate_abs_error": [0.01, 0.03],
        "L1_flip_rate_abs_error": [np.nan, np.nan], "L3_flip_rate_in_band": [True, False],
    })  # fmt: skip
    text = summary_table(Comparison(t), {"m": 0.9}, split_bits=5)
    assert "m 90.00 %" in text and "2.00" in text and "50 %" in text and "3-4" in text
    assert "nan" not in text.lower()  # a level that does not apply is "-"
    assert np.isclose(Comparison(t).summary()["band_coverage"].iloc[0], 0.5)
    split = Comparison(t).summary(split_bits=4)
    assert split["bits_min"].tolist() == [3, 4] and split["bits_max"].tolist() == [3, 4]
    assert split["bits_min"].dtype.kind == "i"
    assert split["band_coverage"].tolist() == [1.0, 0.0]
    verdicts = pd.DataFrame([
        {"model": "m", "granularity": "tensor", "bits": b, "layers": "last", "problem": None,
         "H_U_fails": f, "H_U_marginal": 0.0, "H_U_layers": 1}
        for b, f in ((3, 1.0), (4, 0.0))
    ] + [{"model": "m", "layers": "last", "problem": "p", "H_G_margins_fail": 0.25,
          "H_G_margins": 4}])  # fmt: skip
    text = summary_table(Comparison(t), None, verdicts, split_bits=4)
    lines = text.splitlines()
    assert "H_U fails" in lines[0] and "H_G margins fail" in lines[0]
    assert "100 %" in lines[1]
    assert "25 %" in lines[1] and "0 %" in lines[2]


def test_run_json_keeps_the_cold_timings(tmp_path):
    from distortion.experiments.pipeline import _write_run_json

    path, cfg = tmp_path / "run.json", ExperimentConfig()
    _write_run_json(path, cfg, {"extract": 60.0}, {"resnet20": 0.9}, 0.0)
    _write_run_json(path, cfg, {"extract": 0.5}, {"resnet20": 0.9}, 100.0)
    meta = json.loads(path.read_text())
    assert meta["timings_s"] == {"extract": 0.5}  # the latest run
    assert meta["first_run"]["timings_s"] == {"extract": 60.0}  # the cold one, kept
    assert [r["timings_s"]["extract"] for r in meta["runs"]] == [60.0, 0.5]
    path.write_text(json.dumps({"timings_s": {"extract": 70.0}}))  # an older run.json
    _write_run_json(path, cfg, {"extract": 1.0}, {}, 0.0)
    assert json.loads(path.read_text())["first_run"]["timings_s"] == {"extract": 70.0}


def test_column_dictionary_lists_the_verdict_columns(tmp_path):
    from types import SimpleNamespace

    from distortion.experiments.hypotheses import ALL_LAYERS
    from distortion.experiments.pipeline import (
        Problem,
        hypothesis_verdicts,
        write_column_dictionary,
    )

    report = SimpleNamespace(
        uniform=pd.DataFrame({"layer": ["fc", "conv", ALL_LAYERS], "granularity": "tensor",
                              "bits": 4, "verdict": ["fails", "ok", "ok"]}),
        gaussian=pd.DataFrame({"kind": ["margin"], "class_name": ["cat"], "verdict": ["ok"]}),
        provenance={"last_layer": "fc"},
    )  # fmt: skip
    v = hypothesis_verdicts(report, "m", [Problem("10-class")])
    text = write_column_dictionary(tmp_path / "columns.md").read_text()
    assert not [c for c in v.columns if f"| `{c}` |" not in text]
    assert "## hypothesis_verdicts.csv" in text


def test_the_activations_config_parses():
    from distortion.experiments import _paths

    cfg = ExperimentConfig.from_toml(_paths.repo_root() / "experiments" / "activations.toml")
    assert cfg.stages == ("activations",) and cfg.activations_n == 2000
    assert cfg.activations_grid == ("W8A8", "W6A6", "W4A8", "W8A4", "W4A4")
    assert cfg.activations_int8 == ("x86",)
    assert ExperimentConfig().activations_n == 0  # the default run has no activation stage


@pytest.mark.real_data
@pytest.mark.slow
def test_activation_stage_runs_alone(real_data, tmp_path, capsys):
    cfg = tmp_path / "act.toml"
    cfg.write_text(
        'name = "act"\nstages = ["activations"]\n[data]\nn = 400\n[models]\n'
        'names = ["resnet20"]\n[activations]\nn = 60\ncalibration = 40\ngrid = ["W8A4"]\n'
        'granularity = ["tensor"]\nint8 = ["x86"]\n'
    )
    out = tmp_path / "out"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet", "--no-figures"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "activations (W+A, int8)" in printed and "W8A4 tensor" in printed
    t = pd.read_csv(out / "activations" / "activations.csv")
    import torch

    int8 = ["int8 x86"] if "x86" in torch.backends.quantized.supported_engines else []
    assert t["cell"].tolist() == [*int8, "W8A4 tensor"]
    assert (t["n"] == 60).all() and t["measured_flip_rate"].between(0, 1).all()
    assert (t["band_low"] <= t["band_high"]).all()
    assert not (out / "comparison.csv").exists()  # no weight-only stage ran
    assert (out / "activations" / "activations_split_resnet20_W8A4_tensor.json").is_file()


def test_the_compression_config_parses():
    from distortion.experiments import _paths
    from distortion.experiments.compare_compression import COMPRESSION_FAMILIES

    cfg = ExperimentConfig.from_toml(_paths.repo_root() / "experiments" / "compression.toml")
    assert cfg.stages == ("compression",) and cfg.compression_n == 500
    assert cfg.compression_families == COMPRESSION_FAMILIES


def _run_config(tmp_path, text: str):
    """`distortion run` on the configuration ``text``; returns its output folder."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    out = tmp_path / "out"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet"]) == 0  # fmt: skip
    return out


@pytest.mark.real_data
@pytest.mark.slow
def test_compression_stage_runs_alone(real_data, tmp_path, capsys):
    out = _run_config(
        tmp_path,
        'name = "comp"\nstages = ["compression"]\n[data]\nn = 400\n[models]\n'
        'names = ["resnet20"]\n[compression]\nn = 40\nfamilies = ["prune-filter", "nf4"]\n',
    )
    printed = capsys.readouterr().out
    assert "compression families" in printed and "prune-filter" in printed
    figs = {p.name for p in (out / "compression" / "figures").glob("*.png")}
    assert figs == {"flip_vs_error_energy_resnet20_all.png", "predicted_vs_measured.png",
                    "noise_energy_ratio_resnet20_all.png"}  # fmt: skip
    t = pd.read_csv(out / "compression" / "compression.csv")
    assert sorted(set(t["family"])) == ["nf4", "prune-filter"]
    assert len(t) == 5 + 1 and (t["n_eval"] == 40).all()
    assert t["measured_flip_rate"].between(0, 1).all()
    s = pd.read_csv(out / "compression" / "compression_summary.csv")
    assert set(s["family"]) == {"nf4", "prune-filter"}
    assert not (out / "comparison.csv").exists()


@pytest.mark.real_data
@pytest.mark.slow
def test_bias_corrected_all_layer_cells_beside_the_plain_ones(real_data, tmp_path, capsys):
    out = _run_config(
        tmp_path,
        'name = "bc"\nstages = ["all_layers"]\n[data]\nn = 400\n[models]\nnames = ["resnet20"]\n'
        '[quantizer]\ngranularity = ["tensor", "channel"]\n'
        "[all_layers]\nbits = [3, 6]\nn = 40\nbias_correction = 100\ninput_noise = 20\n"
        "smoothed_probes = 4\nsmoothed_bits = [3]\n",
    )
    printed = capsys.readouterr().out
    assert "bias-corrected" in printed
    summary = (out / "summary.txt").read_text()
    assert "L3I |err| pp" in summary and "L3I: L3L with" in summary
    t = pd.read_csv(out / "comparison.csv")
    assert len(t) == 8
    assert sorted(set(t["layers"])) == ["all", "all, bias-corrected"]
    bc = t[t["layers"] == "all, bias-corrected"]
    assert bc["bias_correction"].all() and not t.loc[t["layers"] == "all", "bias_correction"].any()
    # the corrected network is another network: its measurement differs somewhere
    plain = t[t["layers"] == "all"].set_index(["granularity", "bits"])
    corr = bc.set_index(["granularity", "bits"])
    assert (plain["measured_flip_rate"] != corr["measured_flip_rate"]).any()
    # level 3I beside 3L in both: more noise at 3 bits, the same to print precision at 6
    assert t["L3I_flip_rate"].notna().all()
    # level 3S only where asked: the plain (uncorrected) cells at 3 bits
    asked = (t["layers"] == "all") & (t["bits"] == 3)
    assert t.loc[asked, "L3S_flip_rate"].notna().all()
    assert t.loc[~asked, "L3S_flip_rate"].isna().all()
    assert "L3S: L3L moved" in summary and "L3S band" in summary
    three = t[t["bits"] == 3]
    assert (three["L3I_flip_rate"] >= three["L3L_flip_rate"] - 0.02).all()
    assert (out / "figures").is_dir() and any((out / "figures").glob("*.png"))
    s = pd.read_csv(out / "comparison_summary.csv")
    assert "all, bias-corrected" in set(s["layers"])
    # the L3I band's coverage beside L3L's, from the cells' own in-band flags
    assert "L3I band" in summary
    for _, row in s.iterrows():
        cells = t[(t["layers"] == row["layers"]) & (t["granularity"] == row["granularity"])
                  & t["bits"].between(row["bits_min"], row["bits_max"])]  # fmt: skip
        assert np.isclose(row["band_coverage_L3I"], cells["L3I_flip_rate_in_band"].mean())
    with pytest.raises(ValueError, match="all_layers.bias_correction"):
        ExperimentConfig(all_layers_bias_correction=-1)
