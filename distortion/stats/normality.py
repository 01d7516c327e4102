"""Univariate normality of the features and of the logit margins (H_G, one variable at a
time): Shapiro--Wilk, D'Agostino's :math:`K^2`, Anderson--Darling and Lilliefors with
multiple-testing corrections (:func:`univariate_normality`), the Wasserstein distance to
:math:`N(0, 1)`, the logit margins the theory uses (:func:`logit_margins`) and Q--Q data
(:func:`qq_data`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as st

from ._common import _as_2d, _as_float_array, _check_alpha
from .verdicts import GaussianThresholds, _criterion, _worst

__all__ = [
    "UNIVARIATE_TESTS",
    "QQData",
    "UnivariateNormalityResult",
    "anderson_darling_pvalue",
    "logit_margins",
    "qq_data",
    "univariate_normality",
    "wasserstein_to_normal",
]

#: The univariate normality tests of :func:`univariate_normality`, in column order.
UNIVARIATE_TESTS: tuple[str, ...] = ("shapiro", "dagostino", "anderson", "lilliefors")


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (as ``multipletests(p, method="holm")[1]``).

    statsmodels' Holm branch calls ``gc.collect()`` on every call, which costs tens of
    milliseconds in a large process; this is the same arithmetic, checked against it in the
    tests.
    """
    order = np.argsort(p)
    m = p.size
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(m, 0, -1)))
    out = np.empty_like(adj)
    out[order] = adj
    return out


def wasserstein_to_normal(x: Any) -> float:
    r"""Wasserstein-1 distance between the standardized sample and :math:`N(0, 1)`.

    Parameters
    ----------
    x : array_like of shape (n,)
        At least 2 values, not all equal.

    Returns
    -------
    float
        :math:`W_1(\hat F_s, \Phi)` with :math:`s = (x - \bar x)/\hat\sigma` (``ddof=1``).

    Notes
    -----
    With the quantile representation and the order statistics :math:`s_{(i)}`,

    .. math::

        W_1 = \int_0^1 |\hat F^{-1}(u) - \Phi^{-1}(u)|\,du
            = \sum_{i=1}^n \int_{(i-1)/n}^{i/n} |s_{(i)} - \Phi^{-1}(u)|\,du ,

    and, with :math:`\psi(u) = \varphi(\Phi^{-1}(u))`, :math:`u^* = \Phi(c)` clipped to
    :math:`[a, b]`, each term is exactly
    :math:`c(2u^* - a - b) - \psi(a) - \psi(b) + 2\psi(u^*)` (because
    :math:`\int \Phi^{-1}(u)\,du = -\psi(u)`), so no sampling of the normal is needed.
    """
    s = _as_float_array(x, "x").ravel()
    if s.size < 2:
        raise ValueError(f"x must hold at least 2 values, got {s.size}")
    sd = s.std(ddof=1)
    if not sd > 0:
        raise ValueError("x is constant: its standardized distance to N(0, 1) is undefined")
    return float(_w1_standardized(np.sort((s - s.mean()) / sd)))


def _psi(u: np.ndarray) -> np.ndarray:
    out = np.zeros_like(u)
    inside = (u > 0) & (u < 1)
    out[inside] = st.norm.pdf(st.norm.ppf(u[inside]))
    return out


def _w1_standardized(s_sorted: np.ndarray) -> float:
    n = s_sorted.size
    a = np.arange(n) / n
    b = np.arange(1, n + 1) / n
    ustar = np.clip(st.norm.cdf(s_sorted), a, b)
    terms = s_sorted * (2 * ustar - a - b) - _psi(a) - _psi(b) + 2 * _psi(ustar)
    return float(np.sum(terms))


