"""Every notebook in notebooks/ runs top to bottom (nbclient), is stored without outputs,
and stays thin and fast (each under 2 minutes)."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 120  # per notebook: the project's budget for one notebook


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {
        "01_gaussian_hypothesis",
        "02_uniform_error_hypothesis",
        "03_predicted_vs_measured",
        "04_estimator_quickstart",
        "05_compression",
    } <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs_and_thin(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the outputs"
            # nothing a user would want to import is defined in a notebook
            assert not any(ln.startswith(("def ", "class ")) for ln in cell.source.splitlines())
    assert any("import distortion" in c.source or "from distortion" in c.source for c in nb.cells)
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 2


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, real_data: Path, monkeypatch: pytest.MonkeyPatch):
    from nbclient import NotebookClient

    # the kernel inherits the environment: the shared data, the session cache (conftest),
    # no results folder of a full run (the notebooks then compute their small example)
    monkeypatch.setenv("DISTORTION_DATA", str(real_data))
    monkeypatch.setenv("DISTORTION_RESULTS", str(path.parent / "no-such-results"))
    # inline figures even where CI exports MPLBACKEND=agg (which would show none)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    assert elapsed < TIMEOUT_S, f"{path.name} took {elapsed:.0f} s"
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    # every figure cell produced an image
    images = sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert images >= 1
