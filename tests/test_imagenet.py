"""The ImageNet path of ``distortion run`` on a tiny generated ImageFolder of 1 000 classes,
torchvision ResNet-18 weights from a file (and from a "download"), the checks of many-class
stages, and ``distortion run --distributed`` under 2 gloo processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from distortion.cli import main
from distortion.commands.run import launched_distributed
from distortion.experiments import pipeline as P
from distortion.experiments.data import load_dataset, make_image_folder

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

REPO = Path(__file__).resolve().parents[1]
IMAGENET_TOML = REPO / "experiments" / "imagenet.toml"

#: The first ten ImageNet classes (WordNet ids), the classes of imagenet.toml's problems.
FIRST_TEN = (
    "n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
    "n01496331", "n01498041", "n01514668", "n01514859", "n01518878",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory) -> SimpleNamespace:
    """1 000 class folders of 16x16 PNG images: 6 in each of the first ten, 1 in the others
    (1 050 files), and a torchvision ResNet-18 with random weights saved as a user's file."""
    d = tmp_path_factory.mktemp("imagenet")
    names = list(FIRST_TEN) + [f"n9{k:07d}" for k in range(990)]
    val = make_image_folder(d / "val", names, per_class=[6] * 10 + [1] * 990, size=16)
    torch.manual_seed(0)
    weights = d / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return SimpleNamespace(root=d, val=val, weights=weights)


def _tiny_config(path: Path, **subs: str) -> Path:
    """experiments/imagenet.toml cut down to CPU size: ResNet-18, the first 200 images (the
    60 of the problems' classes and 140 single images of other classes), bits 4 and 8."""
    text = IMAGENET_TOML.read_text()
    rules = {
        r"^n = 0 .*$": "n = 200",
        r"^names = .*$": 'names = ["resnet18"]',
        r"^bits = \[.*\]$": "bits = [4, 8]",
        r"^n_realizations = .*$": "n_realizations = 39",
        r'^layers = "all"$': 'layers = "last"',
        r"^n = 500 .*$": "n = 40",
        **subs,
    }
    for pattern, repl in rules.items():
        text, count = re.subn(pattern, repl, text, flags=re.M)
        assert count, f"{pattern!r} not in {IMAGENET_TOML}"
    path.write_text(text)
    return path


def test_imagenet_toml_is_a_valid_configuration():
    cfg = P.ExperimentConfig.from_toml(IMAGENET_TOML)
    assert cfg.data_source == "imagenet" and cfg.models == ("resnet18", "resnet50")
    assert cfg.covariance == "pooled" and cfg.n is None
    assert cfg.all_layers_competitors is None  # commented out until gradient_grams has it
    assert [p.name for p in cfg.problems] == ["10-class", "tench-vs-goldfish"]
    assert cfg.problems[0].classes == FIRST_TEN
    assert "# competitors = 5" in IMAGENET_TOML.read_text()


def test_image_folder_of_1000_classes(tiny_imagenet):
    ds = load_dataset("imagenet", root=tiny_imagenet.val, n=200)
    assert ds.n_classes == 1000 and len(ds) == 200
    assert ds.class_names[:10] == FIRST_TEN and ds.dataset_id == "imagenet:test[n=200]"
    x, y = next(ds.batches(4))
    assert tuple(x.shape) == (4, 3, 224, 224) and y.tolist() == [0, 0, 0, 0]
    # --data PATH is the validation folder itself (or a folder holding data/imagenet/val)
    assert P._resolve_source("imagenet", str(tiny_imagenet.val)) == str(tiny_imagenet.val)
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        P._resolve_source("imagenet", str(tiny_imagenet.weights))