def anderson_darling_pvalue(statistic: float, n: int) -> float:
    r"""p-value of the Anderson--Darling normality test with estimated mean and variance.

    Parameters
    ----------
    statistic : float
        :math:`A^2` as returned by :func:`scipy.stats.anderson` (``dist="norm"``).
    n : int
        Sample size.

    Returns
    -------
    float

    Notes
    -----
    D'Agostino and Stephens' modified statistic and piecewise approximation [1]_ (Table 4.9),
    as in :func:`statsmodels.stats.diagnostic.normal_ad`:

    .. math::

        A^{*2} = A^2 (1 + 0.75/n + 2.25/n^2), \qquad
        p = \begin{cases}
          1 - \exp(-13.436 + 101.14 A^* - 223.73 A^{*2}) & A^{*2} < 0.2 \\
          1 - \exp(-8.318 + 42.796 A^* - 59.938 A^{*2}) & 0.2 \le A^{*2} < 0.34 \\
          \exp(0.9177 - 4.279 A^* - 1.38 A^{*2}) & 0.34 \le A^{*2} < 0.6 \\
          \exp(1.2937 - 5.709 A^* + 0.0186 A^{*2}) & A^{*2} \ge 0.6
        \end{cases}

    where :math:`A^*` stands for :math:`A^{*2}` in the exponents (the published form). The
    last branch is evaluated at :math:`\min(A^{*2}, 150)`, below its turning point, so the
    p-value decreases monotonically (it is below :math:`10^{-180}` there).

    References
    ----------
    .. [1] R. B. D'Agostino and M. A. Stephens, *Goodness-of-Fit Techniques*, Marcel Dekker,
       1986.
    """
    a = float(statistic) * (1 + 0.75 / n + 2.25 / n**2)
    if a < 0.2:
        p = 1 - np.exp(-13.436 + 101.14 * a - 223.73 * a**2)
    elif a < 0.34:
        p = 1 - np.exp(-8.318 + 42.796 * a - 59.938 * a**2)
    elif a < 0.6:
        p = np.exp(0.9177 - 4.279 * a - 1.38 * a**2)
    else:
        a = min(a, 150.0)
        p = np.exp(1.2937 - 5.709 * a + 0.0186 * a**2)
    return float(np.clip(p, 0.0, 1.0))


def _one_column(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, float, float, float]:
    """Statistics and p-values of the four tests, skewness, kurtosis, W1, and the two
    D'Agostino components' p-values, for one non-constant column."""
    from statsmodels.stats.diagnostic import lilliefors

    n = x.size
    stats_ = np.empty(len(UNIVARIATE_TESTS))
    pvals = np.empty(len(UNIVARIATE_TESTS))
    with warnings.catch_warnings():
        # Shapiro-Wilk warns above n = 5000 that its p-value "may not be accurate"
        warnings.filterwarnings("ignore", message=".*may not be accurate.*")
        r = st.shapiro(x)
    stats_[0], pvals[0] = r.statistic, r.pvalue
    r = st.normaltest(x)  # D'Agostino-Pearson K^2
    stats_[1], pvals[1] = r.statistic, r.pvalue
    a2 = st.anderson(x, dist="norm", method="interpolate").statistic
    stats_[2], pvals[2] = a2, anderson_darling_pvalue(a2, n)
    d, p = lilliefors(x, dist="norm", pvalmethod="table")
    stats_[3], pvals[3] = d, p
    skew = float(st.skew(x, bias=False))
    kurt = float(st.kurtosis(x, fisher=True, bias=False))
    w1 = _w1_standardized(np.sort((x - x.mean()) / x.std(ddof=1)))
    p_skew = float(st.skewtest(x).pvalue)
    p_kurt = float(st.kurtosistest(x).pvalue)
    return stats_, pvals, skew, kurt, w1, p_skew, p_kurt


