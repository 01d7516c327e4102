"""FeatureSet, cached extraction, the ``extract`` command, and the real CIFAR-10 numbers."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from distortion.experiments.features import FeatureSet, extract_features

REPO = Path(__file__).resolve().parents[1]
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def make_featureset(n=60, d=5, k=3, seed=0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    W = rng.normal(size=(k, d))
    b = rng.normal(size=k)
    labels = np.arange(n) % k
    return FeatureSet(
        features=x,
        labels=labels,
        logits=x @ W.T + b,
        W=W,
        b=b,
        class_names=tuple("abcdefghij"[:k]),
        provenance={"model": "toy", "seed": seed},
    )


# ---------------------------------------------------------------------------------------
# FeatureSet
# ---------------------------------------------------------------------------------------
def test_import_does_not_import_torch():
    code = (
        "import sys, distortion, distortion.experiments.features, distortion.experiments.data, "
        "distortion.experiments.models, distortion.commands.extract; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_featureset_basics_against_naive_loops():
    fs = make_featureset()
    assert (len(fs), fs.n_features, fs.n_classes) == (60, 5, 3)
    assert fs.features.dtype == np.float32 and fs.labels.dtype == np.int64
    correct = sum(int(np.argmax(fs.logits[i]) == fs.labels[i]) for i in range(len(fs)))
    assert fs.accuracy == pytest.approx(correct / len(fs))
    np.testing.assert_allclose(fs.priors(), [1 / 3] * 3)
    np.testing.assert_allclose(fs.linear_logits(), fs.logits, atol=1e-5)
    frame = fs.to_frame()
    assert list(frame["class"]) == ["a", "b", "c"] and list(frame["n"]) == [20, 20, 20]
    for k in range(3):
        mask = fs.labels == k
        assert frame["accuracy"][k] == pytest.approx(np.mean(np.argmax(fs.logits[mask], 1) == k))
        assert frame["weight_norm"][k] == pytest.approx(np.sqrt(np.sum(fs.W[k] ** 2.0)), rel=1e-6)
    assert "n_samples=60" in repr(fs)


def test_featureset_arrays_are_frozen_and_do_not_freeze_the_callers():
    x = np.zeros((4, 2), dtype=np.float32)
    fs = FeatureSet(x, [0, 1, 0, 1], np.zeros((4, 2)), np.eye(2), np.zeros(2), ("p", "q"))
    assert x.flags.writeable
    x[0, 0] = 7.0
    assert fs.features[0, 0] == 0.0
    with pytest.raises(ValueError):
        fs.features[0, 0] = 1.0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"features": np.zeros((4, 3))}, r"W must have shape \(n_classes, 3\)"),
        ({"features": np.zeros(4)}, "2-dimensional"),
        ({"features": np.full((4, 2), np.nan)}, "non-finite"),
        ({"logits": np.zeros((4, 3))}, r"logits must have shape \(4, 2\)"),
        ({"logits": np.array([[np.inf, 0]] * 4)}, "non-finite"),
        ({"b": np.zeros(3)}, r"b must have shape \(2,\)"),
        ({"labels": [0, 1, 2, 0]}, r"labels must lie in 0\.\.1"),
        ({"labels": [0, 1, 0]}, r"labels must have shape \(4,\)"),
        ({"labels": [0.5, 1, 0, 1]}, "integers"),
        ({"class_names": ("p",)}, "class_names must have 2"),
    ],
)
def test_featureset_validation(change, match):
    args = {
        "features": np.zeros((4, 2)),
        "labels": [0, 1, 0, 1],
        "logits": np.zeros((4, 2)),
        "W": np.eye(2),
        "b": np.zeros(2),
        "class_names": ("p", "q"),
    }
    args.update(change)
    with pytest.raises(ValueError, match=match):
        FeatureSet(**args)


def test_subset_is_the_restricted_softmax_layer():
    fs = make_featureset(k=4)
    sub = fs.subset(classes=["d", "b"])
    keep = np.isin(fs.labels, [3, 1])
    assert sub.class_names == ("d", "b") and len(sub) == keep.sum()
    np.testing.assert_array_equal(sub.labels, np.where(fs.labels[keep] == 3, 0, 1))
    np.testing.assert_array_equal(sub.W, fs.W[[3, 1]])
    np.testing.assert_array_equal(sub.b, fs.b[[3, 1]])
    np.testing.assert_array_equal(sub.logits, fs.logits[keep][:, [3, 1]])
    np.testing.assert_allclose(sub.linear_logits(), sub.logits, atol=1e-5)
    assert sub.provenance["classes"] == ["d", "b"] and sub.provenance["model"] == "toy"
    assert fs.subset(classes="d,b").checksum() == sub.checksum()
    with pytest.raises(ValueError, match="unknown class 'z'"):
        fs.subset(classes=["z"])


def test_split_is_stratified_disjoint_and_seeded():
    fs = make_featureset(n=90, k=3)
    cal, ev = fs.split(0.3, seed=4)
    assert list(np.bincount(cal.labels)) == [9, 9, 9]
    assert list(np.bincount(ev.labels)) == [21, 21, 21]
    rows = {tuple(r) for r in cal.features} | {tuple(r) for r in ev.features}
    assert len(rows) == 90  # disjoint, and together all samples
    again, _ = fs.split(0.3, seed=4)
    np.testing.assert_array_equal(again.features, cal.features)
    other, _ = fs.split(0.3, seed=5)
    assert not np.array_equal(other.features, cal.features)
    assert cal.provenance["part"] == "calibration" and ev.provenance["split"]["seed"] == 4
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction must be in"):
            fs.split(bad)


def test_save_load_roundtrip(tmp_path: Path):
    fs = make_featureset()
    path = fs.save(tmp_path / "fs.npz")
    back = FeatureSet.load(path)
    for name in ("features", "labels", "logits", "W", "b"):
        np.testing.assert_array_equal(getattr(back, name), getattr(fs, name))
    assert back.class_names == fs.class_names and back.provenance == fs.provenance
    assert [p.name for p in tmp_path.iterdir()] == ["fs.npz"]  # no temporary file left


def test_load_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="distortion extract"):
        FeatureSet.load(tmp_path / "missing.npz")
    fs = make_featureset()
    data = fs.save(tmp_path / "fs.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        FeatureSet.load(tmp_path / "truncated.npz")
    np.savez(tmp_path / "other.npz", features=fs.features, labels=fs.labels)
    with pytest.raises(ValueError, match=r"not a FeatureSet file: it lacks \['W', 'b'"):
        FeatureSet.load(tmp_path / "other.npz")
    # change one feature but keep the metadata: the checksum catches it
    with zipfile.ZipFile(tmp_path / "fs.npz") as z:
        arrays = {n[:-4]: np.load(z.open(n)) for n in z.namelist()}
    arrays["features"] = arrays["features"].copy()
    arrays["features"][0, 0] += 1.0
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(ValueError, match="checksum mismatch"):
        FeatureSet.load(tmp_path / "tampered.npz")


# ---------------------------------------------------------------------------------------
# extraction on tiny data (random weights)
# ---------------------------------------------------------------------------------------
@pytest.fixture
def tiny_dataset():
    from distortion.experiments.data import ImageDataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    return ImageDataset.from_arrays(images, np.arange(20) % 10, class_names=names, name="tiny")


@pytest.fixture
def random_resnet20():
    from distortion.experiments.models import load_model

    return load_model("resnet20", "random", seed=1)


def reference_logits(model, images: np.ndarray) -> np.ndarray:
    """The model's logits on images preprocessed in float64 numpy, outside the dataset code."""
    import torch

    x = (images / 255.0 - MEAN) / STD
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        return model(x).double().numpy()


