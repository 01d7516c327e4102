"""Which inputs of the paper a results folder lacks, and the command that produces each.

``make -C paper`` runs this first (``python figures/_inputs.py --results DIR``): it exits
with status 1 and lists on stderr what is missing, unless ``--allow-incomplete``
(``make -C paper ALLOW_INCOMPLETE=1``), which only warns; ``tables/make_tables.py`` then
writes ``tables/incomplete.tex``, a box at the top of the PDF naming the missing inputs.

A complete folder holds ``comparison.csv`` with last-layer and all-layer rows, ``run.json``
with the float accuracy of every model, ``hypotheses/<model>/`` for every model of the
comparison (and for no other), the two-class simulation table, and the compression families'
summary (``_paths.compression_summary``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import _paths

__all__ = ["Missing", "main", "missing_inputs"]

RUN = "distortion run"
SIMULATION = "python experiments/simulation_binary.py"
COMPRESSION = "distortion run --config experiments/compression.toml"


@dataclass(frozen=True)
class Missing:
    """One input the paper needs and the results folder lacks."""

    what: str  # what is missing, e.g. "comparison.csv"
    command: str  # the command that produces it

    def __str__(self) -> str:
        return f"{self.what}: run `{self.command}`"


def _table_models(csv: Path) -> tuple[list[str], set[str]]:
    import pandas as pd

    t = pd.read_csv(csv, usecols=lambda c: c in ("model", "layers"))
    models = list(dict.fromkeys(t["model"].astype(str))) if "model" in t else []
    layers = set(t["layers"].astype(str)) if "layers" in t else set()
    return models, layers


def missing_inputs(results: Path) -> list[Missing]:
    """Every input of the paper that ``results`` lacks (empty: the folder is complete)."""
    out: list[Missing] = []
    csv = results / "comparison.csv"
    models: list[str] = []
    if not csv.is_file():
        out.append(Missing(f"no {csv} (every figure and results table)", RUN))
    else:
        models, layers = _table_models(csv)
        for s, what in (("last", "last-layer"), ("all", "all-layer")):
            if s not in layers:
                out.append(Missing(f"comparison.csv has no {what} rows (layers={s!r})", RUN))
    run_file = results / "run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else None
    if run is None:
        out.append(Missing(f"no {run_file} (image count, float accuracy)", RUN))
    else:
        accs = run.get("accuracies") or {}
        lacking = [m for m in models if m not in accs]
        if lacking or not accs:
            who = ", ".join(lacking) or "any model"
            out.append(Missing(f"run.json has no float accuracy of {who}", RUN))
    hyp = results / "hypotheses"
    have = sorted(d.name for d in hyp.iterdir() if (d / "hypotheses_gaussian.csv").is_file()
                  and (d / "hypotheses_uniform.csv").is_file()) if hyp.is_dir() else []  # fmt: skip
    lacking = [m for m in models if m not in have]
    if lacking or (not models and not have):
        out.append(Missing(f"no hypothesis tests of {', '.join(lacking) or 'any model'} "
                           f"(in {hyp}/MODEL/)", RUN))  # fmt: skip
    stray = [m for m in have if models and m not in models]
    if stray:
        out.append(Missing(f"hypotheses/ holds {', '.join(stray)}, which comparison.csv lacks "
                           "(results of different runs mixed)", RUN))  # fmt: skip
    sim = _paths.simulation_table(results)
    if not sim.is_file():
        out.append(Missing(f"no {sim} (two-class simulation figure and table)", SIMULATION))
    comp = _paths.compression_summary(results)
    if not comp.is_file():
        out.append(Missing(f"no {comp} (compression families table)", COMPRESSION))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", metavar="DIR", help="results folder of `distortion run`")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="only warn (the PDF then says what is missing)")  # fmt: skip
    args = p.parse_args(argv)
    results = _paths.results_dir(args.results)
    missing = missing_inputs(results)
    if not missing:
        return 0
    lines = "\n".join(f"  - {m}" for m in missing)
    if args.allow_incomplete:
        print(f"warning: ALLOW_INCOMPLETE=1: the paper is built from incomplete results in "
              f"{results}; missing:\n{lines}\n(the PDF says so on its first page)",
              file=sys.stderr)  # fmt: skip
        return 0
    print(f"error: the results in {results} are incomplete; missing:\n{lines}\n"
          "Produce them with the commands above, pass RESULTS=DIR of a complete run, or "
          "build anyway with `make -C paper ALLOW_INCOMPLETE=1` (the PDF then lists what "
          "is missing).", file=sys.stderr)  # fmt: skip
    return 1


if __name__ == "__main__":
    sys.exit(main())
