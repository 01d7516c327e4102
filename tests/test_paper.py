"""The paper's figures and tables regenerate from a small run of the experiment.

``small_results`` runs :func:`distortion.experiments.pipeline.run_experiment` on a tiny
configuration (ResNet-20, 300 CIFAR-10 test images, 3 and 6 bits, per-tensor steps, two
compression families on 40 images; about a minute and a half on 2 cores with a cold cache)
and adds a synthetic two-class simulation table (the real one,
``experiments/simulation_binary.py``, takes much longer). Every figure script and
the table script run through ``distortion figures`` and through the Makefile; the checks are
on what they write: files, PDF page width = the LaTeX text width, booktabs tables, and the
numbers that main.tex quotes, recomputed independently from ``comparison.csv``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from _comparison_data import synthetic_simulation_table, synthetic_table

from distortion import cli

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "paper"
TEXT_WIDTH_PT = 6.5 * 72  # paper/figures/_paths.py TEXT_WIDTH_IN, main.tex geometry

#: Figures of a run with one model and one granularity (a second granularity adds
#: flip_vs_bits_<g>.pdf and loss_vs_bits_<g>.pdf).
FIGURES = {
    "flip_vs_bits", "loss_vs_bits", "predicted_vs_measured", "abs_error_vs_bits",
    "hypotheses_gaussian", "hypotheses_uniform", "simulation_binary",
}  # fmt: skip
TABLES = {
    "summary", "cells", "cells_caption", "cells_all", "cells_all_caption",
    "hypotheses_gaussian", "hypotheses_uniform", "simulation", "compression", "numbers",
    "incomplete",
}  # fmt: skip
NOT_TABULAR = {"numbers", "cells_caption", "cells_all_caption", "incomplete"}

TINY = {
    "name": "paper-tiny",
    "data": {"n": 300},
    "models": {"names": ["resnet20"]},
    "quantizer": {"granularity": ["tensor"]},
    "last_layer": {"bits": [3, 6], "n_realizations": 50, "problems": [{"name": "10-class"}]},
    "all_layers": {"bits": [3, 6], "n": 40},
    "hypotheses": {"bits": [3, 6]},
    "compression": {"n": 40, "families": ["prune-layer", "svd-energy"]},
}


@pytest.fixture(scope="module")
def small_results(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distortion.experiments.pipeline import ExperimentConfig, run_experiment

    root = tmp_path_factory.mktemp("results")
    run_experiment(
        ExperimentConfig.from_dict(TINY), data=str(real_data), out_dir=root / "paper-tiny",
        cache_dir=root / "cache", figures=False, progress=False, stream=io.StringIO(),
    )  # fmt: skip
    (root / "simulation_binary").mkdir()
    synthetic_simulation_table().to_csv(root / "simulation_binary" / "table.csv", index=False)
    return root / "paper-tiny"


@pytest.fixture(scope="module")
def generated(small_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import matplotlib

    out = tmp_path_factory.mktemp("paper-out")
    before = dict(matplotlib.rcParams)
    assert cli.main(["figures", "--results", str(small_results), "--out", str(out)]) == 0
    # the paper style (constrained layout, fonts, seaborn theme) does not leak to the caller
    after = dict(matplotlib.rcParams)
    assert {k for k in before if k != "backend" and before[k] != after[k]} == set()
    return out


def _page_width(pdf: Path) -> float:
    num = rb"\s*([-\d.]+)"
    box = re.search(rb"/MediaBox\s*\[" + num * 4, pdf.read_bytes())
    assert box, f"no MediaBox in {pdf}"
    return float(box.group(3)) - float(box.group(1))


def _numbers(path: Path) -> dict[str, str]:
    return dict(re.findall(r"\\resdef\{([^}]*)\}\{([^}]*)\}", path.read_text()))


@pytest.mark.slow
@pytest.mark.real_data
def test_every_figure_is_a_pdf_at_text_width(generated):
    pdfs = {p.stem: p for p in (generated / "figures").glob("*.pdf")}
    assert set(pdfs) == FIGURES
    for name, p in pdfs.items():
        assert p.read_bytes()[:5] == b"%PDF-", name
        assert _page_width(p) == pytest.approx(TEXT_WIDTH_PT, abs=1.0), name


@pytest.mark.slow
@pytest.mark.real_data
def test_every_table_is_booktabs(generated):
    tex = {p.stem: p for p in (generated / "tables").glob("*.tex")}
    assert set(tex) == TABLES
    for name in TABLES - NOT_TABULAR:
        body = tex[name].read_text()
        for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"):
            assert rule in body, (name, rule)
        assert "nan" not in body.lower(), name
        assert "not available" not in body, name
    # a complete results folder: no note of missing inputs on the first page
    assert r"\item" not in tex["incomplete"].read_text()


@pytest.mark.slow
@pytest.mark.real_data
def test_tables_hold_the_results(generated, small_results):
    t = pd.read_csv(small_results / "comparison.csv")
    last = t[t["layers"] == "last"]
    nums = _numbers(generated / "tables" / "numbers.tex")
    # independent recomputation of the quoted means (percentage points, 2 decimals)
    assert nums["err:L3:last"] == f"{100 * last['L3_flip_rate_abs_error'].mean():.2f}"
    assert nums["err:L1:last"] == f"{100 * last['L1_flip_rate_abs_error'].mean():.2f}"
    assert nums["inband:last"] == f"{100 * last['L3_flip_rate_in_band'].mean():.0f}"
    assert nums["cells"] == str(len(t))
    run = json.loads((small_results / "run.json").read_text())
    assert nums["acc:resnet20"] == f"{100 * run['accuracies']['resnet20']:.2f}"
    assert nums["n:images"] == "300"
    # the summary's first two rows are the first group's means below 4 bits and from 4 on
    g = t[(t["model"] == "resnet20") & (t["problem"] == "10-class") & (t["layers"] == "last")
          & (t["granularity"] == "tensor")]  # fmt: skip
    summary = (generated / "tables" / "summary.tex").read_text()
    rows = [ln for ln in summary.splitlines() if ln.startswith("ResNet-20 & 10-class & last")]
    for row, part in zip(rows[:2], (g[g["bits"] < 4], g[g["bits"] >= 4]), strict=True):
        cells = [c.strip(" \\") for c in row.split("&")]
        lo, hi = part["bits"].min(), part["bits"].max()
        assert cells[4] == (f"{lo}" if lo == hi else f"{lo}--{hi}")
        assert cells[5] == str(len(part))
        assert cells[8] == f"{100 * part['L3_flip_rate_abs_error'].mean():.2f}"
    # all layers: the level-3 numbers are the linearized model's (L3L), level 1 is "--"
    a = t[t["layers"] == "all"]
    assert nums["bits:split"] == "4"
    high, low = a[a["bits"] >= 4], a[a["bits"] < 4]
    assert nums["inband:all:high"] == f"{100 * high['L3L_flip_rate_in_band'].mean():.0f}"
    assert nums["err:L3:all:low"] == f"{100 * low['L3L_flip_rate_abs_error'].mean():.2f}"
    rows = [ln for ln in summary.splitlines() if ln.startswith("ResNet-20 & 10-class & all")]
    assert rows and all(row.split("&")[6].strip() == "--" for row in rows)
    # the cell-by-cell table lists every bit-width of the first series
    body = (generated / "tables" / "cells.tex").read_text()
    bits_rows = [ln.split("&")[0].strip() for ln in body.splitlines() if re.match(r"^\d+ &", ln)]
    assert bits_rows == [str(b) for b in sorted(g["bits"])]


@pytest.mark.slow
@pytest.mark.real_data
def test_compression_table_holds_the_families(generated, small_results):
    """The compression table and its quoted numbers, recomputed from the cells of
    ``compression/compression.csv`` (not from the summary the table is made of)."""
    c = pd.read_csv(small_results / "compression" / "compression.csv")
    used = c[c["measured_flip_rate"] <= 0.2]
    nums = _numbers(generated / "tables" / "numbers.tex")
    assert nums["comp:families"] == "2"
    assert nums["comp:cells"] == str(len(c))
    assert nums["comp:cells:used"] == str(len(used))
    assert nums["comp:maxflip"] == "0.2"
    assert nums["comp:inband"] == f"{100 * used['L3L_flip_rate_in_band'].astype(float).mean():.0f}"
    body = (generated / "tables" / "compression.tex").read_text()
    for family, label in (("prune-layer", "pruning, per layer"), ("svd-energy", "truncated SVD")):
        row = next(ln for ln in body.splitlines() if f"& {label} &" in ln)
        cells = [x.strip(" \\") for x in row.split("&")]
        f = c[c["family"] == family]
        fu = used[used["family"] == family]
        assert cells[0] == "ResNet-20"
        assert cells[3] == f"{len(fu)}/{len(f)}"
        assert cells[4] == f"{100 * fu['L3L_flip_rate_in_band'].astype(float).mean():.0f}"
        assert cells[6] == f"{100 * fu['L3L_flip_rate_abs_error'].mean():.2f}"


@pytest.mark.slow
@pytest.mark.real_data
def test_main_tex_uses_what_is_generated(generated):
    lines = (PAPER / "main.tex").read_text().splitlines()
    tex = "\n".join(ln for ln in lines if not ln.lstrip().startswith("%"))
    assert set(re.findall(r"\\maybegraphic\{([^}]*)\}", tex)) <= FIGURES
    assert set(re.findall(r"\\maybetable\{([^}]*)\}", tex)) <= TABLES
    keys = set(re.findall(r"\\res\{([^}]*)\}", tex))
    missing = keys - set(_numbers(generated / "tables" / "numbers.tex"))
    assert not missing, f"main.tex quotes \\res keys that make_tables.py does not write: {missing}"


@pytest.mark.slow
@pytest.mark.real_data
def test_makefile_regenerates_figures_and_tables(small_results, tmp_path):
    """``make -C paper`` runs every figure script (checked with ``make -n``); one figure and
    the tables are made for real (each script is a fresh Python process: all of them would
    take a minute), and a second run has nothing to do."""
    if shutil.which("make") is None:
        pytest.fail("`make` is needed to test paper/Makefile", pytrace=False)
    copy = tmp_path / "paper"
    shutil.copytree(PAPER, copy, ignore=shutil.ignore_patterns("build", "*.pdf", "__pycache__"))
    for d in ("figures", "tables"):  # only the scripts: outputs must come from make
        for p in (copy / d).iterdir():
            if p.suffix == ".tex":
                p.unlink()
    env = {**os.environ, "MPLBACKEND": "agg"}
    args = [f"RESULTS={small_results}", f"PYTHON={sys.executable}"]

    def make(*targets: str, dry: bool = False) -> str:
        cmd = ["make", "-C", str(copy), *(["-n"] if dry else []), *targets, *args]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout

    planned = make("all", dry=True)
    for script in (PAPER / "figures").glob("fig_*.py"):
        assert f"figures/{script.name} --results {small_results}" in planned, script.name
    assert f"tables/make_tables.py --results {small_results}" in planned
    assert "latexmk" in planned
    make("tables", "build/fig_abs_error.stamp")
    assert {p.stem for p in (copy / "tables").glob("*.tex")} == TABLES
    assert [p.name for p in (copy / "figures").glob("*.pdf")] == ["abs_error_vs_bits.pdf"]
    again = make("tables", "build/fig_abs_error.stamp", dry=True)
    assert "make_tables.py --results" not in again
    assert "fig_abs_error.py --results" not in again


@pytest.mark.slow
def test_two_granularities_and_missing_inputs(tmp_path, monkeypatch):
    """A second granularity gets its own flip/loss figures; inputs that a results folder
    lacks (hypothesis tests, simulation table, run.json) give no figure and a placeholder
    table, and the rest is still made."""
    from distortion.experiments.compare import Comparison

    monkeypatch.delenv("DISTORTION_SIMULATION", raising=False)
    monkeypatch.delenv("DISTORTION_COMPRESSION", raising=False)
    res = tmp_path / "results" / "bare"
    Comparison(synthetic_table(bits=(3, 6))).save(res)
    out = tmp_path / "out"
    assert cli.main(["figures", "--results", str(res), "--out", str(out)]) == 0
    figs = {p.stem for p in (out / "figures").glob("*.pdf")}
    absent = {"hypotheses_gaussian", "hypotheses_uniform", "simulation_binary"}
    assert figs == (FIGURES - absent) | {"flip_vs_bits_channel", "loss_vs_bits_channel"}
    assert "not available" in (out / "tables" / "hypotheses_gaussian.tex").read_text()
    assert "not available" in (out / "tables" / "simulation.tex").read_text()
    assert "not available" in (out / "tables" / "compression.tex").read_text()
    assert r"\resdef{cells}{" in (out / "tables" / "numbers.tex").read_text()
    # the first page of the PDF names what is missing
    note = (out / "tables" / "incomplete.tex").read_text()
    assert "Incomplete results" in note
    assert "run.json" in note and "hypothesis tests" in note and "simulation" in note
    assert "compression families" in note


def test_figures_command_errors(tmp_path, capsys):
    assert cli.main(["figures", "--results", str(tmp_path / "none")]) == 2
    assert "no comparison.csv" in capsys.readouterr().err
    assert cli.main(["figures", "--paper", str(tmp_path), "--results", str(tmp_path)]) == 2
    assert "no figure scripts" in capsys.readouterr().err


def _make_tables_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_tables", PAPER / "tables" / "make_tables.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tables_write_a_dash_for_what_does_not_apply(tmp_path):
    """Not applicable or missing is "--" in every generated table, never "nan": level 1 of the
    all-layer rows, and the H_U verdicts of a bit-width that only one model was tested at."""
    from types import SimpleNamespace

    mt = _make_tables_module()
    t = synthetic_table(bits=(3, 6))
    summary = mt.summary_table(t)
    assert "nan" not in summary.lower()
    rows = [ln for ln in summary.splitlines() if " & all & " in ln]
    assert rows and all(r.split("&")[6].strip() == "--" for r in rows)

    def report(bits):
        cols = {("per_tensor", "last layer"): pd.Series({b: "holds" for b in bits}),
                ("per_tensor", "layers h/m/f"): pd.Series({b: "3/0/0" for b in bits})}  # fmt: skip
        return SimpleNamespace(uniform_summary=lambda: pd.DataFrame(cols))

    body = mt.hypotheses_uniform_table({"resnet20": report([2, 4, 8]), "resnet56": report([4])})
    assert "nan" not in body.lower()
    row2 = next(ln for ln in body.splitlines() if ln.startswith("2 &"))
    assert [c.strip(" \\") for c in row2.split("&")][3:] == ["--", "--"]


@pytest.mark.slow
def test_makefile_refuses_incomplete_results(tmp_path, monkeypatch):
    """A results folder without run.json, hypothesis tests and simulation table: ``make``
    stops (non-zero) and says on stderr what is missing and which command makes it; with
    ALLOW_INCOMPLETE=1 it builds, warns on stderr and puts the list in the PDF. LaTeX is
    not needed (the ``tables`` target)."""
    from distortion.experiments.compare import Comparison

    if shutil.which("make") is None:
        pytest.fail("`make` is needed to test paper/Makefile", pytrace=False)
    monkeypatch.delenv("DISTORTION_SIMULATION", raising=False)
    monkeypatch.delenv("DISTORTION_COMPRESSION", raising=False)
    res = tmp_path / "results" / "bare"
    Comparison(synthetic_table(bits=(3, 6))).save(res)
    copy = tmp_path / "paper"
    shutil.copytree(PAPER, copy, ignore=shutil.ignore_patterns("build", "*.pdf", "__pycache__"))
    for p in (copy / "tables").glob("*.tex"):
        p.unlink()
    env = {**os.environ, "MPLBACKEND": "agg"}
    env.pop("DISTORTION_SIMULATION", None)
    env.pop("DISTORTION_COMPRESSION", None)
    cmd = ["make", "-C", str(copy), "tables", f"RESULTS={res}", f"PYTHON={sys.executable}"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert run.returncode != 0, run.stdout
    err = run.stderr
    assert "incomplete" in err
    assert "run.json" in err and "hypothesis tests of resnet20, resnet56" in err
    assert "simulation_binary/table.csv" in err
    assert "compression/compression/compression_summary.csv" in err
    assert "`distortion run`" in err and "`python experiments/simulation_binary.py`" in err
    assert "`distortion run --config experiments/compression.toml`" in err
    assert "ALLOW_INCOMPLETE=1" in err
    assert not list((copy / "tables").glob("*.tex")), "tables were made from incomplete results"

    run = subprocess.run([*cmd, "ALLOW_INCOMPLETE=1"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "warning" in run.stderr and "hypothesis tests" in run.stderr
    note = (copy / "tables" / "incomplete.tex").read_text()
    assert note.count(r"\item") == 4 and "hypothesis tests of resnet20, resnet56" in note
    # main.tex prints the note on its first page
    assert r"\InputIfFileExists{tables/incomplete}" in (PAPER / "main.tex").read_text()


def test_missing_inputs_mixed_runs(tmp_path, monkeypatch):
    """Hypothesis tests of a model that the comparison lacks (results of two runs mixed),
    and a comparison without all-layer rows, are incomplete results."""
    sys.path.insert(0, str(PAPER / "figures"))
    import _inputs

    monkeypatch.delenv("DISTORTION_SIMULATION", raising=False)
    monkeypatch.delenv("DISTORTION_COMPRESSION", raising=False)
    res = tmp_path / "results" / "mixed"
    res.mkdir(parents=True)
    t = synthetic_table(models=("resnet20",), bits=(3, 6))
    t[t["layers"] == "last"].to_csv(res / "comparison.csv", index=False)
    (res / "run.json").write_text(json.dumps({"config": {"n": 100},
                                              "accuracies": {"resnet20": 0.9}}))  # fmt: skip
    for m in ("resnet20", "resnet56"):
        (res / "hypotheses" / m).mkdir(parents=True)
        for n in ("gaussian", "uniform"):
            (res / "hypotheses" / m / f"hypotheses_{n}.csv").write_text("a\n1\n")
    (res.parent / "simulation_binary").mkdir()
    synthetic_simulation_table().to_csv(res.parent / "simulation_binary" / "table.csv")
    # the compression summary of a compression run beside it
    (res.parent / "compression" / "compression").mkdir(parents=True)
    (res.parent / "compression" / "compression" / "compression_summary.csv").write_text("a\n1\n")
    found = [str(m) for m in _inputs.missing_inputs(res)]
    assert len(found) == 2, found
    assert "all-layer rows" in found[0]
    assert "resnet56" in found[1] and "mixed" in found[1]
    (res / "hypotheses" / "resnet56" / "hypotheses_gaussian.csv").unlink()
    t.to_csv(res / "comparison.csv", index=False)
    assert _inputs.missing_inputs(res) == []
    assert _inputs.main(["--results", str(res)]) == 0


def test_one_initial_for_resmerita():
    """The first author of the SSP 2021 paper (doi:10.1109/SSP49050.2021.9513733) is
    D. Resmerita, wherever the repository cites it with an initial."""
    wrong = []
    pattern = re.compile(r"\b([A-Z])\.(?:~|\s)*Resmerita")
    dirs = ["distortion", "theory", "paper", "notebooks", "tests", "benchmarks", "experiments"]
    files = [REPO / "README.md"]
    for d in dirs:
        files += [p for p in (REPO / d).rglob("*") if p.suffix in
                  {".py", ".md", ".tex", ".ipynb", ".toml", ".txt", ".rst", ".bib"}]  # fmt: skip
    for f in files:
        if "results" in f.relative_to(REPO).parts:
            continue
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            wrong += [f"{f.relative_to(REPO)}:{n}: {line.strip()}"
                      for m in pattern.finditer(line) if m.group(1) != "D"]  # fmt: skip
    assert not wrong, "\n".join(wrong)
    bib = (PAPER / "main.tex").read_text()
    assert "D.~Resmerita" in bib and "10.1109/SSP49050.2021.9513733" in bib
