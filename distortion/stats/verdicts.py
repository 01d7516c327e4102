"""Effect-size verdict policy of the hypothesis tests and its thresholds.

A criterion *holds* when its effect is below the "holds" threshold or its test finds no
evidence against the null, *fails* when the test rejects and the effect's lower confidence
bound is above the "fails" threshold, and is *marginal* otherwise; a row's verdict is its
worst criterion (see :mod:`distortion.stats`). Thresholds: :class:`GaussianThresholds`
(H_G) and :class:`UniformThresholds` (H_U).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

__all__ = ["GaussianThresholds", "UniformThresholds", "Verdict"]

Verdict = Literal["holds", "marginal", "fails"]
_VERDICT_ORDER = {"holds": 0, "marginal": 1, "fails": 2}


def _check_pair(name: str, pair: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (holds, fails) of floats, got {pair!r}") from None
    if not 0.0 <= lo <= hi:
        raise ValueError(f"{name} must satisfy 0 <= holds <= fails, got {pair!r}")
    return lo, hi


def _criterion(
    effect: float,
    pvalue: float | None,
    pair: tuple[float, float],
    alpha: float,
    margin: float = 0.0,
) -> str:
    """Verdict of one criterion: effect size against (holds, fails), p-value as a gate.

    ``margin`` is the half-width of the effect's confidence interval at the same level:
    "fails" needs the lower bound ``effect - margin`` above the fails threshold.
    """
    if not np.isfinite(effect):
        return "fails"
    significant = True if pvalue is None else bool(pvalue < alpha)
    if effect <= pair[0] or not significant:
        return "holds"
    if effect - margin > pair[1]:
        return "fails"
    return "marginal"


def _worst(verdicts: Sequence[str]) -> str:
    return max(verdicts, key=_VERDICT_ORDER.__getitem__) if verdicts else "holds"


# --------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianThresholds:
    r"""Effect-size thresholds ``(holds, fails)`` of the Gaussian verdict of one variable.

    Parameters
    ----------
    skewness : (float, float)
        On :math:`|\hat\gamma_1|`, default ``(0.25, 0.6)``.
    excess_kurtosis : (float, float)
        On :math:`|\hat\gamma_2|`, default ``(1.0, 2.5)``.
    wasserstein : (float, float)
        On :math:`W_1` between the standardized data and :math:`N(0, 1)`, default
        ``(0.05, 0.10)``.

    Notes
    -----
    The theory turns a Gaussian model into tail probabilities
    :math:`\Phi(-m/\tau)`. The first Edgeworth term gives the relative error of a one-sided
    tail at :math:`z` standard deviations [1]_:

    .. math::

        \frac{\delta P}{P} \approx \frac{\varphi(z)}{\Phi(-z)}
        \left| \frac{\gamma_1}{6}(z^2 - 1) + \frac{\gamma_2}{24}(z^3 - 3z) \right| .

    At :math:`z = 1.5` (a 6.7 % tail, the size of the error rates at stake) the factor is
    0.40 per unit of :math:`\gamma_1` and 0.091 per unit of :math:`\gamma_2`, so the "holds"
    thresholds (0.25, 1.0) keep each term near 10 % and the "fails" thresholds (0.6, 2.5)
    put it near 23 %. :math:`W_1` bounds the change of every 1-Lipschitz expectation; its
    thresholds match the skewness ones (a standardized gamma distribution with skewness 0.25
    is at :math:`W_1 = 0.04` from :math:`N(0,1)`, with skewness 0.6 at 0.10; Student
    :math:`t_{10}`, excess kurtosis 1, at 0.04 — 200 000 seeded draws each). Under the null
    the mean of :math:`W_1` is about :math:`0.84/\sqrt n` (0.027 at n = 1 000, 300 seeded
    replications), which the p-value gate absorbs at smaller n.

    References
    ----------
    .. [1] P. Hall, *The Bootstrap and Edgeworth Expansion*, Springer, 1992, ch. 2.
    """

    skewness: tuple[float, float] = (0.25, 0.6)
    excess_kurtosis: tuple[float, float] = (1.0, 2.5)
    wasserstein: tuple[float, float] = (0.05, 0.10)

    def __post_init__(self) -> None:
        for name in ("skewness", "excess_kurtosis", "wasserstein"):
            object.__setattr__(self, name, _check_pair(name, getattr(self, name)))

    def to_frame(self) -> pd.DataFrame:
        """One row per criterion with its two thresholds."""
        return pd.DataFrame(
            [(k, *getattr(self, k)) for k in ("skewness", "excess_kurtosis", "wasserstein")],
            columns=["criterion", "holds", "fails"],
        )


@dataclass(frozen=True)
class UniformThresholds:
    r"""Effect-size thresholds ``(holds, fails)`` of the uniform-error verdict.

    All effects are in units of the step, on :math:`u = e/\Delta`.

    Parameters
    ----------
    second_moment : (float, float)
        On :math:`|12\,\overline{u^2} - 1|`, the relative deviation of :math:`E[e^2]` from
        :math:`\Delta^2/12`; default ``(0.05, 0.20)``. The predicted distortion is linear in
        :math:`\sigma_q^2`, so this is the relative error it passes on.
    mean : (float, float)
        On :math:`|\bar u|`, default ``(0.025, 0.10)`` (a bias of 9 % or 35 % of the error's
        standard deviation :math:`1/\sqrt{12}`).
    ks : (float, float)
        On the Kolmogorov--Smirnov distance :math:`D` to :math:`U(-1/2, 1/2)`, default
        ``(0.02, 0.05)``.
    correlation : (float, float)
        On :math:`\max(|r_{Pearson}|, |r_{Spearman}|)` between :math:`e` and :math:`w`,
        default ``(0.05, 0.20)``: :math:`r^2` is the fraction of the error variance that is a
        deterministic function (a gain) of the weight — 0.25 % and 4 %.
    characteristic_function : (float, float)
        On :math:`\max_k |\hat c_k|`, the empirical characteristic function of
        :math:`w/\Delta` at :math:`2\pi k`, default ``(0.03, 0.10)``. The Fourier series of
        the squared sawtooth gives exactly
        :math:`12 E[u^2] - 1 = (12/\pi^2) \sum_{k \ge 1} (-1)^k \operatorname{Re}(c_k)/k^2`,
        so :math:`|c_1| = 0.03` moves the second moment by up to 3.6 % and 0.10 by 12 %.
    clipped_fraction : (float, float)
        On the fraction of clipped entries (no p-value), default ``(0.001, 0.01)``.
    """

    second_moment: tuple[float, float] = (0.05, 0.20)
    mean: tuple[float, float] = (0.025, 0.10)
    ks: tuple[float, float] = (0.02, 0.05)
    correlation: tuple[float, float] = (0.05, 0.20)
    characteristic_function: tuple[float, float] = (0.03, 0.10)
    clipped_fraction: tuple[float, float] = (0.001, 0.01)

    _NAMES = (
        "second_moment",
        "mean",
        "ks",
        "correlation",
        "characteristic_function",
        "clipped_fraction",
    )

    def __post_init__(self) -> None:
        for name in self._NAMES:
            object.__setattr__(self, name, _check_pair(name, getattr(self, name)))

    def to_frame(self) -> pd.DataFrame:
        """One row per criterion with its two thresholds."""
        return pd.DataFrame(
            [(k, *getattr(self, k)) for k in self._NAMES], columns=["criterion", "holds", "fails"]
        )
