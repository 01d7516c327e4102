"""Command-line errors a user can fix: one clean line and a non-zero status, never a
traceback, a silent fallback or a silent coercion; and no progress bars in a log."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pytest

from distortion.cli import main

# small enough to be quick if a check were missing (the run would then go on and succeed)
TINY = """
name = "tiny"
[data]
n = 40
[models]
names = ["resnet20"]
[quantizer]
granularity = ["tensor"]
[last_layer]
bits = [8]
n_realizations = 39
problems = [{ name = "10-class" }]
[all_layers]
n = 0
[hypotheses]
bits = [8]
"""


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def _run(tiny, tmp_path, *extra):
    return main(["run", "--config", str(tiny), "--out", str(tmp_path / "out"), "--quiet",
                 "--no-figures", "--cache-dir", str(tmp_path / "cache"), *extra])  # fmt: skip


# -- defect 10: an explicit source that does not exist is an error, never a fallback ------
def test_run_with_missing_data_path_is_an_error(real_data, tiny, tmp_path, capsys):
    t0 = time.perf_counter()
    assert _run(tiny, tmp_path, "--data", str(tmp_path / "no" / "such" / "path")) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "no such file or folder" in err and "Traceback" not in err
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "out" / "comparison.csv").exists()


def test_data_folder_without_the_source_does_not_fall_back(real_data, tmp_path):
    from distortion.experiments.pipeline import _resolve_source

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not found under"):
        _resolve_source("data/cifar10/test.npz", str(empty))
    npz = real_data / "data" / "cifar10" / "test.npz"
    assert _resolve_source("data/cifar10/test.npz", str(real_data)) == str(npz)
    assert _resolve_source("data/cifar10/test.npz", str(npz)) == str(npz)
    assert _resolve_source("data/cifar10/test.npz", None) == str(npz)  # DISTORTION_DATA


def test_weights_for_a_model_the_config_does_not_run(real_data, tiny, tmp_path, capsys):
    ckpt = real_data / "models" / "cifar10-resnet" / "resnet56-4bfd9763.th"
    assert _run(tiny, tmp_path, "--weights", f"resnet56={ckpt}") == 2
    err = capsys.readouterr().err
    assert "resnet56" in err and "does not run" in err and "resnet20" in err
    assert _run(tiny, tmp_path, "--weights", f"resnet20={tmp_path / 'none.th'}") == 2
    assert "no such checkpoint file" in capsys.readouterr().err


# -- defect 11: --out that is a file, or in a read-only folder ----------------------------
def test_run_out_is_a_file(tiny, tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("x")
    status = main(["run", "--config", str(tiny), "--out", str(f), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "is a file" in err and "pass a folder" in err
    status = main(["run", "--config", str(tiny), "--out", str(f / "sub"), "--quiet"])
    assert status == 2 and "which is a file" in capsys.readouterr().err


def test_extract_out_in_a_file_or_a_folder(tmp_path, capsys):
    f = tmp_path / "plain"
    f.write_text("x")
    base = ["extract", "--model", "resnet20", "--n", "20", "--quiet"]
    assert main([*base, "--out", str(f / "x.npz")]) == 2
    assert "which is a file" in capsys.readouterr().err
    d = tmp_path / "d.npz"
    d.mkdir()
    assert main([*base, "--out", str(d)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_out_in_a_read_only_folder(tiny, tmp_path, capsys, monkeypatch):
    from distortion.experiments import _paths

    real_access = os.access
    ro = tmp_path / "ro"
    ro.mkdir()

    def access(path, mode, *a, **k):  # root may write anywhere: pretend `ro` is read-only
        if os.fspath(path) == os.fspath(ro) and mode & os.W_OK:
            return False
        return real_access(path, mode, *a, **k)

    monkeypatch.setattr(_paths.os, "access", access)
    assert main(["run", "--config", str(tiny), "--out", str(ro / "res"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "permission denied" in err and "pass a folder you can write" in err
    assert main(["extract", "--model", "resnet20", "--out", str(ro / "f.npz")]) == 2
    assert "permission denied" in capsys.readouterr().err
    assert main(["test", "--model", "resnet20", "--out", str(ro / "h")]) == 2
    assert "permission denied" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_out_in_a_really_read_only_folder(tiny, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["run", "--config", str(tiny), "--out", str(ro / "res"), "--quiet"]) == 2
        assert "permission denied" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


# -- defect 13: no progress bars when stderr is not a terminal ----------------------------
@pytest.mark.real_data
def test_no_progress_bars_in_a_log(real_data, tmp_path, capsys):
    status = main(["extract", "--model", "resnet20", "--n", "24", "--batch-size", "8",
                   "--no-cache", "--out", str(tmp_path / "f.npz")])  # fmt: skip
    assert status == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "s/it" not in err, err
    from distortion.commands._common import progress_enabled

    assert not progress_enabled(argparse.Namespace(quiet=False))  # stderr is captured here
    assert not progress_enabled(argparse.Namespace(quiet=True))


# -- defect 18: silent coercions and unusable devices ---------------------------------------
@pytest.mark.parametrize("bits", ["4.5", "2.5-8", "²"])
def test_fractional_bits_are_rejected(bits):
    from distortion.commands._common import parse_bits

    with pytest.raises(ValueError, match="--bits must"):  # not int()'s "invalid literal"
        parse_bits(bits)


def test_cli_bits_and_realizations(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", "resnet20", "--bits", "4.5"])
    assert exc.value.code == 2 and "--bits must" in capsys.readouterr().err
    assert main(["test", "--model", "resnet20", "--out", "/tmp/x", "--bits", "4.5"]) == 2
    assert "--bits must" in capsys.readouterr().err


def test_too_few_realizations_for_a_band(capsys):
    assert main(["predict", "--model", "resnet20", "--realizations", "5"]) == 2
    err = capsys.readouterr().err
    assert "--realizations 5" in err and "39" in err and "Traceback" not in err


@pytest.mark.parametrize("device", ["banana", "cuda", "cuda:7"])
def test_unusable_device_is_a_clean_error(device, capsys):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("a CUDA GPU is present")
    status = main(["predict", "--model", "resnet20", "--layers", "last", "--device", device])
    err = capsys.readouterr().err
    assert status == 2 and "--device" in err and device in err and "Traceback" not in err


# -- defect 15: which images `predict` uses --------------------------------------------------
def _dataset(n=60, k=3):
    from distortion.experiments.data import ImageDataset

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(n) % k
    return ImageDataset.from_arrays(images, labels, class_names=["a", "b", "c"][:k])


def test_predict_offset_and_split_choose_the_images():
    from distortion.commands.predict import choose_images
    from distortion.experiments.features import FeatureSet

    ds = _dataset()
    ns = argparse.Namespace(split=None, offset=0, fit_fraction=0.5, seed=0)
    same, note = choose_images(ds, ns)
    assert same is ds and note == ""
    ns.offset = 20
    part, note = choose_images(ds, ns)
    assert len(part) == 40 and np.array_equal(part.images, ds.images[20:]) and "20" in note
    # --split: the run's seeded stratified split (FeatureSet.split_mask of the same labels)
    fs = FeatureSet(features=np.zeros((60, 2), np.float32), labels=ds.labels,
                    logits=np.zeros((60, 3), np.float32), W=np.zeros((3, 2), np.float32),
                    b=np.zeros(3, np.float32), class_names=("a", "b", "c"))  # fmt: skip
    first = fs.split_mask(0.5, seed=3)
    parts = {}
    for split in ("fit", "evaluate"):
        ns = argparse.Namespace(split=split, offset=0, fit_fraction=0.5, seed=3)
        parts[split], note = choose_images(ds, ns)
        assert split in note and "seed 3" in note
    assert np.array_equal(parts["fit"].images, ds.images[first])
    assert np.array_equal(parts["evaluate"].images, ds.images[~first])
    assert len(parts["fit"]) + len(parts["evaluate"]) == 60
    ns = argparse.Namespace(split=None, offset=60, fit_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="skips every image"):
        choose_images(ds, ns)


def test_predict_rejects_offset_with_split(capsys):
    args = ["predict", "--model", "resnet20", "--split", "fit", "--offset", "5"]
    assert main(args) == 2
    assert "drop --offset" in capsys.readouterr().err
    assert main(["predict", "--model", "resnet20", "--offset", "-1"]) == 2


@pytest.mark.real_data
def test_predict_on_the_evaluate_half(real_data, tmp_path, capsys):
    args = ["predict", "--model", "resnet20", "--layers", "last", "--bits", "4", "--n", "60",
            "--split", "evaluate", "--quiet", "--cache-dir", str(tmp_path)]  # fmt: skip
    status = main(args)
    out = capsys.readouterr().out
    assert status == 0
    from distortion.experiments.data import load_dataset
    from distortion.experiments.pipeline import fit_evaluate_mask

    ds = load_dataset("cifar10", n=60)
    n_eval = int((~fit_evaluate_mask(ds.labels, ds.n_classes, 0.5, 0)).sum())
    assert f"({n_eval} images, the evaluate part of the first 60 (fit fraction 0.5, seed 0))" in out


@pytest.mark.real_data
@pytest.mark.slow
def test_predict_with_activations_prints_and_writes_the_split(real_data, tmp_path, capsys):
    """`distortion predict --activation-bits`: W+A rows, the split (printed, JSON, figure),
    calibration images apart from the predicted ones."""
    args = ["predict", "--model", "resnet20", "--bits", "8", "--n", "40", "--granularity",
            "channel", "--activation-bits", "4", "--calibration", "30", "--quiet",
            "--realizations", "40", "--cache-dir", str(tmp_path),
            "--split-json", str(tmp_path / "s.json"), "--split-figure", str(tmp_path / "s.png")]
    assert main(args) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "(40 images)" in out and "activations A4 per tensor (minmax)" in out
    assert "W8A4 (tensor, minmax on 30 calibration images)" in out
    split = json.loads((tmp_path / "s.json").read_text())
    kinds = {p["kind"] for p in split["parts"]}
    assert kinds == {"weights", "activations"} and (tmp_path / "s.png").stat().st_size > 0
    # A4 activations carry more of the flips than W8 weights
    assert split["activations_flip_rate"] > split["weights_flip_rate"]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--activation-bits", "1", "--n", "10"], "--activation-bits must be in 2..16"),
        (["--activation-bits", "8", "--layers", "last"], "needs the all-layer model"),
        (["--split-json", "x.json"], "need --activation-bits"),
        (["--activation-bits", "8", "--calibration", "0", "--n", "10"], "--calibration must"),
    ],
)
def test_predict_activation_options_are_checked(extra, match, capsys):
    assert main(["predict", "--model", "resnet20", *extra]) == 2
    assert match in capsys.readouterr().err