@dataclass(frozen=True)
class UnivariateNormalityResult:
    r"""Univariate normality tests of each column of a sample.

    Attributes
    ----------
    n : int
        Sample size.
    names : tuple of str, length p
        Column names.
    skewness, excess_kurtosis : ndarray of shape (p,)
        Bias-corrected sample skewness :math:`G_1` and excess kurtosis :math:`G_2` (NaN for a
        constant column).
    wasserstein : ndarray of shape (p,)
        :math:`W_1` between the standardized column and :math:`N(0, 1)`
        (:func:`wasserstein_to_normal`).
    statistics, pvalues : ndarray of shape (p, 4)
        Statistic and p-value of each test of :data:`UNIVARIATE_TESTS` (columns in that order).
    pvalues_holm, pvalues_bh : ndarray of shape (p, 4)
        p-values adjusted across the p columns, separately for each test, by Holm's step-down
        (family-wise error) and Benjamini--Hochberg (false discovery rate) procedures.
    skewness_pvalue, kurtosis_pvalue : ndarray of shape (p,)
        p-values of D'Agostino's skewness and kurtosis tests (the two parts of :math:`K^2`).
    verdicts : tuple of str, length p
        ``"holds"``, ``"marginal"``, ``"fails"``, or ``"degenerate"`` for a constant column.
    alpha : float
        Level of the tests that gate the verdicts.
    thresholds : GaussianThresholds
    """

    n: int
    names: tuple[str, ...]  # (p,)
    skewness: np.ndarray  # (p,)
    excess_kurtosis: np.ndarray  # (p,)
    wasserstein: np.ndarray  # (p,)
    statistics: np.ndarray  # (p, 4)
    pvalues: np.ndarray  # (p, 4)
    pvalues_holm: np.ndarray  # (p, 4)
    pvalues_bh: np.ndarray  # (p, 4)
    skewness_pvalue: np.ndarray  # (p,)
    kurtosis_pvalue: np.ndarray  # (p,)
    verdicts: tuple[str, ...]  # (p,)
    alpha: float = 0.05
    thresholds: GaussianThresholds = field(default_factory=GaussianThresholds, repr=False)

    def rejected(self, correction: Literal["holm", "bh", "none"] = "holm") -> np.ndarray:
        """Boolean array of shape (p, 4): which (column, test) pairs reject at ``alpha``."""
        p = {"holm": self.pvalues_holm, "bh": self.pvalues_bh, "none": self.pvalues}.get(correction)
        if p is None:
            raise ValueError(f"correction must be 'holm', 'bh' or 'none', got {correction!r}")
        with np.errstate(invalid="ignore"):
            return np.asarray(p < self.alpha)

    def verdict_counts(self) -> pd.Series:
        """Number of columns per verdict."""
        return pd.Series(self.verdicts, dtype="object").value_counts()

    def to_frame(self) -> pd.DataFrame:
        """One row per column: effect sizes, each test's statistic and raw/adjusted p-values."""
        df = pd.DataFrame(
            {
                "variable": list(self.names),
                "n": self.n,
                "skewness": self.skewness,
                "skewness_pvalue": self.skewness_pvalue,
                "excess_kurtosis": self.excess_kurtosis,
                "kurtosis_pvalue": self.kurtosis_pvalue,
                "wasserstein": self.wasserstein,
            }
        )
        for j, t in enumerate(UNIVARIATE_TESTS):
            df[f"{t}_statistic"] = self.statistics[:, j]
            df[f"{t}_pvalue"] = self.pvalues[:, j]
            df[f"{t}_pvalue_holm"] = self.pvalues_holm[:, j]
            df[f"{t}_pvalue_bh"] = self.pvalues_bh[:, j]
        df["verdict"] = list(self.verdicts)
        return df


