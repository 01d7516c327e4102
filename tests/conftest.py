"""Shared fixtures: the shared-data folder and session-wide real feature extractions.

Real data lives in ``$DISTORTION_DATA`` (default ``<repo>/../shared``): the CIFAR-10 test
images and the ResNet-20/56 checkpoints. Tests that read it are marked ``real_data`` and
use the :func:`real_data` fixture, which FAILS (never skips) when the folder is absent:
CI always has it.

Session fixtures for other test modules:

- ``real_data``: Path of the shared folder.
- ``cifar10_test``: the 10 000 CIFAR-10 test images (``ImageDataset``).
- ``resnet20_features``, ``resnet56_features``: ``FeatureSet`` of each model on all 10 000
  images, extracted once per test session into a session-temporary cache (read-only arrays;
  do not rely on their ``provenance["cache"]``).
- ``resnet20_model``, ``resnet56_model``: function-scoped fresh models in eval mode (loading
  is cheap), so a test may modify its weights in place without affecting other tests.
- ``feature_cache_dir``: the session cache folder used by the feature fixtures.

``$DISTORTION_CACHE`` points at a session-temporary folder during the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CIFAR10_NPZ = Path("data") / "cifar10" / "test.npz"
CIFAR_MODELS = Path("models") / "cifar10-resnet"
CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}


def shared_data_path() -> Path:
    """``$DISTORTION_DATA``, else ``<repo>/../shared`` (whether or not it exists)."""
    return Path(os.environ.get("DISTORTION_DATA", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared-data folder; fails with a clear message when it or its files are absent."""
    root = shared_data_path()
    needed = [root / CIFAR10_NPZ] + [root / CIFAR_MODELS / f for f in CHECKPOINTS.values()]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.fail(
            f"real data missing: {', '.join(missing)}. Set DISTORTION_DATA to the shared-data "
            "folder (holding data/cifar10/test.npz and models/cifar10-resnet/*.th); by default "
            f"it is {REPO.parent / 'shared'}. CI always has it.",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature cache folder shared by the whole test session."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session", autouse=True)
def _no_cache_in_home(tmp_path_factory: pytest.TempPathFactory):
    """Point $DISTORTION_CACHE at a session folder: tests never write to ~/.cache/distortion."""
    old = os.environ.get("DISTORTION_CACHE")
    os.environ["DISTORTION_CACHE"] = str(tmp_path_factory.mktemp("default-cache"))
    yield
    if old is None:
        os.environ.pop("DISTORTION_CACHE", None)
    else:
        os.environ["DISTORTION_CACHE"] = old


@pytest.fixture(scope="session")
def cifar10_test(real_data: Path):
    """The 10 000 CIFAR-10 test images with the CIFAR preprocessing."""
    from distortion.experiments.data import load_dataset

    return load_dataset(real_data / CIFAR10_NPZ)


def _load(real_data: Path, name: str):
    from distortion.experiments.models import load_model

    return load_model(name, real_data / CIFAR_MODELS / CHECKPOINTS[name])


@pytest.fixture
def resnet20_model(real_data: Path):
    """A fresh ResNet-20 with the shared checkpoint, eval mode."""
    return _load(real_data, "resnet20")


@pytest.fixture
def resnet56_model(real_data: Path):
    """A fresh ResNet-56 with the shared checkpoint, eval mode."""
    return _load(real_data, "resnet56")


def _features(real_data: Path, name: str, dataset, cache: Path):
    from distortion.experiments.features import extract_features

    return extract_features(
        _load(real_data, name), dataset, batch_size=500, cache_dir=cache, progress=False
    )


@pytest.fixture(scope="session")
def resnet20_features(real_data: Path, cifar10_test, feature_cache_dir: Path):
    """FeatureSet of ResNet-20 on the 10 000 CIFAR-10 test images (once per session)."""
    return _features(real_data, "resnet20", cifar10_test, feature_cache_dir)


@pytest.fixture(scope="session")
def resnet56_features(real_data: Path, cifar10_test, feature_cache_dir: Path):
    """FeatureSet of ResNet-56 on the 10 000 CIFAR-10 test images (once per session)."""
    return _features(real_data, "resnet56", cifar10_test, feature_cache_dir)
