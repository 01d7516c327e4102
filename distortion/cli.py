"""The ``distortion`` command line.

Each subcommand lives in :mod:`distortion.commands.<name>`, a light module (no torch or
matplotlib at import time) that defines ``add_parser(subparsers)`` and ``run(args)``.
Errors that the user can fix (a missing file, a bad option) are printed as one line with
exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

#: Subcommands, in the order ``--help`` lists them; each names a module of distortion.commands.
COMMANDS: tuple[str, ...] = ("extract", "test", "predict", "compare", "run", "figures")


def _available_commands() -> list[str]:
    found = []
    for name in COMMANDS:
        try:
            importlib.import_module(f"distortion.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"distortion.commands.{name}":
                continue
            raise
        found.append(name)
    return found


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every available subcommand."""
    from distortion import __version__

    parser = argparse.ArgumentParser(
        prog="distortion",
        description=(
            "Predict, explain and measure how quantizing a trained network's weights "
            "changes its accuracy."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _available_commands():
        module = importlib.import_module(f"distortion.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``distortion`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        status = args._run(args)
    except (
        ValueError,
        FileNotFoundError,
        KeyError,
        FileExistsError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    ) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"distortion {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distortion {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