def test_extraction_matches_the_model(tiny_dataset, random_resnet20, tmp_path: Path):
    fs = extract_features(
        random_resnet20, tiny_dataset, batch_size=16, cache_dir=tmp_path, progress=False
    )
    assert (len(fs), fs.n_features, fs.n_classes) == (20, 64, 10)
    np.testing.assert_array_equal(fs.labels, tiny_dataset.labels)
    ref = reference_logits(random_resnet20, tiny_dataset.images)
    assert np.max(np.abs(fs.logits - ref)) < 1e-4
    assert np.max(np.abs(fs.linear_logits() - fs.logits)) < 1e-4
    np.testing.assert_array_equal(fs.W, random_resnet20.linear.weight.detach().numpy())
    p = fs.provenance
    assert p["model"] == "resnet20" and p["dataset"] == "tiny" and p["cache"] == "miss"
    assert p["weights"] == "random(seed=1)" and p["preprocessing"]["name"] == "cifar"
    assert set(p["versions"]) >= {"torch", "torchvision", "distortion", "numpy"}
    assert random_resnet20.training is False


def test_extraction_cache_hits_and_misses(tiny_dataset, random_resnet20, tmp_path: Path):
    import torch

    from distortion.experiments.data import ImageDataset, Preprocessing

    def run(model, ds, **kw):
        return extract_features(model, ds, cache_dir=tmp_path, progress=False, **kw)

    first = run(random_resnet20, tiny_dataset)
    second = run(random_resnet20, tiny_dataset)
    assert (first.provenance["cache"], second.provenance["cache"]) == ("miss", "hit")
    np.testing.assert_array_equal(second.features, first.features)
    # a changed weight, image, subset or preprocessing is a different entry
    with torch.no_grad():
        random_resnet20.layer2[0].conv1.weight[0, 0, 0, 0] += 0.5
    assert run(random_resnet20, tiny_dataset).provenance["cache"] == "miss"
    images = tiny_dataset.images.copy()
    images[5, 3, 3, 1] ^= 1
    changed = ImageDataset.from_arrays(
        images, tiny_dataset.labels, class_names=tiny_dataset.class_names, name="tiny"
    )
    assert run(random_resnet20, changed).provenance["cache"] == "miss"
    other_prep = Preprocessing("half", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    prep = ImageDataset.from_arrays(
        images, tiny_dataset.labels, class_names=tiny_dataset.class_names, name="tiny",
        preprocessing=other_prep,
    )  # fmt: skip
    assert run(random_resnet20, prep).provenance["cache"] == "miss"
    assert run(random_resnet20, prep).provenance["cache"] == "hit"
    assert not list(tmp_path.glob("*.tmp"))
    off = run(random_resnet20, tiny_dataset, cache=False)
    assert off.provenance["cache"] == "off"


def test_corrupt_cache_is_recomputed(tiny_dataset, random_resnet20, tmp_path: Path):
    from distortion.experiments._cache import CacheWarning

    first = extract_features(random_resnet20, tiny_dataset, cache_dir=tmp_path, progress=False)
    (cache_file,) = tmp_path.glob("features-*.npz")
    data = cache_file.read_bytes()
    cache_file.write_bytes(data[: len(data) // 3])
    with pytest.warns(CacheWarning, match="recomputed"):
        again = extract_features(random_resnet20, tiny_dataset, cache_dir=tmp_path, progress=False)
    assert again.provenance["cache"] == "miss"
    np.testing.assert_array_equal(again.features, first.features)
    third = extract_features(random_resnet20, tiny_dataset, cache_dir=tmp_path, progress=False)
    assert third.provenance["cache"] == "hit"


def _damage(path: Path, how: str, stale: bytes = b"") -> None:
    data = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"\x00garbage\xff" * 64)
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "stale":  # a valid file written for other inputs
        path.write_bytes(stale)


@pytest.mark.parametrize("how", ["garbage", "truncated", "stale"])
def test_unusable_feature_cache_warns_and_is_recomputed(
    tiny_dataset, random_resnet20, tmp_path: Path, how: str
):
    """Defect 12: every unusable cache file is a CacheWarning naming it, then recomputed."""
    import dataclasses
    import warnings

    def run():
        return extract_features(random_resnet20, tiny_dataset, cache_dir=tmp_path, progress=False)

    first = run()
    (cache_file,) = tmp_path.glob("features-*.npz")
    other = dataclasses.replace(first, provenance={**first.provenance, "cache_key": "0" * 64})
    other.save(tmp_path / "other.npz")
    _damage(cache_file, how, stale=(tmp_path / "other.npz").read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = run()
    assert again.provenance["cache"] == "miss"
    for name in ("features", "logits", "labels", "W", "b"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    msgs = [str(w.message) for w in caught if w.category.__name__ == "CacheWarning"]
    assert any(str(cache_file) in m and "recomputed" in m for m in msgs), msgs
    assert run().provenance["cache"] == "hit"  # the file was overwritten with a good one


def test_feature_files_have_normal_permissions(tiny_dataset, random_resnet20, tmp_path: Path):
    """Defect 22: feature files were written mode 0600 (tempfile.mkstemp)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        saved = make_featureset().save(tmp_path / "fs.npz")
        extract_features(random_resnet20, tiny_dataset, cache_dir=tmp_path / "c", progress=False)
    finally:
        os.umask(old)
    (cached,) = (tmp_path / "c").glob("features-*.npz")
    for p in (saved, cached):
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode & 0o044, oct(mode)
        assert mode == 0o644, oct(mode)
    assert not list(tmp_path.rglob("*.tmp"))


def test_feature_cache_key_changes_with_an_input(tiny_dataset, random_resnet20):
    import torch

    from distortion.experiments.features import feature_cache_key

    key = feature_cache_key(random_resnet20, tiny_dataset)
    assert key == feature_cache_key(random_resnet20, tiny_dataset)
    assert len(key) == 64 and int(key, 16) >= 0
    with torch.no_grad():
        random_resnet20.linear.bias[0] += 1e-3
    assert feature_cache_key(random_resnet20, tiny_dataset) != key


def test_class_subset_extraction(random_resnet20, tiny_dataset, tmp_path: Path):
    from distortion.experiments.data import ImageDataset

    ds = ImageDataset.from_arrays(
        tiny_dataset.images, tiny_dataset.labels, class_names=tiny_dataset.class_names,
        classes=["dog", "cat"], name="tiny",
    )  # fmt: skip
    fs = extract_features(random_resnet20, ds, cache=False, progress=False)
    full = extract_features(random_resnet20, tiny_dataset, cache=False, progress=False)
    assert fs.class_names == ("dog", "cat") and fs.W.shape == (2, 64)
    np.testing.assert_array_equal(fs.W, full.W[[5, 3]])
    expected = full.subset(classes=["dog", "cat"])
    np.testing.assert_allclose(fs.logits, expected.logits, atol=1e-5)
    np.testing.assert_array_equal(fs.labels, expected.labels)


def test_extraction_errors(random_resnet20, tiny_dataset):
    from distortion.experiments.data import ImageDataset

    rng = np.random.default_rng(0)
    three = ImageDataset.from_arrays(
        rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6) % 3
    )
    with pytest.raises(ValueError, match="model has 10 outputs but the dataset"):
        extract_features(random_resnet20, three, cache=False, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        extract_features(random_resnet20, tiny_dataset, batch_size=0, cache=False)
    with pytest.raises(ValueError, match="must be an ImageDataset"):
        extract_features(random_resnet20, [1, 2, 3], cache=False)


def test_image_folder_with_torchvision_resnet18(tmp_path: Path):
    from PIL import Image

    from distortion.experiments.data import IMAGENET_PREPROCESSING, Preprocessing, load_dataset
    from distortion.experiments.models import load_model

    rng = np.random.default_rng(0)
    for cls in ("n01", "n02", "n03"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for j in range(2):
            arr = rng.integers(0, 256, size=(230 + 10 * j, 250, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "val" / cls / f"{j}.png")
    # ImageNet-style preprocessing at a small size, to keep the test fast on a CPU
    small = Preprocessing("small-imagenet", IMAGENET_PREPROCESSING.mean,
                          IMAGENET_PREPROCESSING.std, resize=72, crop=64)  # fmt: skip
    ds = load_dataset(tmp_path / "val", preprocessing=small)
    assert load_dataset(tmp_path / "val").preprocessing == IMAGENET_PREPROCESSING
    model = load_model("resnet18", "random", n_classes=3)
    fs = extract_features(model, ds, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    assert (len(fs), fs.n_features, fs.n_classes) == (6, 512, 3)
    assert fs.class_names == ("n01", "n02", "n03")
    assert np.max(np.abs(fs.linear_logits() - fs.logits)) < 1e-4
    import torch

    with torch.no_grad():
        direct = model(torch.stack([ds[i][0] for i in range(6)])).numpy()
    assert np.max(np.abs(direct - fs.logits)) < 1e-4
    again = extract_features(model, ds, cache_dir=tmp_path / "cache", progress=False)
    assert again.provenance["cache"] == "hit"


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------
def test_cli_extract(tmp_path: Path, capsys, monkeypatch):
    import torch

    from distortion.cli import main
    from distortion.experiments.models import load_model

    monkeypatch.setenv("DISTORTION_DATA", str(tmp_path / "nothing"))
    monkeypatch.delenv("DISTORTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(30) % 10)
    src = load_model("resnet20", "random", seed=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}},
               tmp_path / "w.th")  # fmt: skip
    out = tmp_path / "out" / "f.npz"
    argv = ["extract", "--model", "resnet20", "--weights", str(tmp_path / "w.th"),
            "--data", str(tmp_path / "d.npz"), "--classes", "3,5", "--per-class", "2",
            "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "top-1" in capsys.readouterr().out
    fs = FeatureSet.load(out)
    assert fs.class_names == ("3", "5") and len(fs) == 4 and fs.W.shape == (2, 64)
    assert main(argv) == 0
    assert "(cache hit)" in capsys.readouterr().out

    # missing data, missing weights, wrong depth: one line, exit status 2
    bad = argv.copy()
    bad[bad.index("--data") + 1] = str(tmp_path / "nope.npz")
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("distortion extract: error:") and "--data" in err
    assert len(err.strip().splitlines()) == 1
    nowts = argv[:3] + argv[5:]
    assert main(nowts) == 2
    err = capsys.readouterr().err
    assert "--weights FILE" in err and "DISTORTION_WEIGHTS" in err
    assert main(["extract", "--model", "resnet56"] + argv[3:]) == 2
    assert "pass --model resnet20" in capsys.readouterr().err
    assert main(["extract", "--model", "resnet20", "--data", "cifar10", "--out", "x.npz"]) == 2
    assert "DISTORTION_DATA" in capsys.readouterr().err


@pytest.mark.real_data
def test_cli_extract_shared_defaults(real_data: Path, tmp_path: Path, capsys, monkeypatch):
    from distortion.cli import main

    monkeypatch.setenv("DISTORTION_DATA", str(real_data))
    monkeypatch.delenv("DISTORTION_WEIGHTS", raising=False)
    out = tmp_path / "catdog.npz"
    argv = ["extract", "--model", "resnet20", "--classes", "cat,dog", "--per-class", "50",
            "--cache-dir", str(tmp_path), "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    fs = FeatureSet.load(out)
    assert fs.class_names == ("cat", "dog") and list(np.bincount(fs.labels)) == [50, 50]
    assert fs.provenance["weights_sha256"].startswith("12fca82f")
    assert fs.provenance["dataset"] == "cifar10:test[classes=cat,dog;per_class=50;seed=0]"


# ---------------------------------------------------------------------------------------
# real CIFAR-10: accuracies, W x + b, cache
# ---------------------------------------------------------------------------------------
@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.parametrize(
    ("fixture", "top1"),
    # top-1 of <shared>/models/cifar10-resnet/README.md (and the akamaster table)
    [("resnet20_features", 0.9173), ("resnet56_features", 0.9339)],
)
def test_real_accuracy_and_linear_logits(request, fixture: str, top1: float):
    fs = request.getfixturevalue(fixture)
    assert (len(fs), fs.n_features, fs.n_classes) == (10_000, 64, 10)
    assert abs(fs.accuracy - top1) <= 0.0002
    assert np.max(np.abs(fs.linear_logits() - fs.logits)) < 1e-4


@pytest.mark.real_data
@pytest.mark.slow
def test_real_features_saved_cached_and_equal_to_a_fresh_model(
    resnet20_features, resnet20_model, cifar10_test, feature_cache_dir, tmp_path: Path
):
    path = resnet20_features.save(tmp_path / "r20.npz")
    fs = FeatureSet.load(path)
    assert np.max(np.abs(fs.linear_logits() - fs.logits)) < 1e-4
    # an independent forward pass of a freshly loaded model on the first 200 images
    ref = reference_logits(resnet20_model, cifar10_test.images[:200])
    assert np.max(np.abs(fs.linear_logits()[:200] - ref)) < 1e-4
    # a second extraction is served from the cache filled by the session fixture
    again = extract_features(
        resnet20_model, cifar10_test, cache_dir=feature_cache_dir, progress=False
    )
    assert again.provenance["cache"] == "hit"
    np.testing.assert_array_equal(again.features, resnet20_features.features)
    assert again.provenance["weights_sha256"].startswith("12fca82f")
    assert again.provenance["dataset"] == "npz:test.npz"
