"""Every path and size that the paper's figure and table scripts use, in one place.

The results folder is ``--results DIR``, else ``$DISTORTION_RESULTS``, else
``experiments/results/default`` (what ``distortion run`` writes). The two-class simulation
table is ``$DISTORTION_SIMULATION``, else ``<results>/../simulation_binary/table.csv``
(written by ``experiments/simulation_binary.py``). The compression families' summary is
``$DISTORTION_COMPRESSION``, else ``<results>/compression/compression_summary.csv`` when the
run had a compression stage, else the one of the compression run beside it,
``<results>/../compression/compression/compression_summary.csv`` (``distortion run --config
experiments/compression.toml``). Outputs go to ``<out>/figures`` and
``<out>/tables`` with ``out`` = ``--out DIR``, else ``paper/``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = [
    "MATPLOTLIBRC",
    "PAPER",
    "REPO",
    "TEXT_WIDTH_IN",
    "compression_summary",
    "figures_dir",
    "parse_args",
    "results_dir",
    "simulation_table",
    "tables_dir",
]

PAPER = Path(__file__).resolve().parents[1]
REPO = PAPER.parent
MATPLOTLIBRC = PAPER / "matplotlibrc"
DEFAULT_RESULTS = REPO / "experiments" / "results" / "default"

#: ``\textwidth`` of main.tex (its geometry sets ``textwidth=6.5in``): figures are drawn at
#: this width, or a fraction of it, and included without scaling, so that their 7-8 pt
#: fonts stay 7-8 pt on the page.
TEXT_WIDTH_IN = 6.5


def results_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The experiment's results folder (holding ``comparison.csv``)."""
    if path is None:
        path = os.environ.get("DISTORTION_RESULTS") or DEFAULT_RESULTS
    return Path(path).expanduser().resolve()


def simulation_table(results: Path) -> Path:
    """The two-class simulation study's ``table.csv`` (may not exist)."""
    env = os.environ.get("DISTORTION_SIMULATION")
    if env:
        return Path(env).expanduser().resolve()
    return results.parent / "simulation_binary" / "table.csv"


def compression_summary(results: Path) -> Path:
    """The compression families' ``compression_summary.csv`` (may not exist)."""
    env = os.environ.get("DISTORTION_COMPRESSION")
    if env:
        return Path(env).expanduser().resolve()
    own = results / "compression" / "compression_summary.csv"
    if own.is_file():
        return own
    return results.parent / "compression" / "compression" / "compression_summary.csv"


def _out(out: str | os.PathLike[str] | None, sub: str) -> Path:
    d = (Path(out).expanduser().resolve() if out is not None else PAPER) / sub
    d.mkdir(parents=True, exist_ok=True)
    return d


def figures_dir(out: str | os.PathLike[str] | None = None) -> Path:
    """Where figure PDFs go: ``<out>/figures`` (created)."""
    return _out(out, "figures")


def tables_dir(out: str | os.PathLike[str] | None = None) -> Path:
    """Where generated LaTeX tables go: ``<out>/tables`` (created)."""
    return _out(out, "tables")


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """``--results DIR`` and ``--out DIR`` of every script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--results", metavar="DIR", help="results folder of `distortion run`")
    p.add_argument("--out", metavar="DIR", help="paper folder to write into (default paper/)")
    return p.parse_args(argv)