def univariate_normality(
    x: Any,
    *,
    names: Sequence[str] | None = None,
    alpha: float = 0.05,
    thresholds: GaussianThresholds | None = None,
) -> UnivariateNormalityResult:
    r"""Test each column of ``x`` for normality; effect sizes and a verdict per column.

    Parameters
    ----------
    x : array_like of shape (n_samples,) or (n_samples, n_features)
        At least 20 samples (the kurtosis test needs them).
    names : sequence of str of length n_features, optional
        Column names (default ``"0", "1", ...``).
    alpha : float, default 0.05
        Level of the tests that gate the verdicts (after Holm's correction).
    thresholds : GaussianThresholds, optional
        Effect-size thresholds of the verdicts.

    Returns
    -------
    UnivariateNormalityResult

    Notes
    -----
    Tests (all with the mean and variance estimated from the sample):

    * Shapiro--Wilk, :func:`scipy.stats.shapiro` (its p-value is an approximation above
      n = 5 000, which it no longer warns about here);
    * D'Agostino--Pearson :math:`K^2 = Z_1(\sqrt{b_1})^2 + Z_2(b_2)^2 \sim \chi^2_2` [1]_,
      :func:`scipy.stats.normaltest`;
    * Anderson--Darling, the statistic of :func:`scipy.stats.anderson` and the p-value of
      :func:`anderson_darling_pvalue` (scipy's interpolated p-value is clipped to
      [0.01, 0.15], which would not be uniform under the null);
    * Lilliefors (Kolmogorov--Smirnov with estimated parameters),
      :func:`statsmodels.stats.diagnostic.lilliefors` with its simulated table (p-values are
      clipped to [0.001, 0.99]).

    The p-values of each test are adjusted across columns with Holm's step-down procedure and
    Benjamini--Hochberg's (:func:`statsmodels.stats.multitest.multipletests`, ``"fdr_bh"``;
    Holm's is transcribed here because statsmodels' garbage-collects on every call).

    Verdict of a column: it is *rejected* when any of the four tests rejects after Holm's
    correction across columns at level alpha/4 (Bonferroni over the four tests). Then each
    effect :math:`|G_1|`, :math:`|G_2|`, :math:`W_1` is compared with its
    pair of thresholds: *holds* if every effect is at most its "holds" threshold or the column
    is not rejected; *fails* if rejected and some effect's lower confidence bound (at level
    alpha/4: normal-theory standard errors of :math:`G_1` and :math:`G_2`, and for
    :math:`W_1` its null 95 % quantile :math:`1.2/\sqrt n`, measured with 300 seeded
    replications at n = 100 and 1 000) exceeds its "fails" threshold; *marginal* otherwise
    (see :class:`GaussianThresholds`).

    Power, measured with ``pytest tests/test_stats.py -k power -s`` (200 seeded replications
    of 3 independent columns, level 5 %, n = 100, unadjusted p-values): on :math:`\chi^2_4`
    data Shapiro--Wilk, D'Agostino and Anderson--Darling reject 1.00 of the time, Lilliefors
    0.96; on Student :math:`t_5` data 0.58, 0.61, 0.49 and 0.33.

    References
    ----------
    .. [1] R. B. D'Agostino, A. Belanger and R. B. D'Agostino Jr., "A suggestion for using
       powerful and informative tests of normality", The American Statistician 44(4), 1990.
    """
    from statsmodels.stats.multitest import multipletests

    alpha = _check_alpha(alpha)
    thresholds = GaussianThresholds() if thresholds is None else thresholds
    if not isinstance(thresholds, GaussianThresholds):
        raise ValueError(f"thresholds must be a GaussianThresholds, got {type(thresholds)!r}")
    x = _as_2d(x, "x")
    n, p = x.shape
    if n < 20:
        raise ValueError(f"x must have at least 20 samples (rows) for these tests, got {n}")
    if names is None:
        names = tuple(str(j) for j in range(p))
    else:
        names = tuple(str(s) for s in names)
        if len(names) != p:
            raise ValueError(f"names must have one entry per column ({p}), got {len(names)}")

    nan = np.full(p, np.nan)
    skew, kurt, w1, p_skew, p_kurt = nan.copy(), nan.copy(), nan.copy(), nan.copy(), nan.copy()
    stats_ = np.full((p, len(UNIVARIATE_TESTS)), np.nan)
    pvals = np.full_like(stats_, np.nan)
    ok = np.zeros(p, dtype=bool)
    for j in range(p):
        col = x[:, j]
        if np.ptp(col) <= 1e-12 * max(1.0, float(np.max(np.abs(col)))) or np.unique(col).size < 3:
            continue
        ok[j] = True
        stats_[j], pvals[j], skew[j], kurt[j], w1[j], p_skew[j], p_kurt[j] = _one_column(col)

    holm = np.full_like(pvals, np.nan)
    bh = np.full_like(pvals, np.nan)
    if ok.any():
        for t in range(len(UNIVARIATE_TESTS)):
            holm[ok, t] = _holm(pvals[ok, t])
            bh[ok, t] = multipletests(pvals[ok, t], alpha=alpha, method="fdr_bh")[1]

    # half-widths of the effects' confidence intervals (normal-theory standard errors of
    # G1 and G2; for W1 its 95 % null quantile, 1.2/sqrt(n), measured by simulation)
    z = float(st.norm.isf(alpha / (2 * len(UNIVARIATE_TESTS))))
    se_skew = np.sqrt(6 * n * (n - 1) / ((n - 2) * (n + 1) * (n + 3)))
    se_kurt = 2 * se_skew * np.sqrt((n**2 - 1) / ((n - 3) * (n + 5)))
    w1_margin = 1.2 / np.sqrt(n)
    verdicts = []
    for j in range(p):
        if not ok[j]:
            verdicts.append("degenerate")
            continue
        # Bonferroni over the four tests, each already Holm-adjusted across the columns
        gate = 0.0 if np.any(holm[j] * len(UNIVARIATE_TESTS) < alpha) else 1.0
        verdicts.append(
            _worst(
                [
                    _criterion(abs(skew[j]), gate, thresholds.skewness, alpha, z * se_skew),
                    _criterion(abs(kurt[j]), gate, thresholds.excess_kurtosis, alpha, z * se_kurt),
                    _criterion(w1[j], gate, thresholds.wasserstein, alpha, w1_margin),
                ]
            )
        )
    return UnivariateNormalityResult(
        n=n,
        names=names,
        skewness=skew,
        excess_kurtosis=kurt,
        wasserstein=w1,
        statistics=stats_,
        pvalues=pvals,
        pvalues_holm=holm,
        pvalues_bh=bh,
        skewness_pvalue=p_skew,
        kurtosis_pvalue=p_kurt,
        verdicts=tuple(verdicts),
        alpha=alpha,
        thresholds=thresholds,
    )


