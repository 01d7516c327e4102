"""The package's public surface: lazy imports, __all__, no heavy dependency at import."""

import subprocess
import sys

import pytest

import distortion


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_loads_neither_scipy_pandas_torch_nor_matplotlib():
    mods = _run(
        "import sys, distortion; "
        "print(sorted(m for m in ('scipy', 'pandas', 'torch', 'matplotlib') if m in sys.modules))"
    )
    assert mods == "[]"


def test_every_public_name_resolves_and_star_import_works():
    for name in distortion.__all__:
        assert getattr(distortion, name) is not None, name
    assert set(distortion.__all__) <= set(dir(distortion))
    assert _run("from distortion import *; print(UniformQuantizer.__name__)") == "UniformQuantizer"
    assert distortion.binary_distortion.__name__ == "distortion"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        distortion.nope  # noqa: B018
