"""Tests of the sharded stages: 2 gloo processes against one, a killed rank, the merges,
and the grid of cells spread over SLURM array tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from distortion.experiments import distributed as D
from distortion.experiments._cache import CacheWarning
from distortion.quantize import UniformQuantizer

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the worker
#: Run by ``python`` (one process) or ``python -m torch.distributed.run`` (several): the
#: three sharded stages on a tiny CNN and 64 generated 8x8 images, results saved by rank 0.
WORKER = textwrap.dedent(
    r"""
    import json, os, sys
    import numpy as np
    import torch
    from torch import nn

    from distortion.experiments import distributed as D
    from distortion.experiments.data import ImageDataset
    from distortion.experiments.measure import measurement_to_dict
    from distortion.quantize import UniformQuantizer

    out_dir, n_shards = sys.argv[1], (int(sys.argv[2]) if sys.argv[2] != "-" else None)
    plain = len(sys.argv) > 3 and sys.argv[3] == "plain"


    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(6)
            self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2, bias=False)
            self.fc1 = nn.Linear(8 * 4 * 4, 12)
            self.fc2 = nn.Linear(12, 4)

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = torch.relu(self.conv2(out))
            return self.fc2(torch.relu(self.fc1(out.flatten(1))))


    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 1.5)
    model.eval()
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(64, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, size=64)
    data = ImageDataset.from_arrays(images, labels, name="tiny")
    with torch.no_grad():  # centre the logits so that every class gets predicted
        x = next(data.batches(64))[0]
        model.fc2.bias -= model(x).mean(0)

    ctx = D.init_distributed()
    log = os.path.join(out_dir, f"writes-rank{ctx.rank}.txt")
    kill = os.environ.get("KILL_RANK") == str(ctx.rank)
    real_write = D._write_shard


    def spy(stage, value, path, key):  # record each shard written; maybe die after the first
        real_write(stage, value, path, key)
        with open(log, "a") as f:
            f.write(f"{stage.name} {path.name}\n")
        if kill:
            os._exit(1)


    D._write_shard = spy
    cache = os.environ["DISTORTION_CACHE"]
    quant = UniformQuantizer(3, granularity="channel", rounding="dither")
    kw = dict(cache_dir=cache, n_shards=n_shards, device="cpu")
    fs = D.sharded_extract_features(model, data, batch_size=8, **kw)
    gg = D.sharded_gradient_grams(
        model, data, batch_size=8, granularity="channel", n_realizations=3, seed=5, **kw
    )
    ms = D.sharded_measure(model, data, quant, batch_size=8, repeats=2, seed=1, **kw)
    if ctx.rank == 0:
        arrays = dict(
            features=fs.features, f_logits=fs.logits, logits=gg.logits, grams=gg.grams,
            channel_grams=gg.channel_grams, projections=gg.projections, flips=ms.flips,
        )
        meta = {"measure": measurement_to_dict(ms), "shards": fs.provenance["shards"],
                "world": ctx.world_size}
        if plain:  # the unsharded functions, in this same process
            from distortion.experiments.features import extract_features
            from distortion.experiments.measure import measure
            from distortion.experiments.sensitivity import gradient_grams

            pf = extract_features(model, data, batch_size=8, cache=False, progress=False)
            pg = gradient_grams(model, data, batch_size=8, granularity="channel",
                                n_realizations=3, seed=5, cache=False, progress=False)
            pm = measure(model, data, quant, batch_size=8, repeats=2, seed=1, progress=False)
            arrays.update(p_features=pf.features, p_grams=pg.grams,
                          p_projections=pg.projections, p_logits=pg.logits, p_flips=pm.flips)
            meta["plain_measure"] = measurement_to_dict(pm)
        np.savez(os.path.join(out_dir, "result.npz"), **arrays)
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(meta, f)
    # a second call on every rank is served from the merged cache, with nothing recomputed
    again = D.sharded_extract_features(model, data, batch_size=8, **kw)
    assert again.provenance["cache"] == "hit" and np.array_equal(again.features, fs.features)
    D.shutdown_distributed()
    """
)


def _launch(
    tmp: Path,
    out: Path,
    cache: Path,
    *,
    nproc: int,
    n_shards: int | None,
    plain: bool = False,
    kill_rank: int | None = None,
) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DISTORTION_CACHE": str(cache),
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env.pop("KILL_RANK", None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if kill_rank is not None:
        env["KILL_RANK"] = str(kill_rank)
    args = [str(out), "-" if n_shards is None else str(n_shards)] + (["plain"] if plain else [])
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(script), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"


def _result(out: Path) -> tuple[dict, dict]:
    with np.load(out / "result.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((out / "result.json").read_text())


def _writes(out: Path) -> list[str]:
    return sorted(line for f in out.glob("writes-rank*.txt") for line in f.read_text().splitlines())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[dict, dict]:
    """One process, no process group, plus the unsharded functions."""
    tmp = tmp_path_factory.mktemp("single")
    proc = _launch(tmp, tmp / "out", tmp / "cache", nproc=1, n_shards=None, plain=True)
    _ok(proc)
    return _result(tmp / "out")


def _assert_same(a: dict, ma: dict, b: dict, mb: dict) -> None:
    assert np.array_equal(a["features"], b["features"])  # bit for bit
    assert np.array_equal(a["f_logits"], b["f_logits"])
    for name in ("grams", "logits", "channel_grams", "projections"):
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        scale = np.max(np.abs(y))
        assert x.shape == y.shape and np.max(np.abs(x - y)) <= 1e-12 * scale, name
    assert np.array_equal(a["flips"], b["flips"])
    assert ma == mb  # counts, accuracies, flips, quantizers


def test_single_process_equals_unsharded(single):
    a, meta = single
    assert meta["world"] == 1 and meta["shards"]["n_shards"] == 1
    assert np.array_equal(a["features"], a["p_features"])
    assert np.array_equal(a["grams"], a["p_grams"])
    assert np.array_equal(a["projections"], a["p_projections"])
    assert np.array_equal(a["logits"], a["p_logits"])
    assert np.array_equal(a["flips"], a["p_flips"])
    assert meta["measure"] == meta["plain_measure"]
    assert a["flips"].any()  # 3-bit dither changes some predictions: the check has teeth


def test_two_gloo_processes_equal_one(single, tmp_path):
    proc = _launch(tmp_path, tmp_path / "out", tmp_path / "cache", nproc=2, n_shards=None)
    _ok(proc)
    b, mb = _result(tmp_path / "out")
    assert mb["world"] == 2 and mb["shards"]["bounds"] == [[0, 32], [32, 64]]
    a, ma = single
    _assert_same(b, mb["measure"], a, ma["measure"])
    # one shard per rank and stage, then merged; the shard files are removed after the merge
    assert len(_writes(tmp_path / "out")) == 6
    assert not list((tmp_path / "cache" / "shards").rglob("*.npz"))
    assert list((tmp_path / "cache" / "grams").glob("grams-*.npz"))


def test_killed_rank_rerun_recomputes_only_missing_shards(single, tmp_path):
    out1, out2, cache = tmp_path / "run1", tmp_path / "run2", tmp_path / "cache"
    # 4 shards over 2 ranks: rank 1 dies right after writing its first features shard
    proc = _launch(tmp_path, out1, cache, nproc=2, n_shards=4, kill_rank=1)
    assert proc.returncode != 0
    first = _writes(out1)
    assert [w for w in first if "00001of00004" in w]  # rank 1's first shard made it
    assert not [w for w in first if "00003of00004" in w]  # its second did not
    assert not (out1 / "result.npz").exists()
    leftovers = list((cache / "shards").rglob("*.npz"))
    assert leftovers and all(".tmp" not in p.name for p in leftovers)

    proc = _launch(tmp_path, out2, cache, nproc=2, n_shards=4)
    _ok(proc)
    second = _writes(out2)
    features_second = {w for w in second if w.startswith("features ")}
    # exactly the features shards that did not exist after the kill are recomputed
    names_first = {w.split(" ", 1)[1] for w in first if w.startswith("features ")}
    names_second = {w.split(" ", 1)[1] for w in features_second}
    assert names_first.isdisjoint(names_second)
    assert len(names_first | names_second) == 4
    assert any("00003of00004" in n for n in names_second)
    b, mb = _result(out2)
    a, ma = single
    assert mb["shards"]["bounds"] == [[0, 16], [16, 32], [32, 48], [48, 64]]
    _assert_same(b, mb["measure"], a, ma["measure"])


# ----------------------------------------------------------------------------- in process
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def tiny():
    from distortion.experiments.data import ImageDataset

    torch.manual_seed(1)
    model = Tiny().eval()
    rng = np.random.default_rng(0)
    data = ImageDataset.from_arrays(
        rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8),
        rng.integers(0, 3, size=40),
        name="tiny40",
    )
    return model, data


def test_shard_bounds():
    assert D.shard_bounds(10, 3, block=2) == [(0, 4), (4, 8), (8, 10)]
    assert D.shard_bounds(64, 2, block=8) == [(0, 32), (32, 64)]
    assert D.shard_bounds(5, 4, block=4) == [(0, 4), (4, 5), (5, 5), (5, 5)]
    for n, k, b in [(1, 1, 1), (1000, 7, 13), (256, 8, 256), (3, 5, 1)]:
        bounds = D.shard_bounds(n, k, block=b)
        assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(s1 == s0 for (_, s0), (s1, _) in zip(bounds, bounds[1:], strict=False))
        assert all(start % b == 0 for start, _ in bounds if start < n)
    with pytest.raises(ValueError, match="n_shards"):
        D.shard_bounds(10, 0)


def test_shard_dataset(tiny):
    _, data = tiny
    part = D.shard_dataset(data, 8, 24)
    assert len(part) == 16 and part.dataset_id.endswith("[8:24]")
    assert np.array_equal(part.images, data.images[8:24])
    assert np.array_equal(part.labels, data.labels[8:24])
    assert part.fingerprint != data.fingerprint
    with pytest.raises(ValueError, match="start"):
        D.shard_dataset(data, 30, 50)


def test_single_process_shards_and_garbled_shard(tiny, tmp_path):
    """In one process with 3 shards: equal to extract_features; a garbled shard file is
    recomputed after a CacheWarning, a stray temp file is ignored and removed."""
    from distortion.experiments.features import extract_features

    model, data = tiny
    ref = extract_features(model, data, batch_size=8, cache=False, progress=False)
    fs = D.sharded_extract_features(
        model, data, cache_dir=tmp_path, batch_size=8, n_shards=3, keep_shards=True
    )
    assert np.array_equal(fs.features, ref.features) and np.array_equal(fs.logits, ref.logits)
    assert fs.provenance["shards"]["bounds"] == [[0, 16], [16, 32], [32, 40]]
    # the merged file is where extract_features looks
    hit = extract_features(model, data, batch_size=8, cache_dir=tmp_path, progress=False)
    assert hit.provenance["cache"] == "hit" and np.array_equal(hit.features, ref.features)

    shards = sorted((tmp_path / "shards" / "features").glob("*.npz"))
    assert len(shards) == 3
    Path(hit.provenance["cache_file"]).unlink()
    shards[1].write_bytes(b"garbage")
    (shards[2].parent / f".{shards[2].name}.abcdef.tmp").write_bytes(b"half")
    with pytest.warns(CacheWarning, match="ignoring the cache file"):
        again = D.sharded_extract_features(
            model, data, cache_dir=tmp_path, batch_size=8, n_shards=3
        )
    assert np.array_equal(again.features, ref.features)
    assert not list((tmp_path / "shards").rglob("*.tmp"))
    assert not list((tmp_path / "shards").rglob("*.npz"))  # removed after the merge


def test_merge_grams_and_features_numpy(tiny, tmp_path):
    from distortion.experiments.features import extract_features
    from distortion.experiments.sensitivity import gradient_grams

    model, data = tiny
    parts = [D.shard_dataset(data, a, b) for a, b in D.shard_bounds(len(data), 2, block=8)]
    kw = dict(batch_size=8, n_realizations=2, cache=False, progress=False)
    full = gradient_grams(model, data, **kw)
    merged = D.merge_grams([gradient_grams(model, p, **kw) for p in parts], key=full.key)
    assert np.array_equal(merged.grams, full.grams)
    assert np.array_equal(merged.projections, full.projections)
    assert np.array_equal(merged.labels, full.labels) and merged.key == full.key
    fkw = dict(batch_size=8, cache=False, progress=False)
    fs = D.merge_features([extract_features(model, p, **fkw) for p in parts])
    assert np.array_equal(fs.features, extract_features(model, data, **fkw).features)
    assert fs.provenance["n_samples"] == len(data)
    other = Tiny().eval()
    with pytest.raises(ValueError, match="same model"):
        D.merge_features([extract_features(m, parts[0], **fkw) for m in (model, other)])
    with pytest.raises(ValueError, match="empty"):
        D.merge_grams([])


def test_merge_measurements_adds_counts(tiny):
    from distortion.experiments.measure import measure, measurement_to_dict

    model, data = tiny
    q = UniformQuantizer(2, rounding="stochastic")
    kw = dict(repeats=3, seed=2, batch_size=8, progress=False)
    full = measure(model, data, q, **kw)
    parts = [D.shard_dataset(data, a, b) for a, b in D.shard_bounds(len(data), 3, block=8)]
    merged = D.merge_measurements([measure(model, p, q, **kw) for p in parts])
    assert measurement_to_dict(merged) == measurement_to_dict(full)
    assert merged.accuracy_loss_interval == full.accuracy_loss_interval
    assert merged.flip_rate_interval == full.flip_rate_interval
    assert merged.accuracy_loss_pvalue == full.accuracy_loss_pvalue
    with pytest.raises(ValueError, match="other quantizers"):
        D.merge_measurements([full, measure(model, data, UniformQuantizer(4), **kw)])


def test_sharded_measure_single_process(tiny, tmp_path):
    from distortion.experiments.measure import measure, measurement_to_dict

    model, data = tiny
    q = UniformQuantizer(2)
    ref = measure(model, data, q, batch_size=8, progress=False)
    m = D.sharded_measure(model, data, q, cache_dir=tmp_path, batch_size=8, n_shards=4)
    assert measurement_to_dict(m) == measurement_to_dict(ref)
    again = D.sharded_measure(model, data, q, cache_dir=tmp_path, batch_size=8, n_shards=4)
    assert measurement_to_dict(again) == measurement_to_dict(ref)


# ----------------------------------------------------------------------------- grids
def test_sharded_cells_round_robin_and_slurm(monkeypatch):
    cells = list(range(10))
    assert D.sharded_cells(cells, 1, 3) == [(1, 1), (4, 4), (7, 7)]
    together = sorted(i for r in range(3) for i, _ in D.sharded_cells(cells, r, 3))
    assert together == cells
    assert D.sharded_cells(cells) == list(enumerate(cells))  # no SLURM, no process group
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert D.sharded_cells(cells) == [(1, 1), (5, 5), (9, 9)]
    with pytest.raises(ValueError, match="rank"):
        D.sharded_cells(cells, 3, 3)


def test_run_and_merge_cells(tmp_path):
    from distortion.experiments.features import FeatureSet
    from distortion.experiments.measure import (
        measure_last_layer,
        measurement_from_dict,
        measurement_to_dict,
    )

    rng = np.random.default_rng(0)
    W = rng.normal(size=(3, 5))
    x = rng.normal(size=(200, 5))
    fs = FeatureSet(features=x, labels=rng.integers(0, 3, 200), logits=x @ W.T,
                    W=W, b=np.zeros(3), class_names=("a", "b", "c"))  # fmt: skip
    cells = [UniformQuantizer(b) for b in (2, 3, 4, 5, 6)]
    kw = dict(key_of=lambda q: {"q": q, "data": fs.checksum()}, namespace="test-grid",
              cache_dir=tmp_path)  # fmt: skip
    calls = []

    def compute(q):
        calls.append(q.bits)
        return measure_last_layer(fs, q)

    # two of three array tasks ran
    for task in (0, 2):
        D.run_cells(cells, compute, encode=measurement_to_dict, rank=task, world_size=3, **kw)
    assert sorted(calls) == [2, 4, 5]
    with pytest.raises(ValueError, match="2 of 5 cells"):
        D.merge_cells(cells, decode=measurement_from_dict, **kw)
    part = D.merge_cells(cells, decode=measurement_from_dict, require_all=False, **kw)
    assert part.missing == (1, 4) and not part.complete and part.results[1] is None
    # the missing task, then a rerun of all that computes nothing new
    assert D.run_cells(cells, compute, encode=measurement_to_dict, rank=1, world_size=3, **kw)
    assert D.run_cells(cells, compute, encode=measurement_to_dict, **kw) == []
    grid = D.merge_cells(cells, decode=measurement_from_dict, **kw)
    assert grid.complete
    for q, m in zip(cells, grid.results, strict=True):
        assert measurement_to_dict(m) == measurement_to_dict(measure_last_layer(fs, q))
    # a garbled record is recomputed after a warning
    rec = next((tmp_path / "cells" / "test-grid").glob("*.json"))
    rec.write_text(rec.read_text().replace('"n": 200', '"n": 201'))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        redone = D.run_cells(cells, compute, encode=measurement_to_dict, **kw)
    assert len(redone) == 1 and any(issubclass(w.category, CacheWarning) for w in caught)