# --------------------------------------------------------------------------------------------
# projections the theory uses, Q-Q data
# --------------------------------------------------------------------------------------------


def logit_margins(logits: Any, labels: Any, cls: int) -> np.ndarray:
    r"""Logit margins :math:`z_k - z_j`, :math:`j \ne k`, of the samples of class ``k = cls``.

    Parameters
    ----------
    logits : array_like of shape (n_samples, n_classes)
    labels : array_like of int of shape (n_samples,)
    cls : int
        The class :math:`k`.

    Returns
    -------
    ndarray of shape (n_k, n_classes - 1)
        Row i holds :math:`z_k(x_i) - z_j(x_i)` for the samples of class k, columns
        :math:`j = 0, \dots, K-1` skipping k, in that order. Under H_G these are jointly
        Gaussian and P(correct | k) is their positive-orthant probability.
    """
    z = _as_2d(logits, "logits")
    y = np.asarray(labels)
    if y.shape != (z.shape[0],):
        raise ValueError(f"labels must have shape ({z.shape[0]},) to match logits, got {y.shape}")
    n_classes = z.shape[1]
    if n_classes < 2:
        raise ValueError(f"logits must have at least 2 columns (classes), got {n_classes}")
    if isinstance(cls, bool) or not isinstance(cls, int | np.integer) or not 0 <= cls < n_classes:
        raise ValueError(f"cls must be a class index in 0..{n_classes - 1}, got {cls!r}")
    zk = z[y == cls]
    if zk.shape[0] == 0:
        raise ValueError(f"no sample has label {cls}")
    others = [j for j in range(n_classes) if j != cls]
    return zk[:, [cls]] - zk[:, others]


@dataclass(frozen=True)
class QQData:
    r"""Normal Q--Q plot data of a standardized sample, with a pointwise band.

    Attributes
    ----------
    theoretical : ndarray of shape (n,)
        Normal quantiles :math:`\Phi^{-1}((i - 3/8)/(n + 1/4))` (Blom's positions).
    sample : ndarray of shape (n,)
        Sorted standardized sample.
    lower, upper : ndarray of shape (n,)
        Pointwise ``level`` band of the i-th order statistic of n standard normals:
        :math:`\Phi^{-1}` of the Beta(i, n - i + 1) quantiles.
    level : float
    name : str
    """

    theoretical: np.ndarray  # (n,)
    sample: np.ndarray  # (n,)
    lower: np.ndarray  # (n,)
    upper: np.ndarray  # (n,)
    level: float = 0.95
    name: str = ""

    def outside_fraction(self) -> float:
        """Fraction of points outside the pointwise band (about 1 - level under normality)."""
        return float(np.mean((self.sample < self.lower) | (self.sample > self.upper)))

    def to_frame(self) -> pd.DataFrame:
        """One row per point."""
        return pd.DataFrame(
            {
                "variable": self.name,
                "theoretical": self.theoretical,
                "sample": self.sample,
                "lower": self.lower,
                "upper": self.upper,
            }
        )


def qq_data(x: Any, *, level: float = 0.95, name: str = "") -> QQData:
    """Normal Q--Q data of ``x`` (standardized with ``ddof=1``), with a pointwise band.

    Parameters
    ----------
    x : array_like of shape (n,)
        At least 3 values, not all equal.
    level : float, default 0.95
        Coverage of the pointwise band.
    name : str
        Label carried to the plot.

    Returns
    -------
    QQData
    """
    s = _as_float_array(x, "x").ravel()
    if s.size < 3:
        raise ValueError(f"x must hold at least 3 values, got {s.size}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    sd = s.std(ddof=1)
    if not sd > 0:
        raise ValueError("x is constant: a normal Q-Q plot needs spread")
    n = s.size
    i = np.arange(1, n + 1)
    tail = (1 - level) / 2
    return QQData(
        theoretical=st.norm.ppf((i - 0.375) / (n + 0.25)),
        sample=np.sort((s - s.mean()) / sd),
        lower=st.norm.ppf(st.beta.ppf(tail, i, n - i + 1)),
        upper=st.norm.ppf(st.beta.ppf(1 - tail, i, n - i + 1)),
        level=float(level),
        name=str(name),
    )
