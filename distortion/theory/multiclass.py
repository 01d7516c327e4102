r"""K-class softmax layer: accuracy, accuracy loss and prediction flips under quantization.

The last layer is :math:`z = Wx + b` with :math:`W \in \mathbb{R}^{K\times d}`, prediction
:math:`\hat y = \arg\max_j z_j`; the quantized layer is :math:`\hat W = W + E`. Three of
the four prediction levels of ``ARCHITECTURE.md`` live here:

* level 1, :func:`multiclass_distortion`: Gaussian features (H_G) and uniform error (H_U),
  with the quantized logits moment-matched to a Gaussian;
* level 2, :func:`multiclass_distortion_actual`: Gaussian features and the actual
  quantized weights (exact under H_G);
* level 3, :func:`semiparametric_distortion`: the empirical features and H_U, per sample,
  with a band for the flip count of a single realization of :math:`E` (defined in
  :mod:`distortion.theory.semiparametric`, re-exported here).

:func:`multiclass_accuracy` gives the accuracy of the float layer (or of the moment-matched
quantized layer) under H_G. The derivation, with the equation numbers cited in the code as
``(eq. M#)``, is in ``theory/multiclass.md``.

The ``model`` argument is a :class:`~distortion.theory.gaussian.GaussianModel`, or any
object with the same ``priors``, ``means``, ``covariances`` (and ``covariance_type``)
attributes. A pooled covariance (``covariance_type == "pooled"`` or a stride-0 broadcast
stack) is projected once, which is what makes ImageNet sizes (``K = 1000``,
``d = 2048``) feasible: all the work happens with :math:`K\times K` logit covariances.

The error enters as a variance :math:`\sigma_j^2` per row (``variance=``, what a compressor's
error model gives); ``step=`` is a convenience converted by
:func:`distortion.theory.error_models.uniform_error_variance`. numpy and scipy only at import
time (pandas is imported by ``to_frame``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
from scipy import special, stats

from distortion._validation import check_count as _check_count
from distortion._validation import check_linear_layer as _check_layer
from distortion._validation import resolve_variance
from distortion.results import (
    Band,
    ConfidenceInterval,
    Prediction,
    check_confidence_level,
    deprecated_alias,
    normal_interval,
)
from distortion.theory.semiparametric import SemiParametricDistortion, semiparametric_distortion

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Band",
    "MulticlassAccuracy",
    "MulticlassDistortion",
    "SemiParametricDistortion",
    "multiclass_accuracy",
    "multiclass_distortion",
    "multiclass_distortion_actual",
    "semiparametric_distortion",
]

Method = Literal["auto", "orthant", "montecarlo"]
FlipMethod = Literal["montecarlo", "orthant"]

#: Largest K for which the orthant (multivariate-normal CDF) accuracy is offered.
MAX_ORTHANT_CLASSES = 20
#: Largest K for which the 2(K-1)-dimensional orthant flip probability is offered.
MAX_ORTHANT_FLIP_CLASSES = 12

_CHUNK_ELEMENTS = 1 << 21  # floats per work array (16 MiB)


# ----------------------------------------------------------------------------- validation
def _check_model(model: object) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(priors, means, covariances, pooled)`` of a GaussianModel-like object."""
    missing = [a for a in ("priors", "means", "covariances") if not hasattr(model, a)]
    if missing:
        raise ValueError(
            f"model must be a GaussianModel (missing attribute(s) {missing}); build one with "
            "GaussianModel.fit(features, labels) or GaussianModel.from_params(means, covariances)"
        )
    priors = np.asarray(model.priors, dtype=np.float64)
    means = np.asarray(model.means, dtype=np.float64)
    cov = np.asarray(model.covariances, dtype=np.float64)
    if means.ndim != 2 or cov.shape != (means.shape[0], means.shape[1], means.shape[1]):
        raise ValueError(
            f"model has means of shape {means.shape} and covariances of shape {cov.shape}; "
            "expected (K, d) and (K, d, d)"
        )
    if priors.shape != (means.shape[0],):
        raise ValueError(f"model priors must have shape ({means.shape[0]},), got {priors.shape}")
    if means.shape[0] < 2:
        raise ValueError(f"model must have at least 2 classes, got {means.shape[0]}")
    pooled = getattr(model, "covariance_type", None) == "pooled" or (
        cov.shape[0] > 1 and cov.strides[0] == 0
    )
    return priors, means, cov, pooled


