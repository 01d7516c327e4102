r"""Tests of the two hypotheses behind the closed forms, with effect sizes beside p-values.

H_G (Gaussian features)
    :math:`x \mid y=k \sim N(\mu_k, \Sigma_k)`. Tested per class on the raw features and on the
    one-dimensional projections the theory actually uses, the logit margins
    :math:`z_k - z_j` (:func:`logit_margins`):

    * univariate, per column: Shapiro--Wilk, D'Agostino's :math:`K^2`, Anderson--Darling and
      Lilliefors, corrected for multiple testing across columns (Holm and Benjamini--Hochberg)
      — :func:`univariate_normality`;
    * multivariate: Mardia's skewness and kurtosis and Henze--Zirkler — :func:`mardia_test`,
      :func:`henze_zirkler_test`, :func:`multivariate_normality` (optionally on the top
      principal components);
    * equality of the class covariances (pooled or per-class :math:`\Sigma`): Box's M —
      :func:`box_m_test`;
    * Q--Q data — :func:`qq_data`.

H_U (uniform quantization error)
    The entries of :math:`E = Q(W) - W` are i.i.d. :math:`U(-\Delta/2, \Delta/2)` and
    independent of :math:`W`. Tested per tensor on :math:`E/\Delta` (per-channel steps: each
    row divided by its own :math:`\Delta`) — :func:`uniform_error_tests`,
    :func:`uniform_error_statistics`.

With a thousand samples per class, or half a million weights, every p-value is tiny, so each
result carries a verdict — ``"holds"``, ``"marginal"`` or ``"fails"`` — decided by effect
sizes against documented thresholds (:class:`GaussianThresholds`, :class:`UniformThresholds`),
with the p-value only as a gate: a criterion *holds* when its effect is below the "holds"
threshold **or** its test finds no evidence against the null; it *fails* when the test
rejects **and** the effect's lower confidence bound is above the "fails" threshold (so that
sampling noise alone cannot make a small sample fail); otherwise it is *marginal*. The tests
that gate one row share the level alpha (Bonferroni), so a row that satisfies the null is
called "holds" with probability at least 1 - alpha. The verdict of a row is its worst
criterion. For small samples "holds" therefore means "no detectable violation", not
"confirmed". The thresholds and their reasons are in ``theory/hypotheses.md``.


Layout
------
:mod:`~distortion.stats.normality`
    Univariate normality: :func:`univariate_normality`, :func:`anderson_darling_pvalue`,
    :func:`wasserstein_to_normal`, the logit margins :func:`logit_margins` and Q--Q data
    :func:`qq_data`.
:mod:`~distortion.stats.multivariate`
    Multivariate normality: :func:`mardia_test`, :func:`henze_zirkler_test`,
    :func:`multivariate_normality`.
:mod:`~distortion.stats.covariance`
    Equality of the class covariances: :func:`box_m_test`.
:mod:`~distortion.stats.uniform`
    Uniform quantization error: :func:`uniform_error_statistics`, :func:`uniform_error_tests`
    (moments, KS, Cramér--von Mises, correlation, Sripad--Snyder characteristic function).
:mod:`~distortion.stats.verdicts`
    The verdict policy above and its thresholds, :class:`GaussianThresholds` and
    :class:`UniformThresholds`.

Every public name is re-exported here, so ``from distortion.stats import X`` keeps working.
This package imports numpy, scipy, pandas and statsmodels only.
"""

from __future__ import annotations

from .covariance import (
    BoxMResult,
    box_m_test,
)
from .multivariate import (
    HenzeZirklerResult,
    MardiaResult,
    MultivariateNormalityResult,
    henze_zirkler_test,
    mardia_test,
    multivariate_normality,
)
from .normality import (
    UNIVARIATE_TESTS,
    QQData,
    UnivariateNormalityResult,
    anderson_darling_pvalue,
    logit_margins,
    qq_data,
    univariate_normality,
    wasserstein_to_normal,
)
from .uniform import (
    UniformErrorResult,
    uniform_error_statistics,
    uniform_error_tests,
)
from .verdicts import (
    GaussianThresholds,
    UniformThresholds,
    Verdict,
)

__all__ = [
    "BoxMResult",
    "GaussianThresholds",
    "HenzeZirklerResult",
    "MardiaResult",
    "MultivariateNormalityResult",
    "QQData",
    "UNIVARIATE_TESTS",
    "UniformErrorResult",
    "UniformThresholds",
    "UnivariateNormalityResult",
    "Verdict",
    "anderson_darling_pvalue",
    "box_m_test",
    "henze_zirkler_test",
    "logit_margins",
    "mardia_test",
    "multivariate_normality",
    "qq_data",
    "uniform_error_statistics",
    "uniform_error_tests",
    "univariate_normality",
    "wasserstein_to_normal",
]