def test_user_weights_and_download_path(tiny_imagenet, tmp_path, monkeypatch):
    from distortion.experiments import models as M

    model = M.load_model("resnet18", tiny_imagenet.weights)  # any file name: no sha check
    info = M.model_info(model)
    assert info.n_classes == 1000 and info.weights == str(tiny_imagenet.weights)
    # the published file name with other bytes is refused (sha256 prefix of the release)
    fake = tmp_path / M.MODELS["resnet18"].checkpoint
    fake.write_bytes(tiny_imagenet.weights.read_bytes())
    with pytest.raises(ValueError, match="sha256"):
        M.load_model("resnet18", fake)
    with pytest.raises(ValueError, match="resnet18 but model is resnet50"):
        M.load_model("resnet50", tiny_imagenet.weights)
    # --download: the URL and hash prefix of the release go to torch.hub; here a file copy
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DISTORTION_WEIGHTS", raising=False)
    monkeypatch.setattr(P._paths, "weights_search_dirs", lambda: [])
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        Path(dst).write_bytes(tiny_imagenet.weights.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(FileNotFoundError, match="--download"):
        M.find_weights("resnet18")
    path = M.find_weights("resnet18", download=True)
    spec = M.MODELS["resnet18"]
    assert calls == [(spec.url, spec.sha256_prefix)] and path.name == spec.checkpoint
    assert path.parent == tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def imagenet_run(tiny_imagenet, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imagenet-run")
    cfg = _tiny_config(d / "tiny.toml")
    out = d / "out"
    status = main([
        "run", "--config", str(cfg), "--data", str(tiny_imagenet.val),
        "--weights", f"resnet18={tiny_imagenet.weights}", "--out", str(out),
        "--cache-dir", str(d / "cache"), "--quiet",
    ])  # fmt: skip
    assert status == 0
    return out


@pytest.mark.slow
def test_imagenet_run_end_to_end(imagenet_run):
    t = pd.read_csv(imagenet_run / "comparison.csv")
    # 2 problems x 2 granularities x 2 bit-widths, last layer only (K = 1000: no all-layer)
    assert len(t) == 8 and set(t["layers"]) == {"last"}
    assert set(t["problem"]) == {"10-class", "tench-vs-goldfish"}
    assert set(t["n_classes"]) == {10, 2}
    assert (t["n_fit"] == np.where(t["problem"] == "10-class", 30, 6)).all()  # 3 per class
    for c in ("L1_flip_rate", "L3_flip_rate", "measured_flip_rate"):
        assert t[c].between(0, 1).all(), c
    run = json.loads((imagenet_run / "run.json").read_text())
    skipped = run["runs"][-1]["skipped"]
    assert any("all layers" in k and "1000 classes > 100" in v for k, v in skipped.items())
    assert any("H_G" in k for k in skipped)
    summary = (imagenet_run / "summary.txt").read_text()
    assert "set all_layers.competitors" in summary and "resnet18" in summary
    assert (imagenet_run / "features" / "resnet18.npz").is_file()
    assert (imagenet_run / "hypotheses" / "resnet18").is_dir()


def test_many_classes_need_enough_fitting_images():
    fit = SimpleNamespace(class_names=("a", "b", "c"), labels=np.array([0, 0, 1, 2, 2]))
    P._check_fit_counts(fit, P.Problem("a-vs-c", ("a", "c")), 0.5)  # 2 each: fine
    with pytest.raises(ValueError, match=r"1 of its 3 classes have fewer than 2 images.*b \(1\)"):
        P._check_fit_counts(fit, P.Problem("all"), 0.5)


def test_competitors_key_is_checked():
    raw = {"all_layers": {"competitors": 5}}
    cfg = P.ExperimentConfig.from_dict(raw)
    assert cfg.all_layers_competitors == 5
    with pytest.raises(ValueError, match="all_layers.competitors must be an integer >= 1"):
        P.ExperimentConfig.from_dict({"all_layers": {"competitors": 0}})
    if P._competitors_supported():  # wired into gradient_grams and compare_all_layers
        P._check_competitors(cfg)
    else:
        with pytest.raises(ValueError, match="comment the key out"):
            P._check_competitors(cfg)


def test_launched_distributed_reads_the_launcher_environment():
    assert not launched_distributed({})
    assert not launched_distributed({"RANK": "0", "WORLD_SIZE": "1"})
    assert launched_distributed({"RANK": "1", "WORLD_SIZE": "2"})
    assert launched_distributed({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "MASTER_ADDR": "h"})
    assert not launched_distributed({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"})  # no master
    from distortion.cli import build_parser

    args = build_parser().parse_args(["run", "--distributed", "--download"])
    assert args.distributed and args.download


def test_sharded_measurements_are_what_compare_all_layers_reads(tmp_path, monkeypatch):
    """The key under which the distributed pipeline stores its sharded measurements is the
    one compare_all_layers looks up: it then measures nothing itself."""
    from torch import nn

    from distortion.experiments import measure as measure_module
    from distortion.experiments.compare import compare_all_layers
    from distortion.experiments.data import ImageDataset
    from distortion.quantize import UniformQuantizer

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).eval()
    rng = np.random.default_rng(0)
    data = ImageDataset.from_arrays(
        rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, 24), name="t"
    )
    qs = [UniformQuantizer(b, granularity="channel") for b in (3, 6)]
    P._shard_all_layer_inputs(model, data, qs, seed=0, cache=tmp_path, progress=False)

    def no_measure(*args, **kwargs):
        raise AssertionError("compare_all_layers measured instead of reading the cache")

    monkeypatch.setattr(measure_module, "measure", no_measure)
    cmp = compare_all_layers(model, data, qs, cache_dir=tmp_path, progress=False)
    assert len(cmp.table) == 2 and cmp.table["measured_flip_rate"].between(0, 1).all()


# ----------------------------------------------------------- distortion run --distributed
SMALL_DISTRIBUTED = """
name = "distributed-small"
[data]
n = 200
[models]
names = ["resnet20"]
[quantizer]
granularity = ["channel"]
[last_layer]
bits = [4, 8]
n_realizations = 39
problems = [{ name = "10-class" }]
[all_layers]
bits = [4, 8]
n = 60
[hypotheses]
bits = [4]
layers = "last"
"""  # all_layers.n = 60: two measurement shards (50 and 10 images), one per rank


def _run_cli(tmp: Path, out: Path, *, nproc: int) -> subprocess.CompletedProcess:
    cfg = tmp / "small.toml"
    cfg.write_text(SMALL_DISTRIBUTED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "agg"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launch = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}",
    ]  # fmt: skip
    cmd = [*launch, "-m", "distortion", "run", "--config", str(cfg), "--distributed",
           "--out", str(out), "--cache-dir", str(tmp / f"cache{nproc}"), "--quiet",
           "--no-figures"]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.real_data
@pytest.mark.slow
def test_distributed_run_matches_one_process(real_data, tmp_path):
    """``torchrun --nproc_per_node 2 -m distortion run --distributed`` writes, from rank 0,
    the same comparison as one process (extraction, Grams and measurements sharded)."""
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        proc = _run_cli(tmp_path, out, nproc=nproc)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        outs[nproc] = out
    a = pd.read_csv(outs[1] / "comparison.csv")
    b = pd.read_csv(outs[2] / "comparison.csv")
    assert len(a) == 4 and set(a["layers"]) == {"last", "all"}
    pd.testing.assert_frame_equal(a, b)
    run = json.loads((outs[2] / "run.json").read_text())["runs"][-1]
    assert run["world_size"] == 2
    shards = list((tmp_path / "cache2" / "shards").rglob("*"))
    assert not [p for p in shards if p.is_file()]  # merged, then removed
    assert list((tmp_path / "cache2" / "measurements-sharded").glob("*.json"))
