"""Datasets: .npz arrays, torchvision CIFAR layouts, ImageFolder trees, subsets, bad input."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest

from distortion.experiments.data import (
    CIFAR10_CLASSES,
    CIFAR_PREPROCESSING,
    IMAGENET_PREPROCESSING,
    ImageDataset,
    load_dataset,
)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def naive_preprocess(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float64, pixel by pixel."""
    out = np.empty((3,) + img.shape[:2])
    for c in range(3):
        for i in range(img.shape[0]):
            for j in range(img.shape[1]):
                out[c, i, j] = (img[i, j, c] / 255.0 - MEAN[c]) / STD[c]
    return out


def make_arrays(n=30, k=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % k
    return images, labels


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    images, labels = make_arrays()
    path = tmp_path / "tiny.npz"
    np.savez(path, images=images, labels=labels, classes=np.array(["a", "b", "c"]))
    return path


@pytest.fixture
def no_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point DISTORTION_DATA at an empty folder (no shared data)."""
    empty = tmp_path / "empty-shared"
    empty.mkdir()
    monkeypatch.setenv("DISTORTION_DATA", str(empty))
    return empty


# ---------------------------------------------------------------------------------------
# .npz
# ---------------------------------------------------------------------------------------
def test_npz_loads_and_preprocesses_like_the_naive_formula(tiny_npz: Path):
    images, labels = make_arrays()
    ds = load_dataset(tiny_npz)
    assert len(ds) == 30
    assert ds.class_names == ("a", "b", "c")
    assert ds.dataset_id == "npz:tiny.npz"
    assert ds.preprocessing == CIFAR_PREPROCESSING
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int64
    xs, ys = zip(*ds.batches(7), strict=True)
    assert [len(x) for x in xs] == [7, 7, 7, 7, 2]
    x = np.concatenate([t.numpy() for t in xs])
    assert x.dtype == np.float32 and x.shape == (30, 3, 8, 8)
    np.testing.assert_array_equal(np.concatenate([y.numpy() for y in ys]), labels)
    for i in (0, 17, 29):
        np.testing.assert_allclose(x[i], naive_preprocess(images[i]), atol=1e-6)
    item, label = ds[17]
    np.testing.assert_allclose(item.numpy(), x[17], atol=0)
    assert label == labels[17]
    np.testing.assert_allclose(ds[-1][0].numpy(), x[-1], atol=0)
    with pytest.raises(IndexError):
        ds[30]


def test_npz_without_classes_gets_numbered_names(tmp_path: Path):
    images, labels = make_arrays(k=4)
    np.savez(tmp_path / "x.npz", images=images, labels=labels)
    ds = load_dataset(tmp_path / "x.npz")
    assert ds.class_names == ("0", "1", "2", "3")


def test_first_n(tiny_npz: Path):
    ds = load_dataset(tiny_npz, n=10)
    np.testing.assert_array_equal(ds.indices, np.arange(10))
    assert ds.dataset_id == "npz:tiny.npz[n=10]"
    np.testing.assert_array_equal(ds.images, make_arrays()[0][:10])


def test_per_class_is_stratified_sorted_and_seeded(tiny_npz: Path):
    _, labels = make_arrays()
    ds = load_dataset(tiny_npz, per_class=4, seed=1)
    assert np.all(np.bincount(ds.labels) == 4)
    assert np.all(np.diff(ds.indices) > 0)
    np.testing.assert_array_equal(labels[ds.indices], ds.labels)
    again = load_dataset(tiny_npz, per_class=4, seed=1)
    np.testing.assert_array_equal(again.indices, ds.indices)
    other = [load_dataset(tiny_npz, per_class=4, seed=s).indices for s in range(2, 6)]
    assert any(not np.array_equal(o, ds.indices) for o in other)
    assert ds.dataset_id == "npz:tiny.npz[per_class=4;seed=1]"


def test_class_subset_remaps_labels_and_keeps_names(tiny_npz: Path):
    images, labels = make_arrays()
    ds = load_dataset(tiny_npz, classes=["c", "a"])
    assert ds.class_names == ("c", "a")
    assert ds.class_ids == (2, 0)
    assert ds.source_class_names == ("a", "b", "c")
    expected_idx = np.flatnonzero(np.isin(labels, [0, 2]))
    np.testing.assert_array_equal(ds.indices, expected_idx)
    np.testing.assert_array_equal(ds.labels, np.where(labels[expected_idx] == 2, 0, 1))
    np.testing.assert_array_equal(ds.images, images[expected_idx])
    both = load_dataset(tiny_npz, classes="c,a", per_class=3, n=5)
    assert len(both) == 5 and both.class_names == ("c", "a")
    assert both.dataset_id == "npz:tiny.npz[classes=c,a;per_class=3;seed=0;n=5]"
    by_index = load_dataset(tiny_npz, classes=[2, 0])
    np.testing.assert_array_equal(by_index.indices, ds.indices)
    frame = ds.to_frame()
    assert list(frame["class"]) == ["c", "a"] and list(frame["n"]) == [10, 10]


def test_from_arrays(tmp_path: Path):
    images, labels = make_arrays()
    ds = ImageDataset.from_arrays(images, labels, class_names=["a", "b", "c"], name="mine")
    assert ds.dataset_id == "mine" and len(ds) == 30
    same = ImageDataset.from_arrays(images.copy(), labels, class_names="abc", name="mine")
    assert ds.fingerprint == same.fingerprint
    changed = images.copy()
    changed[3, 0, 0, 0] ^= 1
    other = ImageDataset.from_arrays(changed, labels, class_names="abc", name="mine")
    assert ds.fingerprint != other.fingerprint


def test_dataset_arrays_are_read_only(tiny_npz: Path):
    ds = load_dataset(tiny_npz)
    with pytest.raises(ValueError):
        ds.labels[0] = 1
    with pytest.raises(ValueError):
        ds.images[0, 0, 0, 0] = 1


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"pixels": np.zeros((2, 4, 4, 3), np.uint8), "labels": [0, 1]}, r"lacks.*'images'"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, r"lacks.*'labels'"),
        ({"images": np.zeros((2, 4, 4, 3), np.float32), "labels": [0, 1]}, "uint8"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": [0, 1]}, r"\(N, H, W, 3\)"),
        ({"images": np.zeros((2, 3, 4, 4), np.uint8), "labels": [0, 1]}, r"\(N, H, W, 3\)"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": [0, 1, 1]}, r"shape \(2,\)"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": [0, -1]}, r"0\.\."),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": [0.5, 1]}, "integers"),
        (
            {"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": [0, 5], "classes": ["x", "y"]},
            r"0\.\.1",
        ),
    ],
)
def test_bad_npz_is_refused_with_a_clear_message(tmp_path: Path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        load_dataset(path)


def test_missing_and_unreadable_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="--data"):
        load_dataset(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset(tmp_path / "junk.npz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"\.npz"):
        load_dataset(tmp_path / "x.txt")


def test_impossible_subsets(tiny_npz: Path):
    with pytest.raises(ValueError, match="per_class=11"):
        load_dataset(tiny_npz, per_class=11)
    with pytest.raises(ValueError, match="n=31"):
        load_dataset(tiny_npz, n=31)
    with pytest.raises(ValueError, match="unknown class 'z'"):
        load_dataset(tiny_npz, classes=["a", "z"])
    with pytest.raises(ValueError, match="distinct"):
        load_dataset(tiny_npz, classes=["a", "a"])
    with pytest.raises(ValueError, match="n must be a positive"):
        load_dataset(tiny_npz, n=0)
    with pytest.raises(ValueError, match="preprocessing"):
        load_dataset(tiny_npz, preprocessing="vgg")


# ---------------------------------------------------------------------------------------
# torchvision CIFAR layouts (python-pickle batches written here)
# ---------------------------------------------------------------------------------------
def write_cifar(root: Path, *, hundred: bool = False, per_batch: int = 4, seed: int = 0) -> dict:
    """Write a fake CIFAR-10 (or -100) python layout under root; return the arrays."""
    rng = np.random.default_rng(seed)
    k = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = (
        ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    )
    label_key = "fine_labels" if hundred else "labels"
    out = {}
    for name in files:
        n = per_batch + (2 if "test" in name else 0)
        imgs = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, k, size=n).tolist()
        entry = {b"data": imgs.transpose(0, 3, 1, 2).reshape(n, -1), label_key.encode(): labels}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        out[name] = (imgs, np.array(labels))
    meta_name, key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    names = [f"class{i}" for i in range(k)] if hundred else list(CIFAR10_CLASSES)
    with open(folder / meta_name, "wb") as f:
        pickle.dump({key: names}, f)
    return out


def test_torchvision_cifar10_layout(tmp_path: Path):
    arrays = write_cifar(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path)
    imgs, labels = arrays["test_batch"]
    np.testing.assert_array_equal(ds.images, imgs)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.class_names == CIFAR10_CLASSES
    assert ds.dataset_id == "cifar10:test"
    x, _ = next(ds.batches(2))
    np.testing.assert_allclose(x[1].numpy(), naive_preprocess(imgs[1]), atol=1e-6)
    train = load_dataset("cifar10", root=tmp_path, split="train")
    assert len(train) == 20 and train.dataset_id == "cifar10:train"
    np.testing.assert_array_equal(train.images[4:8], arrays["data_batch_2"][0])
    # a folder holding the layout is recognized as CIFAR-10, not as an ImageFolder
    assert load_dataset(tmp_path).dataset_id == "cifar10:test"
    assert load_dataset(tmp_path / "cifar-10-batches-py").dataset_id == "cifar10:test"


def test_torchvision_cifar100_layout(tmp_path: Path):
    arrays = write_cifar(tmp_path, hundred=True)
    ds = load_dataset("cifar100", root=tmp_path, classes=["class3", "class7", "class50"])
    imgs, labels = arrays["test"]
    keep = np.isin(labels, [3, 7, 50])
    np.testing.assert_array_equal(ds.images, imgs[keep])
    assert ds.class_names == ("class3", "class7", "class50")
    assert len(load_dataset(tmp_path).source_class_names) == 100


def test_cifar_layout_with_a_bad_batch(tmp_path: Path):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_dataset("cifar10", root=tmp_path)


def test_missing_cifar_says_what_to_pass(tmp_path: Path, no_shared: Path):
    with pytest.raises(FileNotFoundError, match="--data.*DISTORTION_DATA.*--download"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="CIFAR-100 not found"):
        load_dataset("cifar100", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="ImageNet.*--data"):
        load_dataset("imagenet")


def test_cifar10_name_finds_the_npz_under_data_root(tmp_path: Path, monkeypatch):
    images, labels = make_arrays(k=10, size=32)
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    np.savez(tmp_path / "data" / "cifar10" / "test.npz", images=images, labels=labels)
    monkeypatch.setenv("DISTORTION_DATA", str(tmp_path))
    ds = load_dataset("cifar10", classes="cat,dog")
    assert ds.dataset_id == "cifar10:test[classes=cat,dog]"
    assert ds.class_names == ("cat", "dog")
    np.testing.assert_array_equal(ds.images, images[np.isin(labels, [3, 5])])


# ---------------------------------------------------------------------------------------
# ImageFolder (PNG files written here)
# ---------------------------------------------------------------------------------------
def write_image_folder(root: Path, sizes=((40, 50), (300, 260), (257, 512))) -> dict:
    from PIL import Image

    rng = np.random.default_rng(3)
    written = {}
    for cls in ("n002", "n001", "n003"):  # created out of order: classes are sorted by name
        (root / cls).mkdir(parents=True)
        for j, (h, w) in enumerate(sizes):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"img{j}.png")
            written[(cls, j)] = arr
    return written


def reference_imagenet(arr: np.ndarray) -> np.ndarray:
    """Resize the shorter side to 256 (PIL bilinear), center-crop 224, normalize (float64)."""
    from PIL import Image

    h, w = arr.shape[:2]
    if h <= w:
        nh, nw = 256, int(256 * w / h)
    else:
        nh, nw = int(256 * h / w), 256
    img = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BILINEAR), dtype=np.float64)
    top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
    img = img[top : top + 224, left : left + 224]
    return ((img / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def test_image_folder_with_imagenet_preprocessing(tmp_path: Path):
    written = write_image_folder(tmp_path / "val")
    ds = load_dataset(tmp_path / "val")
    assert ds.preprocessing == IMAGENET_PREPROCESSING
    assert ds.class_names == ("n001", "n002", "n003")
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert ds.dataset_id == "imagefolder:val"
    x, y = next(ds.batches(4))
    assert x.shape == (4, 3, 224, 224) and x.dtype.is_floating_point
    np.testing.assert_array_equal(y.numpy(), [0, 0, 0, 1])
    for i, (cls, j) in enumerate([("n001", 0), ("n001", 1), ("n001", 2), ("n002", 0)]):
        np.testing.assert_allclose(x[i].numpy(), reference_imagenet(written[(cls, j)]), atol=1e-5)
    same = load_dataset("imagenet", root=tmp_path / "val", classes=["n003"])
    assert same.class_names == ("n003",) and same.class_ids == (2,) and len(same) == 3
    np.testing.assert_allclose(
        same[0][0].numpy(), reference_imagenet(written[("n003", 0)]), atol=1e-5
    )
    assert len(ds.fingerprint) == 64


def test_image_folder_errors(tmp_path: Path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_dataset(tmp_path / "flat")
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no image file"):
        load_dataset(tmp_path / "tree")
    write_image_folder(tmp_path / "mixed", sizes=((32, 32), (40, 30)))
    ds = load_dataset(tmp_path / "mixed", preprocessing="cifar")
    with pytest.raises(ValueError, match="different sizes"):
        next(ds.batches(4))


# ---------------------------------------------------------------------------------------
# the shared CIFAR-10 test file
# ---------------------------------------------------------------------------------------
@pytest.mark.real_data
def test_shared_cifar10_test_file(real_data: Path, monkeypatch):
    monkeypatch.setenv("DISTORTION_DATA", str(real_data))
    ds = load_dataset("cifar10")
    assert len(ds) == 10_000 and ds.class_names == CIFAR10_CLASSES
    assert np.all(np.bincount(ds.labels) == 1000)
    # the hash given in <shared>/data/cifar10/README.md
    digest = hashlib.sha256(np.ascontiguousarray(ds.images).tobytes()).hexdigest()
    assert digest == "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04"
    catdog = load_dataset("cifar10", classes="cat,dog", per_class=100, seed=0)
    assert catdog.class_ids == (3, 5) and np.all(np.bincount(catdog.labels) == 100)
