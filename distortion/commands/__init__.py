"""Subcommands of the ``distortion`` command line, one light module each (see cli.py)."""
