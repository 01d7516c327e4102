"""``distortion figures``: regenerate the paper's figures and tables from a results folder.

Example::

    distortion figures                                   # experiments/results/default -> paper/
    distortion figures --results experiments/results/small --out /tmp/paper

Runs every ``paper/figures/fig_*.py`` (PDF figures into ``<out>/figures/``) and
``paper/tables/make_tables.py`` (LaTeX tables into ``<out>/tables/``) — what ``make -C paper``
does before building the PDF. The scripts live in the source tree (``paper/``), not in the
installed package. Light module: matplotlib is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``figures`` subcommand to ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "figures",
        help="regenerate the paper's figures and tables from the results of `distortion run`",
        description=(
            "Run every paper/figures/fig_*.py and paper/tables/make_tables.py on a results "
            "folder: PDF figures into OUT/figures, LaTeX tables into OUT/tables."
        ),
    )
    p.add_argument(
        "--results",
        metavar="DIR",
        help="results folder of `distortion run` (default $DISTORTION_RESULTS or "
        "experiments/results/default)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="paper folder to write figures/ and tables/ into (default paper/)",
    )
    p.add_argument(
        "--paper",
        metavar="DIR",
        help="folder holding the figure and table scripts (default: the source tree's paper/)",
    )
    return p


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_distortion_paper_{path.stem}", path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
        raise ValueError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    """Draw every figure and write every table; print the paths written."""
    from distortion.experiments import _paths

    paper = Path(args.paper).expanduser() if args.paper else _paths.repo_root() / "paper"
    scripts = sorted((paper / "figures").glob("fig_*.py"))
    tables = paper / "tables" / "make_tables.py"
    if not scripts or not tables.is_file():
        raise FileNotFoundError(
            f"no figure scripts in {paper / 'figures'} (or no {tables}): run from a source "
            "checkout of distortion or pass --paper DIR"
        )
    helpers = str(paper / "figures")
    for name in ("_paths", "_style"):  # the helpers of this paper folder, not a stale copy
        sys.modules.pop(name, None)
    sys.path.insert(0, helpers)
    try:
        import _paths as paper_paths
        import _style

        results = paper_paths.results_dir(args.results)
        if not (results / "comparison.csv").is_file():
            raise FileNotFoundError(
                f"no comparison.csv in {results}: run `distortion run` first or pass "
                "--results DIR of a finished run"
            )
        import matplotlib

        written: list[Path] = []
        with matplotlib.rc_context():  # the paper style must not leak into the caller
            _style.setup()
            for script in scripts:
                written += _load(script).make(results, paper_paths.figures_dir(args.out))
            written += _load(tables).make(results, paper_paths.tables_dir(args.out))
    finally:
        sys.path.remove(helpers)
    for p in written:
        print(p)
    print(f"{len(written)} files from {results}", file=sys.stderr)
    return 0
