"""The cache helpers of distortion.experiments._cache, and the gradient-Gram cache.

The feature and hypothesis caches are tested in test_features.py and test_hypotheses.py.
Tests that show a defect of the old code avoid importing ``_cache`` at module level and
recognise ``CacheWarning`` by name, so that they fail for the defect, not for an import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest


def _cache_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if w.category.__name__ == "CacheWarning"]


# ----------------------------------------------------------------------------- content_key
def test_content_key_is_canonical_and_sensitive():
    from distortion.experiments._cache import content_key

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    key = content_key({"x": 1, "y": [1.5, "s", None, True]}, a, b"raw")
    assert len(key) == 64 and key == content_key({"y": [1.5, "s", None, True], "x": 1}, a, b"raw")
    assert key == content_key({"x": np.int64(1), "y": (1.5, "s", None, True)}, a.copy(), b"raw")
    others = [
        content_key({"x": 2, "y": [1.5, "s", None, True]}, a, b"raw"),
        content_key({"x": 1, "y": [1.5, "s", None, True]}, a.astype(np.float64), b"raw"),
        content_key({"x": 1, "y": [1.5, "s", None, True]}, a.reshape(3, 2), b"raw"),
        content_key({"x": 1, "y": [1.5, "s", None, True]}, a + 1e-7, b"raw"),
        content_key({"x": 1, "y": [1.5, "s", None, True]}, a, b"rax"),
        content_key({"x": 1, "y": [1.5, "s", None, True]}, a),
        content_key(a, {"x": 1, "y": [1.5, "s", None, True]}, b"raw"),
    ]
    assert len({key, *others}) == len(others) + 1
    assert content_key(float("nan")) == content_key(np.float64("nan")) != content_key(0.0)
    with pytest.raises(TypeError, match="cannot encode"):
        content_key(object())


def test_jsonable():
    from distortion.experiments._cache import jsonable

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        bits: int
        path: Path

    obj = {
        1: np.float32(0.5),
        "a": np.arange(3),
        "t": (np.int8(1), Path("/x/y")),
        "c": Cfg(4, Path("p")),
        "n": None,
    }
    out = jsonable(obj)
    assert out == {
        "1": 0.5,
        "a": [0, 1, 2],
        "t": [1, "/x/y"],
        "c": {"bits": 4, "path": "p"},
        "n": None,
    }
    json.dumps(out)  # plain JSON types
    assert type(out["t"][0]) is int


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_writes_have_normal_permissions_and_leave_no_temp_files(tmp_path: Path):
    from distortion.experiments._cache import atomic_savez, atomic_write_bytes, atomic_write_text

    old = os.umask(0o022)
    try:
        files = [
            atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01"),
            atomic_write_text(tmp_path / "b.txt", "héllo"),
            atomic_savez(tmp_path / "c.npz", x=np.arange(3)),
        ]
    finally:
        os.umask(old)
    for p in files:
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode & 0o044 and mode == 0o644, (p, oct(mode))
    assert files[0].read_bytes() == b"\x00\x01"
    assert files[1].read_text(encoding="utf-8") == "héllo"
    with np.load(files[2]) as z:
        np.testing.assert_array_equal(z["x"], np.arange(3))

    # a failed write leaves the old file as it was, and no temporary file
    class Unsavable:
        def __array__(self, *a, **k):
            raise RuntimeError("cannot be an array")

    with pytest.raises(RuntimeError, match="cannot be an array"):
        atomic_savez(tmp_path / "c.npz", x=np.arange(2), y=Unsavable())
    with np.load(files[2]) as z:
        np.testing.assert_array_equal(z["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "a.bin",
        "b.txt",
        "c.npz",
    ]


# ----------------------------------------------------------------------------- reading
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"\x00garbage\xff" * 32)
    else:
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_readers_warn_and_return_none_for_unusable_files(tmp_path: Path, how: str):
    from distortion.experiments._cache import (
        CacheWarning,
        atomic_savez,
        atomic_write_text,
        load_npz,
        read_json,
    )

    j = atomic_write_text(tmp_path / "r.json", json.dumps({"key": "k1", "v": list(range(50))}))
    z = atomic_savez(tmp_path / "r.npz", key=np.array("k1"), x=np.arange(100.0))
    assert read_json(j, key="k1")["v"] == list(range(50))
    np.testing.assert_array_equal(load_npz(z, key="k1")["x"], np.arange(100.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing file is a silent miss
        assert read_json(tmp_path / "none.json") is None
        assert load_npz(tmp_path / "none.npz") is None
    for path, read in ((j, read_json), (z, load_npz)):
        with pytest.warns(CacheWarning, match="other inputs"):
            assert read(path, key="k2") is None
        _damage(path, how)
        with pytest.warns(CacheWarning, match="recomputed") as rec:
            assert read(path, key="k1") is None
        assert str(path) in str(rec[0].message)


# ----------------------------------------------------------------------------- cached_json
def test_cached_json_hits_misses_and_recovers(tmp_path: Path):
    from distortion.experiments._cache import CacheWarning, cached_json, content_key

    calls = []

    def compute():
        calls.append(1)
        return (1, 2.5, float("nan"))

    def get(key="k" + "0" * 10, decode=tuple):
        return cached_json(tmp_path, "measurements", key, compute, decode=decode)

    first = get()
    path = tmp_path / "measurements" / ("k" + "0" * 10 + ".json")
    assert path.is_file() and len(calls) == 1
    second = get()
    assert len(calls) == 1 and second[:2] == first[:2] and np.isnan(second[2])
    record = json.loads(path.read_text())
    assert record["key"] == "k" + "0" * 10 and record["sha256"] == content_key(record["value"])
    # damaged in five ways: each is a warning and a recomputation that rewrites the file
    edited = {**record, "value": [1, 9.5, None]}  # valid JSON, garbled value
    stale = {**record, "key": "other"}
    for text in ["{not json", path.read_text()[:20], json.dumps(edited), json.dumps(stale), "[]"]:
        path.write_text(text)
        with pytest.warns(CacheWarning, match="recomputed"):
            again = get()
        assert again[:2] == (1, 2.5)
    assert len(calls) == 6
    # a decode error is a recomputation too
    n = len(calls)
    with pytest.warns(CacheWarning, match="unusable"):
        get(decode=lambda v: {}["missing"])
    assert len(calls) == n + 1
    with pytest.raises(ValueError, match="file-name-safe"):
        get(key="../escape")
    # the default folder is $DISTORTION_CACHE
    cached_json(None, "ns", "abc", lambda: {"a": 1})
    assert (Path(os.environ["DISTORTION_CACHE"]) / "ns" / "abc.json").is_file()


def test_cached_json_write_failure_is_a_warning(tmp_path: Path):
    from distortion.experiments._cache import CacheWarning, cached_json

    (tmp_path / "ns").write_text("a file where the folder should be")
    with pytest.warns(CacheWarning, match="could not write"):
        assert cached_json(tmp_path, "ns", "k", lambda: [1, 2]) == [1, 2]


# ----------------------------------------------------------------------------- Grams cache
torch = pytest.importorskip("torch")


def _net_and_data(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)
    ).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return net, x, y


def _grams(net, x, y, cache_dir, **kw):
    from distortion.experiments.sensitivity import gradient_grams

    kw = {"n_realizations": 5, "granularity": "channel", **kw}
    return gradient_grams(net, (x, y), cache_dir=cache_dir, progress=False, **kw)


def _rewrite_header(path: Path, drop: str) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays["header"]))
    del header[drop]
    arrays["header"] = np.array(json.dumps(header))
    np.savez(path, **arrays)


@pytest.mark.parametrize("how", ["garbage", "truncated", "bad-header"])
def test_unusable_grams_cache_warns_and_is_recomputed(tmp_path: Path, how: str):
    net, x, y = _net_and_data()
    fresh = _grams(net, x, y, None, cache=False)
    first = _grams(net, x, y, tmp_path)
    (path,) = (tmp_path / "grams").glob("*.npz")
    if how == "bad-header":  # a readable file, right key, but a field missing
        _rewrite_header(path, "weight_shapes")
    else:
        _damage(path, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _grams(net, x, y, tmp_path)
    msgs = _cache_warnings(caught)
    assert any(str(path) in m and "recomputed" in m for m in msgs), msgs
    assert "cache_file" not in again.meta  # computed, not read
    for g in (first, again):
        assert g.key == fresh.key
        np.testing.assert_array_equal(g.grams, fresh.grams)
        np.testing.assert_array_equal(g.channel_grams, fresh.channel_grams)
        np.testing.assert_array_equal(g.projections, fresh.projections)
    hit = _grams(net, x, y, tmp_path)  # the file was overwritten with a good one
    assert hit.meta.get("cache_file") == str(path)
    np.testing.assert_array_equal(hit.grams, fresh.grams)


def test_grams_files_have_normal_permissions_and_keys_change(tmp_path: Path):
    net, x, y = _net_and_data()
    old = os.umask(0o022)
    try:
        g = _grams(net, x, y, tmp_path)
    finally:
        os.umask(old)
    (path,) = (tmp_path / "grams").glob("*.npz")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert _grams(net, x, y, tmp_path, seed=1).key != g.key
    assert _grams(net, x, y, tmp_path, granularity="tensor").key != g.key
    with torch.no_grad():
        net[2].bias[0] += 1e-9
    assert _grams(net, x, y, tmp_path).key != g.key
