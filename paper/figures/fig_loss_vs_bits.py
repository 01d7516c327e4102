"""Accuracy loss (percentage points) against bit-width: measured (95 % CI), levels 1-3 and
the level-3 band. Rows: models; columns: problem and layer set. ``loss_vs_bits.pdf`` for the
first granularity (per tensor), ``loss_vs_bits_<g>.pdf`` for the others."""

from __future__ import annotations

from pathlib import Path

import _style


def make(results: Path, out: Path) -> list[Path]:
    from distortion.plotting.compare import plot_loss_vs_bits

    table = _style.load_comparison(results)
    return _style.series_grid(table, plot_loss_vs_bits, out, "loss_vs_bits", quantity="loss (pp)")


if __name__ == "__main__":
    _style.main(make, __doc__)
