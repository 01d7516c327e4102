"""The experiment configuration is checked as a whole before the first stage.

Every broken file must fail at once (no data, no model loaded) with a message naming its
key, through the API (ValueError) and through ``distortion run`` (one line, status 2).
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from distortion.cli import main
from distortion.experiments.pipeline import ExperimentConfig, Problem

BROKEN = [
    ('[models]\nnames = ["resnet21"]', "models.names: unknown model 'resnet21'"),
    ('[models]\nnames = "resnet20"', "models.names must be a list"),
    ('[models]\nnames = ["resnet20", "resnet20"]', "models.names repeats"),
    ('[quantizer]\nscheme = "asymetric"', "quantizer.scheme must be one of"),
    ('[quantizer]\nclipping = "minmax"', "quantizer.clipping must be one of"),
    ('[quantizer]\nrounding = "floor"', "quantizer.rounding must be one of"),
    ('[quantizer]\ngranularity = ["tensor", "layer"]', "quantizer.granularity must be one of"),
    ("[quantizer]\ngranularity = []", "quantizer.granularity is empty"),
    ('[last_layer]\ncovariance = "full"', "last_layer.covariance must be one of"),
    ("[last_layer]\nbits = 4", "last_layer.bits must be a list"),
    ("[last_layer]\nbits = []", "last_layer.bits is empty"),
    ("[last_layer]\nbits = [4.5]", "last_layer.bits must hold integer bit-widths"),
    ("[all_layers]\nbits = []", "all_layers.bits is empty"),
    ("[hypotheses]\nbits = [2, 17]", "hypotheses.bits must hold integer bit-widths"),
    ("[hypotheses]\nn_components = 0", "hypotheses.n_components must be an integer >= 1"),
    ("[last_layer]\nn_realizations = 4.7", "last_layer.n_realizations must be an integer"),
    ("[last_layer]\nn_realizations = 5", "needs at least 39 realizations"),
    ("[all_layers]\nn = -1", "all_layers.n must be an integer >= 0"),
    ("[all_layers]\nn = 2.5", "all_layers.n must be an integer"),
    ("[data]\nn = 10", "data.n must be an integer >= 20"),
    ("[data]\nn = true", "data.n must be an integer"),
    ('[data]\nseed = "0"', "data.seed must be an integer"),
    ('[data]\nfit_fraction = "half"', "data.fit_fraction must be a number"),
    ("[data]\nsource = 3", "data.source must be a non-empty string"),
    ("name = 3", "name must be a non-empty string"),
    ('name = "../x"', "plain folder name"),
    (
        '[last_layer]\nproblems = [{ name = "x", classes = ["cat", "dgo"] }]',
        r"last_layer.problems 'x': unknown class name\(s\) \['dgo'\]",
    ),
    ('[last_layer]\nproblems = [{ name = "x", classes = ["cat"] }]', "at least two distinct"),
    ('[last_layer]\nproblems = [{ name = "x", clases = ["cat", "dog"] }]', "unknown key"),
    ('[last_layer]\nproblems = [{ name = "a" }, { name = "a" }]', "repeats a problem name"),
    ("[last_layer]\nproblems = []", "last_layer.problems is empty"),
    ("models = 3", r"\[models\] must be a table"),
    ("[quantizer]\nbits = 3", r"quantizer.bits; known keys of \[quantizer\]: scheme"),
    ("[quantizr]\nbits = 3", "unknown configuration key.*quantizr.*known top-level keys"),
]


@pytest.mark.parametrize("text,match", BROKEN)
def test_broken_config_fails_at_once_naming_the_key(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        ExperimentConfig.from_toml(p)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "text,key",
    [
        ('[models]\nnames = ["resnet21"]', "models.names"),
        ("[last_layer]\nbits = 4", "last_layer.bits"),
        ('[quantizer]\nscheme = "asymetric"', "quantizer.scheme"),
        ('[last_layer]\nproblems = [{ name = "x", classes = ["cat", "dgo"] }]', "dgo"),
        ("[hypotheses]\nn_components = 0", "hypotheses.n_components"),
    ],
)
def test_cli_rejects_a_broken_config_before_any_stage(tmp_path, capsys, text, key):
    p = tmp_path / "bad.toml"
    p.write_text(text + "\n")
    t0 = time.perf_counter()
    status = main(["run", "--config", str(p), "--out", str(tmp_path / "o"), "--quiet"])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert status == 2
    assert key in err and "Traceback" not in err and "[1/" not in err  # no stage started
    assert elapsed < 1.0
    assert not (tmp_path / "o").exists()


def test_good_values_are_kept_and_normalized():
    cfg = ExperimentConfig.from_dict(
        {
            "data": {"n": 0, "fit_fraction": 1 / 3},
            "models": {"names": ["resnet20"]},
            "quantizer": {"granularity": "channel", "scheme": "asymmetric"},
            "last_layer": {"bits": [2, 4], "n_realizations": 39,
                           "problems": [{"name": "cd", "classes": ["cat", "dog"]}]},
            "all_layers": {"n": 0},
        }
    )  # fmt: skip
    assert cfg.n is None and cfg.models == ("resnet20",) and cfg.granularity == ("channel",)
    assert cfg.last_layer_bits == (2, 4) and cfg.problems == (Problem("cd", ("cat", "dog")),)
    assert cfg.all_layers_n == 0


def test_api_construction_is_checked_too():
    with pytest.raises(ValueError, match="models.names must be a list"):
        ExperimentConfig(models="resnet20")
    with pytest.raises(ValueError, match="last_layer.bits must be a list"):
        ExperimentConfig(last_layer_bits=4)
    with pytest.raises(ValueError, match="quantizer.rounding"):
        ExperimentConfig(rounding="up")
    cfg = ExperimentConfig(models=["resnet20"], last_layer_bits=[np.int64(3)])
    assert cfg.models == ("resnet20",) and cfg.last_layer_bits == (3,)


def test_hypothesis_stage_tests_the_configured_quantizers():
    cfg = ExperimentConfig(scheme="asymmetric", clipping="mse", rounding="stochastic",
                           granularity=("channel",))  # fmt: skip
    qs = cfg.hypothesis_quantizers()
    assert list(qs) == ["per_channel"]
    q = qs["per_channel"]
    assert (q.scheme, q.granularity, q.clipping, q.rounding) == (
        "asymmetric", "channel", "mse", "stochastic",
    )  # fmt: skip


@pytest.mark.real_data
def test_run_passes_the_quantizer_section_to_the_hypothesis_stage(real_data, tmp_path, monkeypatch):
    """The hypothesis tests get the config's scheme, clipping, rounding and granularities."""
    import distortion.experiments.hypotheses as hyp
    from distortion.experiments.pipeline import StageError, run_experiment

    seen = {}

    class Stop(Exception):
        pass

    def fake(fs, model, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(hyp, "run_hypothesis_tests", fake)
    cfg = ExperimentConfig(n=20, models=("resnet20",), scheme="asymmetric", clipping="mse",
                           granularity=("channel",), n_realizations=39)  # fmt: skip
    with pytest.raises(StageError, match="hypothesis tests"):
        run_experiment(cfg, out_dir=tmp_path / "o", cache_dir=tmp_path / "c", figures=False,
                       progress=False, stream=io.StringIO())  # fmt: skip
    qs = seen["quantizers"]
    assert [(q.scheme, q.granularity, q.clipping, q.rounding) for q in qs.values()] == [
        ("asymmetric", "channel", "mse", "nearest")
    ]


def test_weight_grid_convention_and_clip_ratio_reach_every_quantizer():
    cfg = ExperimentConfig.from_dict(
        {"quantizer": {"symmetric_range": "full", "clip_ratio": 0.97, "granularity": "channel"}}
    )
    qs = cfg.quantizers([4, 8]) + list(cfg.hypothesis_quantizers().values())
    assert all(q.symmetric_range == "full" and q.clip_ratio == 0.97 for q in qs)
    assert qs[0].labels() == {"scheme": "symmetric-full", "clipping": "max*0.97"}
    plain = ExperimentConfig().quantizers([4])[0].labels()
    assert plain == {"scheme": "symmetric", "clipping": "max"}


@pytest.mark.parametrize(
    "quantizer",
    [{"clip_ratio": 0.0}, {"clip_ratio": 3}, {"symmetric_range": "wide"},
     {"symmetric_range": "full", "scheme": "asymmetric"}],
)  # fmt: skip
def test_bad_weight_grid_settings_name_the_section(quantizer):
    with pytest.raises(ValueError, match=r"\[quantizer\]|quantizer\."):
        ExperimentConfig.from_dict({"quantizer": quantizer})