def _check_tolerances(abseps: float, releps: float) -> None:
    for name, v in (("abseps", abseps), ("releps", releps)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
    if abseps == 0 and releps == 0:
        raise ValueError("abseps and releps cannot both be 0")


# ----------------------------------------------------------------------------- linear algebra
def _psd_factor(m: np.ndarray) -> np.ndarray:
    """A matrix ``L`` with ``L @ L.T == m`` for a symmetric PSD ``m`` (Cholesky, else eigh)."""
    m = 0.5 * (m + m.T)
    try:
        return np.linalg.cholesky(m)
    except np.linalg.LinAlgError:
        lam, vec = np.linalg.eigh(m)
        return vec * np.sqrt(np.clip(lam, 0.0, None))


def _margin_mean(v: np.ndarray, r: int) -> np.ndarray:
    """``A_r v`` with rows ``e_r - e_j`` (j != r) (eq. M5)."""
    return v[r] - np.delete(v, r)


def _margin_cov(m: np.ndarray, r: int, s: int | None = None) -> np.ndarray:
    """``A_r m A_s^T`` (eq. M5); ``m`` need not be symmetric."""
    s = r if s is None else s
    o_r = np.delete(np.arange(m.shape[0]), r)
    o_s = np.delete(np.arange(m.shape[0]), s)
    return m[r, s] - m[r, o_s][None, :] - m[o_r, s][:, None] + m[np.ix_(o_r, o_s)]


_CDF_PARAMS = inspect.signature(stats.multivariate_normal.cdf).parameters


def _orthant(
    mean: np.ndarray,
    cov: np.ndarray,
    rng: np.random.Generator,
    abseps: float,
    releps: float,
    maxpts: int | None,
) -> float:
    r""":math:`P(m > 0)` for :math:`m \sim N(\text{mean}, \text{cov})` (eq. M5)."""
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    scale = max(float(sd.max(initial=0.0)), float(np.abs(mean).max(initial=0.0)), 1e-300)
    degenerate = sd <= 1e-12 * scale
    if np.any(degenerate & (mean <= 0)):
        return 0.0
    keep = ~degenerate
    if not np.any(keep):
        return 1.0
    mean, sd, cov = mean[keep], sd[keep], cov[np.ix_(keep, keep)]
    corr = cov / np.outer(sd, sd)
    np.fill_diagonal(corr, 1.0)
    x = mean / sd
    if x.size == 1:
        return float(special.ndtr(x[0]))
    kw: dict[str, object] = {"abseps": abseps, "releps": releps, "allow_singular": True}
    if maxpts is not None:
        kw["maxpts"] = maxpts
    if "rng" in _CDF_PARAMS:
        kw["rng"] = rng
    elif "random_state" in _CDF_PARAMS:  # pragma: no cover - scipy < 1.15
        kw["random_state"] = rng
    p = stats.multivariate_normal.cdf(x, mean=np.zeros(x.size), cov=corr, **kw)
    return float(np.clip(p, 0.0, 1.0))


# ----------------------------------------------------------------------------- joint model
class _LogitJoint:
    r"""Per-class joint Gaussian of the float logits :math:`z` and the error :math:`\delta`.

    :math:`\hat z = z + \delta`. ``kind`` is 0 (no quantization), 1 (error variances
    ``variance`` per row, or ``step`` through the H_U rule, moment-matched:
    :math:`\delta \sim N(0, t_k D)` independent of :math:`z`, eq. M4) or 2 (actual error,
    eq. M11). Covariances are stored once when the feature covariance is pooled.
    """

    def __init__(
        self,
        model: object,
        W: object,
        b: object,
        *,
        step: object = None,
        variance: object = None,
        W_hat: object = None,
        b_hat: object = None,
    ) -> None:
        priors, mu, cov, pooled = _check_model(model)
        n_classes, d = mu.shape
        w, bias = _check_layer(W, b, n_classes, d)
        self.priors = priors
        self.n_classes = n_classes
        self.pooled = pooled
        self.mean = mu @ w.T + bias  # (K, K) row k: a_k (eq. M1)
        groups = [cov[0]] if pooled else list(cov)
        self.cov = np.stack([_sym(w @ c @ w.T) for c in groups])  # (G, K, K) (eq. M1)
        self.kind = 0
        self.noise_diag = None
        self.shift = None
        self.cross = None
        self.noise = None
        if step is not None or variance is not None:
            sigma2 = resolve_variance(step, variance, n_classes)  # (eq. M2)
            trace = np.trace(cov, axis1=1, axis2=2) + np.sum(mu**2, axis=1)  # (eq. M3)
            self.noise_diag = trace[:, None] * sigma2[None, :]  # (K, K)
            self.kind = 1
        elif W_hat is not None:
            what, bhat = _check_layer(
                W_hat, b_hat if b_hat is not None else bias, n_classes, d, what="W_hat"
            )
            e = what - w
            self.shift = mu @ e.T + (bhat - bias)  # (K, K) (eq. M11)
            self.cross = np.stack([w @ c @ e.T for c in groups])  # Cov(z, delta)
            self.noise = np.stack([_sym(e @ c @ e.T) for c in groups])  # Cov(delta)
            self.kind = 2
        self._factors: dict[int, np.ndarray] = {}

    def group(self, k: int) -> int:
        return 0 if self.pooled else k

    def float_moments(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.mean[k], self.cov[self.group(k)]

    def quantized_moments(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of :math:`\\hat z \\mid k` (eq. M3, M11)."""
        g = self.group(k)
        if self.kind == 1:
            return self.mean[k], self.cov[g] + np.diag(self.noise_diag[k])
        if self.kind == 2:
            x = self.cross[g]
            return self.mean[k] + self.shift[k], self.cov[g] + x + x.T + self.noise[g]
        return self.mean[k], self.cov[g]

    def cross_cov(self, k: int) -> np.ndarray:
        """:math:`\\operatorname{Cov}(z, \\hat z \\mid k)` (eq. M3, M11)."""
        g = self.group(k)
        return self.cov[g] + self.cross[g] if self.kind == 2 else self.cov[g]

    def factor_t(self, k: int) -> np.ndarray:
        """Transposed (C-contiguous) factor of the covariance of ``z`` (or ``(z, delta)``)."""
        g = self.group(k)
        if g not in self._factors:
            if self.kind == 2:
                x = self.cross[g]
                joint = np.block([[self.cov[g], x], [x.T, self.noise[g]]])
                self._factors[g] = np.ascontiguousarray(_psd_factor(joint).T)
            else:
                self._factors[g] = np.ascontiguousarray(_psd_factor(self.cov[g]).T)
        return self._factors[g]

    def draw(self, cls: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One draw of ``(z, delta)`` per entry of ``cls`` (classes of one covariance group).

        Returns two arrays of shape (len(cls), K).
        """
        kk = self.n_classes
        lt = self.factor_t(int(cls[0]))
        xi = rng.standard_normal((cls.size, lt.shape[0]))
        if self.kind == 2:
            zd = xi @ lt
            return self.mean[cls] + zd[:, :kk], self.shift[cls] + zd[:, kk:]
        z = self.mean[cls] + xi @ lt
        if self.kind == 1:
            delta = rng.standard_normal((cls.size, kk)) * np.sqrt(self.noise_diag[cls])
        else:
            delta = np.zeros_like(z)
        return z, delta


def _sym(m: np.ndarray) -> np.ndarray:
    return 0.5 * (m + m.T)


# ----------------------------------------------------------------------------- engines
class _ClassEstimates(NamedTuple):
    """Per-class estimates, arrays of shape (K,); standard errors NaN where not Monte Carlo."""

    acc_float: np.ndarray
    acc_quant: np.ndarray
    flip: np.ndarray
    loss: np.ndarray
    se_float: np.ndarray
    se_quant: np.ndarray
    se_flip: np.ndarray
    se_loss: np.ndarray
    n_draws: np.ndarray


def _orthant_accuracies(
    joint: _LogitJoint,
    rng: np.random.Generator,
    *,
    abseps: float,
    releps: float,
    maxpts: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class float and quantized accuracies as orthant probabilities (eq. M5)."""
    kk = joint.n_classes
    acc_f = np.empty(kk)
    acc_q = np.empty(kk)
    for k in range(kk):
        a, s = joint.float_moments(k)
        acc_f[k] = _orthant(_margin_mean(a, k), _margin_cov(s, k), rng, abseps, releps, maxpts)
        if joint.kind == 0:
            acc_q[k] = acc_f[k]
            continue
        aq, sq = joint.quantized_moments(k)
        acc_q[k] = _orthant(_margin_mean(aq, k), _margin_cov(sq, k), rng, abseps, releps, maxpts)
    return acc_f, acc_q


def _orthant_flips(
    joint: _LogitJoint,
    rng: np.random.Generator,
    *,
    abseps: float,
    releps: float,
    maxpts: int | None,
) -> np.ndarray:
    """Per-class flip probabilities as sums of 2(K-1)-dimensional orthants (eq. M7)."""
    kk = joint.n_classes
    flip = np.empty(kk)
    for k in range(kk):
        a, s = joint.float_moments(k)
        aq, sq = joint.quantized_moments(k)
        c = joint.cross_cov(k)
        var = np.diag(s)
        sd = np.sqrt(np.clip(var[:, None] + var[None, :] - 2 * s, 1e-300, None))
        stay = 0.0
        for j in range(kk):
            # P(argmax z = j) <= min_i Phi((a_j - a_i) / sd_ji): skip negligible terms
            bound = np.min(np.delete(special.ndtr((a[j] - a) / sd[j]), j), initial=1.0)
            if bound < abseps / (10 * kk):
                continue
            mean = np.concatenate([_margin_mean(a, j), _margin_mean(aq, j)])
            cz, cq, czq = _margin_cov(s, j), _margin_cov(sq, j), _margin_cov(c, j)
            cov = np.block([[cz, czq], [czq.T, cq]])
            stay += _orthant(mean, cov, rng, abseps, releps, maxpts)
        flip[k] = min(1.0, max(0.0, 1.0 - stay))
    return flip


def _allocate(priors: np.ndarray, n_draws: int) -> np.ndarray:
    """Stratified draws per class, proportional to the priors, at least 2 (eq. M8)."""
    return np.maximum(2, np.rint(n_draws * priors)).astype(np.int64)


def _monte_carlo_engine(
    joint: _LogitJoint, rng: np.random.Generator, *, n_draws: int
) -> _ClassEstimates:
    """Stratified Monte Carlo of (z, z_hat) in logit space, common draws (eq. M8)."""
    kk = joint.n_classes
    counts = _allocate(joint.priors, n_draws)
    labels = np.repeat(np.arange(kk), counts)  # sorted by class
    sums = np.zeros((4, kk))  # float, quantized, flip, loss
    sq = np.zeros((4, kk))
    rows = max(1, _CHUNK_ELEMENTS // (2 * kk))
    # chunks never mix covariance groups (all classes share one group when pooled)
    bounds = [0, labels.size] if joint.pooled else list(np.concatenate([[0], np.cumsum(counts)]))
    for g0, g1 in zip(bounds[:-1], bounds[1:], strict=True):
        for s0 in range(g0, g1, rows):
            cls = labels[s0 : min(g1, s0 + rows)]
            z, delta = joint.draw(cls, rng)
            pred = np.argmax(z, axis=1)
            cf = (pred == cls).astype(np.float64)
            if joint.kind == 0:
                cq, fl = cf, np.zeros(cls.size)
            else:
                predq = np.argmax(z + delta, axis=1)
                cq = (predq == cls).astype(np.float64)
                fl = (predq != pred).astype(np.float64)
            for i, v in enumerate((cf, cq, fl, cf - cq)):
                sums[i] += np.bincount(cls, weights=v, minlength=kk)
                sq[i] += np.bincount(cls, weights=v * v, minlength=kk)
    n = counts.astype(np.float64)
    mean = sums / n
    var = np.clip(sq / n - mean**2, 0.0, None) * n / (n - 1)
    se = np.sqrt(var / n)
    return _ClassEstimates(*mean, *se, counts)


def _estimate(
    joint: _LogitJoint,
    *,
    method: str,
    flip_method: str | None,
    n_draws: int,
    seed: int | np.random.Generator | None,
    abseps: float,
    releps: float,
    maxpts: int | None,
) -> _ClassEstimates:
    """Accuracies by ``method``, flips by ``flip_method`` (None: no flips)."""
    rng = np.random.default_rng(seed)
    kk = joint.n_classes
    nan = np.full(kk, np.nan)
    mc = None
    if method == "montecarlo" or flip_method == "montecarlo":
        mc = _monte_carlo_engine(joint, rng, n_draws=n_draws)
    if method == "orthant":
        acc_f, acc_q = _orthant_accuracies(joint, rng, abseps=abseps, releps=releps, maxpts=maxpts)
        est = _ClassEstimates(
            acc_f, acc_q, nan, acc_f - acc_q, nan, nan, nan, nan, np.zeros(kk, dtype=np.int64)
        )
    else:
        est = mc
    if flip_method is None:
        return est._replace(flip=nan, se_flip=nan)
    if flip_method == "orthant":
        flip = _orthant_flips(joint, rng, abseps=abseps, releps=releps, maxpts=maxpts)
        return est._replace(flip=flip, se_flip=nan)
    return est._replace(flip=mc.flip, se_flip=mc.se_flip, n_draws=mc.n_draws)


def _resolve_method(method: str, n_classes: int) -> str:
    allowed = ("auto", "orthant", "montecarlo")
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed}, got {method!r}")
    if method == "auto":
        return "orthant" if n_classes <= MAX_ORTHANT_CLASSES else "montecarlo"
    if method == "orthant" and n_classes > MAX_ORTHANT_CLASSES:
        raise ValueError(
            f"method='orthant' supports at most {MAX_ORTHANT_CLASSES} classes, got "
            f"K={n_classes}; use method='montecarlo'"
        )
    return method


def _resolve_flip_method(flip_method: str, n_classes: int) -> str:
    allowed = ("montecarlo", "orthant")
    if flip_method not in allowed:
        raise ValueError(f"flip_method must be one of {allowed}, got {flip_method!r}")
    if flip_method == "orthant" and n_classes > MAX_ORTHANT_FLIP_CLASSES:
        raise ValueError(
            f"flip_method='orthant' supports at most {MAX_ORTHANT_FLIP_CLASSES} classes, got "
            f"K={n_classes}; use flip_method='montecarlo'"
        )
    return flip_method


def _check_common(n_draws: int, abseps: float, releps: float, maxpts: int | None) -> None:
    _check_count(n_draws, "n_draws", 1)
    _check_tolerances(abseps, releps)
    if maxpts is not None:
        _check_count(maxpts, "maxpts", 1)


# ----------------------------------------------------------------------------- results
def _ci(
    estimate: float, stderr: float, confidence_level: float, level: float | None
) -> ConfidenceInterval:
    """Normal interval ``estimate ± z stderr`` (NaN ends when there is no stderr)."""
    if level is not None:
        confidence_level = deprecated_alias("confidence_level=", "level=", level)
    check_confidence_level(confidence_level)
    return normal_interval(estimate, stderr, confidence_level)


def _pooled_se(priors: np.ndarray, se: np.ndarray) -> float:
    """Standard error of the prior-weighted mean of independent strata (eq. M8)."""
    return float(np.sqrt(np.sum(priors**2 * se**2)))


def _alias(new: str, old: str):
    """A read-only property ``old`` that warns and returns the attribute ``new``."""

    def get(self):
        return deprecated_alias(new, old, getattr(self, new))

    get.__doc__ = f"Deprecated alias of ``{new}``."
    return property(get)


@dataclass(frozen=True)
class MulticlassAccuracy:
    r"""Accuracy of a K-class linear layer under the Gaussian feature model.

    Attributes
    ----------
    accuracy : float
        :math:`\sum_k \pi_k P(\hat y = k \mid y = k)` (eq. M6).
    accuracy_stderr : float
        Monte-Carlo standard error (NaN for the orthant method, whose error per class is
        ``tolerance``).
    method : str
        ``"orthant"`` or ``"montecarlo"``.
    quantized : bool
        Whether this is the moment-matched accuracy of the quantized layer (H_U).
    tolerance : float
        Absolute error tolerance of each orthant probability (NaN for Monte Carlo).
    class_accuracy, class_accuracy_stderr, priors, n_draws : arrays of shape (n_classes,)
    """

    accuracy: float
    accuracy_stderr: float
    method: str
    quantized: bool
    tolerance: float
    class_accuracy: np.ndarray = field(repr=False)  # (K,)
    class_accuracy_stderr: np.ndarray = field(repr=False)  # (K,)
    priors: np.ndarray = field(repr=False)  # (K,)
    n_draws: np.ndarray = field(repr=False)  # (K,) Monte-Carlo draws per class

    stderr = _alias("accuracy_stderr", "stderr")
    class_stderr = _alias("class_accuracy_stderr", "class_stderr")

    def confidence_interval(
        self, confidence_level: float = 0.95, *, level: float | None = None
    ) -> ConfidenceInterval:
        """Normal confidence interval of the Monte-Carlo estimate (NaN for orthant).

        ``level=`` is a deprecated alias of ``confidence_level=``.
        """
        return _ci(self.accuracy, self.accuracy_stderr, confidence_level, level)

    def to_frame(self) -> pd.DataFrame:
        """One row per class: prior, accuracy, standard error, draws."""
        import pandas as pd

        return pd.DataFrame(
            {
                "class": np.arange(self.priors.size),
                "prior": self.priors,
                "accuracy": self.class_accuracy,
                "accuracy_stderr": self.class_accuracy_stderr,
                "n_draws": self.n_draws,
                "method": self.method,
                "quantized": self.quantized,
            }
        )


_HEADLINE = ("accuracy_float", "accuracy_quantized", "accuracy_loss", "flip_rate")


@dataclass(frozen=True)
class MulticlassDistortion:
    r"""Accuracy loss and flip rate of a quantized K-class layer under H_G (levels 1, 2).

    Attributes
    ----------
    level : int
        1 (uniform-error hypothesis, moment-matched logits) or 2 (actual quantized weights).
    method : str
        How the accuracies were computed: ``"orthant"`` or ``"montecarlo"``.
    flip_method : str
        How the flip rate was computed: ``"orthant"`` or ``"montecarlo"``.
    accuracy_float, accuracy_quantized : float
        Accuracy of the float and of the quantized layer (eq. M6).
    accuracy_loss : float
        ``accuracy_float - accuracy_quantized``: the distortion of [1]_.
    flip_rate : float
        :math:`P(\arg\max \hat z \ne \arg\max z)` (eq. M7).
    accuracy_float_stderr, accuracy_quantized_stderr, accuracy_loss_stderr, \
flip_rate_stderr : float
        Monte-Carlo standard errors (NaN for orthant values).
    tolerance : float
        Absolute tolerance of each orthant probability (NaN when nothing used it).
    class_accuracy_float, class_accuracy_quantized, class_flip_rate, \
class_*_stderr : arrays of shape (n_classes,)
        The same quantities given the true class.
    priors, n_draws : arrays of shape (n_classes,)

    Notes
    -----
    The names ``stderr_<quantity>``, ``class_stderr_<quantity>``, ``class_flip`` and
    ``class_stderr_flip`` are deprecated aliases of ``<quantity>_stderr``,
    ``class_<quantity>_stderr``, ``class_flip_rate`` and ``class_flip_rate_stderr``.

    References
    ----------
    .. [1] D. Resmerita et al., "Distortion approximation of a compressed softmax layer",
       IEEE SSP 2021.
    """

    level: int
    method: str
    flip_method: str
    accuracy_float: float
    accuracy_quantized: float
    accuracy_loss: float
    flip_rate: float
    accuracy_float_stderr: float
    accuracy_quantized_stderr: float
    accuracy_loss_stderr: float
    flip_rate_stderr: float
    tolerance: float
    class_accuracy_float: np.ndarray = field(repr=False)  # (K,)
    class_accuracy_quantized: np.ndarray = field(repr=False)  # (K,)
    class_flip_rate: np.ndarray = field(repr=False)  # (K,)
    class_accuracy_float_stderr: np.ndarray = field(repr=False)  # (K,)
    class_accuracy_quantized_stderr: np.ndarray = field(repr=False)  # (K,)
    class_accuracy_loss_stderr: np.ndarray = field(repr=False)  # (K,)
    class_flip_rate_stderr: np.ndarray = field(repr=False)  # (K,)
    priors: np.ndarray = field(repr=False)  # (K,)
    n_draws: np.ndarray = field(repr=False)  # (K,) Monte-Carlo draws per class

    stderr_accuracy_float = _alias("accuracy_float_stderr", "stderr_accuracy_float")
    stderr_accuracy_quantized = _alias("accuracy_quantized_stderr", "stderr_accuracy_quantized")
    stderr_accuracy_loss = _alias("accuracy_loss_stderr", "stderr_accuracy_loss")
    stderr_flip_rate = _alias("flip_rate_stderr", "stderr_flip_rate")
    class_flip = _alias("class_flip_rate", "class_flip")
    class_stderr_accuracy_float = _alias(
        "class_accuracy_float_stderr", "class_stderr_accuracy_float"
    )
    class_stderr_accuracy_quantized = _alias(
        "class_accuracy_quantized_stderr", "class_stderr_accuracy_quantized"
    )
    class_stderr_accuracy_loss = _alias("class_accuracy_loss_stderr", "class_stderr_accuracy_loss")
    class_stderr_flip = _alias("class_flip_rate_stderr", "class_stderr_flip")

    def class_accuracy_loss(self) -> np.ndarray:
        """Per-class accuracy loss, array of shape (n_classes,)."""
        return self.class_accuracy_float - self.class_accuracy_quantized

    def confidence_interval(
        self,
        quantity: Literal[
            "accuracy_float", "accuracy_quantized", "accuracy_loss", "flip_rate"
        ] = "accuracy_loss",
        confidence_level: float = 0.95,
        *,
        level: float | None = None,
    ) -> ConfidenceInterval:
        """Normal Monte-Carlo confidence interval of a headline quantity (NaN if orthant).

        ``level=`` is a deprecated alias of ``confidence_level=``.
        """
        if quantity not in _HEADLINE:
            raise ValueError(f"quantity must be one of {_HEADLINE}, got {quantity!r}")
        return _ci(
            getattr(self, quantity), getattr(self, quantity + "_stderr"), confidence_level, level
        )

    def to_prediction(self) -> Prediction:
        """The result as a :class:`~distortion.results.Prediction` (level ``"1"`` or ``"2"``).

        Levels 1 and 2 give expectations only: the one-realization bands are NaN.
        ``n_samples`` is the number of Monte-Carlo draws (0 when all orthant).
        """
        method = (
            self.method if self.method == self.flip_method else f"{self.method}+{self.flip_method}"
        )
        return Prediction(
            level=str(self.level),
            flip_rate=self.flip_rate,
            flip_rate_stderr=self.flip_rate_stderr,
            accuracy_loss=self.accuracy_loss,
            accuracy_loss_stderr=self.accuracy_loss_stderr,
            accuracy_float=self.accuracy_float,
            accuracy_compressed=self.accuracy_quantized,
            n_samples=int(np.sum(self.n_draws)),
            method=method,
        )

    def to_frame(self, *, per_class: bool = False) -> pd.DataFrame:
        """The headline numbers as one row, or one row per class with ``per_class=True``."""
        import pandas as pd

        if per_class:
            return pd.DataFrame(
                {
                    "class": np.arange(self.priors.size),
                    "prior": self.priors,
                    "accuracy_float": self.class_accuracy_float,
                    "accuracy_quantized": self.class_accuracy_quantized,
                    "accuracy_loss": self.class_accuracy_loss(),
                    "flip_rate": self.class_flip_rate,
                    "accuracy_float_stderr": self.class_accuracy_float_stderr,
                    "accuracy_quantized_stderr": self.class_accuracy_quantized_stderr,
                    "accuracy_loss_stderr": self.class_accuracy_loss_stderr,
                    "flip_rate_stderr": self.class_flip_rate_stderr,
                    "n_draws": self.n_draws,
                }
            )
        keys = (
            "level",
            "method",
            "flip_method",
            *_HEADLINE,
            *(h + "_stderr" for h in _HEADLINE),
            "tolerance",
        )
        return pd.DataFrame([{k: getattr(self, k) for k in keys}])


def _distortion_result(
    level: int,
    method: str,
    flip_method: str,
    est: _ClassEstimates,
    priors: np.ndarray,
    abseps: float,
) -> MulticlassDistortion:
    values = dict(zip(_HEADLINE, (est.acc_float, est.acc_quant, est.loss, est.flip), strict=True))
    errors = dict(
        zip(_HEADLINE, (est.se_float, est.se_quant, est.se_loss, est.se_flip), strict=True)
    )
    used_orthant = "orthant" in (method, flip_method)
    return MulticlassDistortion(
        level=level,
        method=method,
        flip_method=flip_method,
        **{h: float(priors @ values[h]) for h in _HEADLINE},  # (eq. M6)
        **{h + "_stderr": _pooled_se(priors, errors[h]) for h in _HEADLINE},
        tolerance=float(abseps) if used_orthant else float("nan"),
        class_accuracy_float=est.acc_float,
        class_accuracy_quantized=est.acc_quant,
        class_flip_rate=est.flip,
        class_accuracy_float_stderr=est.se_float,
        class_accuracy_quantized_stderr=est.se_quant,
        class_accuracy_loss_stderr=est.se_loss,
        class_flip_rate_stderr=est.se_flip,
        priors=priors,
        n_draws=est.n_draws,
    )


# ----------------------------------------------------------------------------- levels 0-2
def multiclass_accuracy(
    model: object,
    W: np.ndarray,
    b: np.ndarray | None,
    *,
    variance: float | np.ndarray | None = None,
    step: float | np.ndarray | None = None,
    method: Method = "auto",
    n_draws: int = 200_000,
    seed: int | np.random.Generator | None = None,
    abseps: float = 1e-5,
    releps: float = 1e-5,
    maxpts: int | None = None,
) -> MulticlassAccuracy:
    r"""Accuracy of the layer :math:`z = Wx + b` under H_G, optionally quantized under H_U.

    Parameters
    ----------
    model : GaussianModel
        Class priors :math:`\pi_k`, means :math:`\mu_k` (K, d), covariances
        :math:`\Sigma_k` (K, d, d).
    W : array of shape (n_classes, n_features)
    b : array of shape (n_classes,) or None
        None means no bias.
    variance : float or array of shape (n_classes,), optional
        Error variance :math:`\sigma_j^2` of the entries of ``W`` (per tensor, or one per
        row), as a compressor's error model gives it. When given (or ``step``), the accuracy
        of the quantized layer with moment-matched Gaussian logits (eq. M4); otherwise the
        float accuracy. At most one of ``variance`` and ``step``.
    step : float or array of shape (n_classes,), optional
        Quantization step of ``W`` (0 for a constant row), converted to
        :math:`\Delta_j^2/12` by :func:`distortion.theory.error_models.uniform_error_variance`.
    method : {"auto", "orthant", "montecarlo"}
        Orthant probabilities of the K-1 margins by :func:`scipy.stats.multivariate_normal`
        (K <= 20; "auto" picks it there) or stratified Monte Carlo in logit space.
    n_draws : int, default 200 000
        Monte-Carlo draws in total, allocated to the classes in proportion to the priors
        (at least 2 each). The cost is about ``n_draws * K**2`` flops.
    seed : int, Generator or None
        Seeds the Monte Carlo and the randomized quasi-Monte-Carlo of the orthant CDF.
    abseps, releps : float
        Error tolerances of each orthant probability, passed to scipy (whose
        quasi-Monte-Carlo stops when three standard errors are below ``abseps``).
    maxpts : int, optional
        Integration-point limit of each orthant probability (scipy's default when None).

    Returns
    -------
    MulticlassAccuracy

    Notes
    -----
    Given class :math:`k`, :math:`z \sim N(a_k, S_k)` with :math:`a_k = W\mu_k + b`,
    :math:`S_k = W\Sigma_k W^\top` (eq. M1) and, quantized under H_U,
    :math:`S_k + \operatorname{diag}(\sigma_j^2)(\operatorname{tr}\Sigma_k + \|\mu_k\|^2)`
    (eq. M3). The probability of a correct decision is the orthant probability of the
    margins (eq. M5)

    .. math:: P(\hat y = k \mid k) = P(A_k z > 0), \qquad
              A_k z = (z_k - z_j)_{j \ne k} \sim N(A_k a_k, A_k S_k A_k^\top).

    References
    ----------
    .. [1] D. Resmerita et al., "Distortion approximation of a compressed softmax layer",
       IEEE SSP 2021.
    .. [2] A. Genz and F. Bretz, "Computation of Multivariate Normal and t Probabilities",
       Springer, 2009.
    """
    priors, _, _, _ = _check_model(model)
    m = _resolve_method(method, priors.size)
    _check_common(n_draws, abseps, releps, maxpts)
    joint = _LogitJoint(model, W, b, step=step, variance=variance)
    est = _estimate(
        joint,
        method=m,
        flip_method=None,
        n_draws=n_draws,
        seed=seed,
        abseps=abseps,
        releps=releps,
        maxpts=maxpts,
    )
    quantized = step is not None or variance is not None
    acc, se = (est.acc_quant, est.se_quant) if quantized else (est.acc_float, est.se_float)
    return MulticlassAccuracy(
        accuracy=float(priors @ acc),
        accuracy_stderr=_pooled_se(priors, se),
        method=m,
        quantized=quantized,
        tolerance=float(abseps) if m == "orthant" else float("nan"),
        class_accuracy=acc,
        class_accuracy_stderr=se,
        priors=priors,
        n_draws=est.n_draws,
    )


def multiclass_distortion(
    model: object,
    W: np.ndarray,
    b: np.ndarray | None,
    *,
    variance: float | np.ndarray | None = None,
    step: float | np.ndarray | None = None,
    method: Method = "auto",
    flip_method: FlipMethod = "montecarlo",
    n_draws: int = 200_000,
    seed: int | np.random.Generator | None = None,
    abseps: float = 1e-5,
    releps: float = 1e-5,
    maxpts: int | None = None,
) -> MulticlassDistortion:
    r"""Level 1: accuracy loss and flip rate under H_G and H_U (moment-matched logits).

    Parameters
    ----------
    model : GaussianModel
        Class-conditional Gaussian features, K classes, dimension d.
    W : array of shape (n_classes, n_features)
    b : array of shape (n_classes,) or None
    variance : float or array of shape (n_classes,), optional
        Error variance :math:`\sigma_j^2` of the entries of ``W``: one per tensor, or one
        per row (per-channel), as a compressor's error model gives it
        (``ErrorModel.second_moment``). Exactly one of ``variance`` and ``step``.
    step : float or array of shape (n_classes,), optional
        Quantization step of ``W`` (0 for a constant row, which the quantizer returns
        unchanged), converted to :math:`\Delta_j^2/12` by
        :func:`distortion.theory.error_models.uniform_error_variance` (H_U).
    method : {"auto", "orthant", "montecarlo"}
        How the float and quantized accuracies are computed: (K-1)-dimensional orthant
        probabilities (K <= 20; "auto" picks it there) or stratified Monte Carlo of
        :math:`(z, \hat z)` in logit space, with common draws for the two accuracies.
    flip_method : {"montecarlo", "orthant"}, default "montecarlo"
        The flip rate by the same Monte Carlo, or as a sum of K 2(K-1)-dimensional orthant
        probabilities per class (K <= 12; slow for K = 10: about 2 s per class at
        ``abseps=1e-4``, tens of seconds at ``1e-5``).
    n_draws : int, default 200 000
        Monte-Carlo draws in total (cost about ``n_draws * K**2`` flops).
    seed : int, Generator or None
    abseps, releps, maxpts :
        Tolerances and point limit of each orthant probability
        (see :func:`multiclass_accuracy`).

    Returns
    -------
    MulticlassDistortion

    Notes
    -----
    Under H_U the error rows are independent with :math:`\operatorname{Cov}(E_j) =
    \sigma_j^2 I` (:math:`\sigma_j^2 = \Delta_j^2/12` for a step), so :math:`\hat z = z + Ex` has
    (eq. M2, M3)

    .. math:: \operatorname{Cov}(\hat z \mid k) = W\Sigma_kW^\top +
              \operatorname{diag}(\sigma_j^2)\,(\operatorname{tr}\Sigma_k + \|\mu_k\|^2),
              \qquad \operatorname{Cov}(z, \hat z \mid k) = W\Sigma_kW^\top,

    and the moment-matched model treats :math:`(z, \hat z)` as jointly Gaussian
    (eq. M4). The flip rate is (eq. M7)

    .. math:: P(\text{flip} \mid k) = 1 - \sum_j P(A_j z > 0,\ A_j \hat z > 0).

    For K = 2 this is the moment-matching approximation of the binary theory
    (``theory/binary.md``; eq. M17).

    References
    ----------
    .. [1] D. Resmerita et al., "Distortion approximation of a compressed softmax layer",
       IEEE SSP 2021.
    """
    priors, _, _, _ = _check_model(model)
    m = _resolve_method(method, priors.size)
    fm = _resolve_flip_method(flip_method, priors.size)
    _check_common(n_draws, abseps, releps, maxpts)
    if step is None and variance is None:
        raise ValueError(
            "pass exactly one of variance= (the error variance sigma^2, per tensor or one per "
            "row) and step= (the quantizer step, converted by the uniform-error rule)"
        )
    joint = _LogitJoint(model, W, b, step=step, variance=variance)
    est = _estimate(
        joint,
        method=m,
        flip_method=fm,
        n_draws=n_draws,
        seed=seed,
        abseps=abseps,
        releps=releps,
        maxpts=maxpts,
    )
    return _distortion_result(1, m, fm, est, priors, abseps)


def multiclass_distortion_actual(
    model: object,
    W: np.ndarray,
    b: np.ndarray | None,
    W_hat: np.ndarray,
    *,
    b_hat: np.ndarray | None = None,
    method: Method = "auto",
    flip_method: FlipMethod = "montecarlo",
    n_draws: int = 200_000,
    seed: int | np.random.Generator | None = None,
    abseps: float = 1e-5,
    releps: float = 1e-5,
    maxpts: int | None = None,
) -> MulticlassDistortion:
    r"""Level 2: accuracy loss and flip rate of the actual quantized layer under H_G.

    Parameters
    ----------
    model : GaussianModel
    W : array of shape (n_classes, n_features)
        Float weights.
    b : array of shape (n_classes,) or None
        Float bias.
    W_hat : array of shape (n_classes, n_features)
        Quantized weights (e.g. ``UniformQuantizer(bits).quantize(W).values``).
    b_hat : array of shape (n_classes,), optional
        Quantized bias; the float bias when omitted.
    method, flip_method, n_draws, seed, abseps, releps, maxpts :
        As in :func:`multiclass_distortion`.

    Returns
    -------
    MulticlassDistortion

    Notes
    -----
    With the actual error :math:`E = \hat W - W`, :math:`(z, \hat z)` given class :math:`k`
    is exactly Gaussian under H_G (eq. M11):

    .. math:: \begin{pmatrix} z \\ \hat z \end{pmatrix} \sim N\left(
              \begin{pmatrix} W\mu_k + b \\ \hat W\mu_k + \hat b \end{pmatrix},
              \begin{pmatrix} W\Sigma_kW^\top & W\Sigma_k\hat W^\top \\
              \hat W\Sigma_kW^\top & \hat W\Sigma_k\hat W^\top \end{pmatrix}\right).

    The draws use :math:`(z, \delta)`, :math:`\delta = Ex + \hat b - b`, which stays well
    conditioned when :math:`\hat W \approx W`.
    """
    priors, _, _, _ = _check_model(model)
    m = _resolve_method(method, priors.size)
    fm = _resolve_flip_method(flip_method, priors.size)
    _check_common(n_draws, abseps, releps, maxpts)
    if W_hat is None:
        raise ValueError("W_hat must be given: the quantized weights, shape (n_classes, d)")
    joint = _LogitJoint(model, W, b, W_hat=W_hat, b_hat=b_hat)
    est = _estimate(
        joint,
        method=m,
        flip_method=fm,
        n_draws=n_draws,
        seed=seed,
        abseps=abseps,
        releps=releps,
        maxpts=maxpts,
    )
    return _distortion_result(2, m, fm, est, priors, abseps)
