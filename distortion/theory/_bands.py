r"""The order-statistic band of one realization: one rule for levels 3 and 3L.

Given the counts :math:`F^{(1)},\dots,F^{(R)}` (flips, or correct decisions) of :math:`R`
simulated realizations of the error on the same :math:`n` samples, the band for one more
exchangeable realization is (``theory/multiclass.md`` eq. M16, ``theory/multilayer.md``
eq. L12, with the degenerate cases of eq. L15)

.. math:: \big[F_{(l)}/n,\ F_{(R+1-l)}/n\big], \qquad
          l = \Big\lfloor \frac{(R+1)(1-\gamma)}{2} \Big\rfloor,

and the band is *absent* (NaN ends, :class:`distortion.results.Band`) when

* there are no realizations (``counts`` None or empty),
* there are no samples (``n == 0``: a rate is undefined), or
* :math:`l < 1`: too few realizations for coverage :math:`\gamma`
  (:math:`R <` :func:`min_realizations`).

All-equal counts give the zero-width band :math:`[F/n, F/n]` (its coverage is then exact
whenever the next realization ties, which is what equal counts suggest). The coverage must
lie in (0, 1); anything else raises ValueError.

numpy only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from distortion.results import Band, check_confidence_level

__all__ = ["min_realizations", "order_statistic_band", "order_statistic_rank"]

_NAN_BAND = Band(float("nan"), float("nan"))
#: (R+1)(1-gamma)/2 is an integer for the usual pairs (R=39, 0.95); this slack keeps
#: round-off in 1 - gamma (1 - 0.9 = 0.09999999999999998) from dropping it below.
_RANK_SLACK = 1e-9


def order_statistic_rank(n_realizations: int, coverage: float) -> int:
    r""":math:`l = \lfloor (R+1)(1-\gamma)/2 \rfloor` (eq. M16); 0 means "no band"."""
    g = check_confidence_level(coverage, "coverage")
    return max(0, math.floor((int(n_realizations) + 1) * (1.0 - g) / 2.0 + _RANK_SLACK))


def min_realizations(coverage: float) -> int:
    r"""Smallest :math:`R` with :math:`l \ge 1`, i.e. a band at coverage :math:`\gamma`.

    39 at 0.95, 19 at 0.9, 199 at 0.99.
    """
    g = check_confidence_level(coverage, "coverage")
    r = max(1, math.ceil(2.0 / (1.0 - g)) - 3)  # at or below the answer; l grows with R
    while order_statistic_rank(r, g) < 1:
        r += 1
    return r


def order_statistic_band(counts: Any, n: int, coverage: float) -> Band:
    """Prediction interval of the rate of one more realization (eq. M16, L12, L15).

    Parameters
    ----------
    counts : array of shape (R,) or None
        Counts of the simulated realizations.
    n : int
        Samples the counts are over (the rate is ``count / n``).
    coverage : float
        Nominal coverage :math:`\\gamma` in (0, 1).

    Returns
    -------
    Band
        NaN ends when there is no band (see the module docstring).
    """
    g = check_confidence_level(coverage, "coverage")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative integer number of samples, got {n!r}")
    if counts is None:
        return _NAN_BAND
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError(f"counts must have shape (n_realizations,), got shape {c.shape}")
    r = c.size
    lo = order_statistic_rank(r, g)
    if r == 0 or n == 0 or lo < 1:
        return _NAN_BAND
    srt = np.sort(c)
    return Band(float(srt[lo - 1]) / n, float(srt[r - lo]) / n)
