r"""Distortion of a quantized two-class softmax layer under Gaussian features.

A two-class layer :math:`z = Wx + b`, :math:`W \in \mathbb{R}^{2\times d}`, decides class
index 0 ("class 1") when :math:`s = v^\top x + c > 0` with :math:`v = w_1 - w_2`,
:math:`c = b_1 - b_2`. Under the Gaussian-feature hypothesis H_G its error probability
(Bayes risk) is a closed form in :math:`v, c` (eq. B3). Quantizing the weights,
:math:`\hat W = W + E`, changes the risk; under the uniform-error hypothesis H_U the
*distortion* :math:`D = E_E[R(W+E)] - R(W)` is approximated by

* ``"taylor"``: a second-order delta method, :math:`D \approx \tfrac12 s^2 \operatorname{tr}
  \nabla^2 R(v)` (eq. B9), with analytic gradient and Hessian (eqs. B4--B7);
* ``"moment"``: moment matching of the quantized logit difference (eqs. B10--B11), valid
  beyond small steps;
* ``"mixture"``: the quantized logit difference as a Gaussian mixture over the error's
  projection on :math:`\Sigma_k v` (eqs. B21--B22): non-perturbative like moment matching,
  exact to second order in the step like Taylor;
* ``"montecarlo"``: exact under H_G and H_U, averaging the exact risk over draws of
  :math:`E` (eq. B16).

It also gives the spread of one realization (eq. B12), the probability that the quantized
decision differs from the float one (eqs. B13--B15), and the risk of actual quantized weights
(level 2). Equation numbers refer to ``theory/binary.md``.

References
----------
.. [1] D. Resmerita et al., "Distortion approximation of a compressed softmax layer",
   IEEE Statistical Signal Processing Workshop (SSP), 2021.
.. [2] D. B. Owen, "Tables for computing bivariate normal probabilities", Annals of
   Mathematical Statistics 27(4), 1956.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy.linalg.blas import dsymv
from scipy.special import ndtr, owens_t

from distortion._validation import as_float_array
from distortion._validation import check_step as _check_row_steps
from distortion.results import (
    ConfidenceInterval,
    check_confidence_level,
    deprecated_alias,
    normal_interval,
)
from distortion.theory.error_models import uniform_error_variance
from distortion.theory.gaussian import GaussianModel

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BayesRisk",
    "BinaryLayerStats",
    "DistortionCurve",
    "DistortionResult",
    "FlipResult",
    "bayes_risk",
    "distortion",
    "distortion_curve",
    "flip_probability",
    "flip_probability_of_weights",
    "flip_rate",
    "flip_rate_of_weights",
    "prepare_layer",
    "risk_gradient",
    "risk_hessian",
    "risk_hessian_trace",
    "risk_of_weights",
]

DistortionMethod = Literal["taylor", "moment", "mixture", "montecarlo"]
CurveMethod = Literal["taylor", "moment", "mixture", "montecarlo", "actual"]
_CLOSED = ("taylor", "moment", "mixture")
FlipMethod = Literal["closed", "montecarlo"]

_SQRT_2PI = np.sqrt(2.0 * np.pi)
#: sign of the error event of each class: class 0 errs when s <= 0, class 1 when s > 0 (eq. B3)
_EPS = np.array([1.0, -1.0])
#: Gauss--Hermite nodes of the mixture form (eq. B22)
_GH_NODES = 64
#: antithetic pairs of quantization-error draws per block of the Monte Carlo
_CHUNK_ELEMENTS = 2**21


# ---------------------------------------------------------------------------- helpers
def _phi(x: np.ndarray | float) -> np.ndarray:
    return np.exp(-0.5 * np.square(x)) / _SQRT_2PI


def _phi_diff(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r"""Accurate :math:`\Phi(x) - \Phi(y)`, elementwise.

    On the upper side both arguments are reflected (:math:`\Phi(x)-\Phi(y) =
    \Phi(-y)-\Phi(-x)`) so that the subtraction is between small tail values; for close
    arguments the midpoint rule with its second-order correction is used,
    :math:`(x-y)\,\varphi(\bar t)[1 + (x-y)^2(\bar t^2-1)/24]`, whose relative error is
    :math:`O((x-y)^4)`.
    """
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    upper = (x + y) > 0
    xr = np.where(upper, -y, x)
    yr = np.where(upper, -x, y)
    direct = ndtr(xr) - ndtr(yr)
    h = x - y
    t = 0.5 * (x + y)
    close = h * _phi(t) * (1.0 + h * h * (t * t - 1.0) / 24.0)
    return np.where(np.abs(h) < 1e-3, close, direct)


def _symv(S: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``S @ x`` for a symmetric float64 matrix with BLAS ``dsymv`` (reads one triangle).

    A C-contiguous symmetric matrix is its own Fortran-ordered transpose, so ``S.T`` is
    passed without a copy; this is 2-3 times faster than ``S @ x`` for large ``d``.
    """
    if S.flags.c_contiguous:
        return dsymv(1.0, S.T, x)
    if S.flags.f_contiguous:
        return dsymv(1.0, S, x)
    return S @ x


def _check_model(model: GaussianModel) -> None:
    if not isinstance(model, GaussianModel):
        raise ValueError(f"model must be a GaussianModel, got {type(model).__name__}")
    if model.n_classes != 2:
        raise ValueError(
            f"model must have 2 classes for a two-class layer, got {model.n_classes}; "
            "use distortion.theory.multiclass for K > 2"
        )


def _layer(model: GaussianModel, W: Any, b: Any, *, names: tuple[str, str] = ("W", "b")):
    """Validate a two-class layer and return ``v = w_1 - w_2`` (d,) and ``c = b_1 - b_2``."""
    _check_model(model)
    wn, bn = names
    W = as_float_array(W, wn)
    d = model.n_features
    if W.shape != (2, d):
        raise ValueError(
            f"{wn} must have shape (2, n_features) = (2, {d}) to match the model, got {W.shape}"
        )
    b = np.zeros(2) if b is None else as_float_array(b, bn)
    if b.shape != (2,):
        raise ValueError(f"{bn} must have shape (2,) (or be None for no bias), got {b.shape}")
    v = W[0] - W[1]
    if not np.any(v):
        raise ValueError(f"the two rows of {wn} are identical: the layer has no decision boundary")
    return v, float(b[0] - b[1])


def _model_cache(model: GaussianModel) -> dict:
    """W-independent model statistics, computed once per model (weakly cached)."""
    cache = _MODEL_CACHE.get(model)
    if cache is None:
        cov, mu = model.covariances, model.means
        pooled = model.covariance_type == "pooled"
        tr = np.trace(cov, axis1=1, axis2=2)
        cache = {
            "pooled": pooled,
            "trace": tr,  # (2,)  tr Sigma_k
            "M": tr + np.sum(mu * mu, axis=1),  # (2,)  tr Sigma_k + |mu_k|^2 (eq. B10)
            "diag": np.diagonal(cov, axis1=1, axis2=2).copy(),  # (2, d)
        }
        _MODEL_CACHE[model] = cache
    return cache


_MODEL_CACHE: weakref.WeakKeyDictionary[GaussianModel, dict] = weakref.WeakKeyDictionary()


def _model_cache_second_order(model: GaussianModel, cache: dict) -> dict:
    """Add the Frobenius Gram <Sigma_j, Sigma_k> and Sigma_k mu_j (for eq. B12)."""
    if "gram" not in cache:
        cov, mu = model.covariances, model.means
        if cache["pooled"]:
            g = float(np.vdot(cov[0], cov[0]))
            cache["gram"] = np.full((2, 2), g)
            smu = mu @ cov[0]  # (2, d): row j is Sigma mu_j
            cache["sigma_mu"] = np.stack([smu, smu])  # (k, j, d) = Sigma_k mu_j
        else:
            gram = np.empty((2, 2))
            for j in range(2):
                for k in range(j, 2):
                    gram[j, k] = gram[k, j] = np.vdot(cov[j], cov[k])
            cache["gram"] = gram
            cache["sigma_mu"] = np.array(
                [[_symv(cov[k], mu[j]) for j in range(2)] for k in range(2)]
            )
    return cache


# ---------------------------------------------------------------------------- prepared stats
@dataclass(frozen=True, eq=False)
class BinaryLayerStats:
    r"""Everything about a two-class layer under H_G that does not depend on the step.

    Built by :func:`prepare_layer`; the closed forms for any number of bit-widths are then
    :math:`O(1)` each. All derivatives are with respect to :math:`v = w_1 - w_2`
    (:math:`\partial R/\partial w_1 = \nabla R`, :math:`\partial R/\partial w_2 = -\nabla R`).
    """

    priors: np.ndarray  # (2,)
    margin: np.ndarray  # (2,)  m_k = v^T mu_k + c (eq. B2)
    scale: np.ndarray  # (2,)  tau_k = sqrt(v^T Sigma_k v) (eq. B2)
    second_moment: np.ndarray  # (2,)  M_k = tr Sigma_k + |mu_k|^2 (eq. B10)
    gradient: np.ndarray  # (d,)  grad R(v) (eq. B6)
    hessian_trace: float  # tr grad^2 R(v) (eq. B7)
    hessian_fro2: float  # |grad^2 R(v)|_F^2 (eq. B12), NaN when not computed
    hessian_diag2: float  # sum_i (grad^2 R)_ii^2 (eq. B12), NaN when not computed
    risk: float  # R(v) (eq. B3)
    v: np.ndarray = field(repr=False)  # (d,)
    c: float = field(repr=False, default=0.0)
    u: np.ndarray = field(repr=False, default=None)  # (2, d)  Sigma_k v
    hessian_beta: np.ndarray = field(repr=False, default=None)  # (2,)  (eq. B7)
    hessian_core: np.ndarray = field(repr=False, default=None)  # (4, 4)  (eq. B7)
    model: GaussianModel = field(repr=False, default=None)

    @property
    def g(self) -> np.ndarray:
        """Standardized margins :math:`g_k = m_k / \\tau_k`, shape (2,)."""
        return self.margin / self.scale

    def moment_limit_ratio(self) -> float:
        r"""Small-step limit of :math:`D_{\text{moment}} / D_{\text{taylor}}` (eq. B19).

        Moment matching keeps only the first of the three terms of the Hessian trace, so
        even as :math:`\Delta \to 0` it is off by this factor; 1 means asymptotically exact.
        """
        a = _EPS * self.priors * _phi(self.g)
        first = float(np.sum(a * self.margin * self.second_moment / self.scale**3))
        return first / self.hessian_trace if self.hessian_trace != 0 else np.nan

    def noise_to_signal(self, step: float | np.ndarray) -> np.ndarray:
        r"""Logit noise-to-signal ratio :math:`\eta_k = s^2 M_k / \tau_k^2` (eq. B20).

        Parameters
        ----------
        step : float or array of shape (2,)

        Returns
        -------
        array of shape (2,)
        """
        s2, _ = _noise(_check_step(step, "step"))
        return s2 * self.second_moment / self.scale**2

    def taylor_relative_error(self, step: float | np.ndarray) -> float:
        r"""Leading relative error of the Taylor distortion at this step (eq. B20).

        :math:`\sum_k w_k \eta_k (3 - g_k^2)/4` with :math:`w_k` the share of class
        :math:`k` in the moment-matching term; reliable when the moment limit ratio
        (eq. B19) is close to 1 (large :math:`d`, no dominant covariance spike).
        """
        eps = self.noise_to_signal(step)
        a = _EPS * self.priors * _phi(self.g) * self.margin * self.second_moment / self.scale**3
        if not np.any(a):
            return np.nan
        return float(np.sum(a * eps * (3.0 - self.g**2) / 4.0) / np.sum(a))

    def to_frame(self) -> pd.DataFrame:
        """One row per class with margin, scale, g, M and the layer-level scalars."""
        import pandas as pd

        return pd.DataFrame(
            {
                "class": [0, 1],
                "prior": self.priors,
                "margin": self.margin,
                "scale": self.scale,
                "g": self.g,
                "second_moment": self.second_moment,
                "risk": self.risk,
                "gradient_norm": float(np.linalg.norm(self.gradient)),
                "hessian_trace": self.hessian_trace,
            }
        )


def prepare_layer(
    model: GaussianModel, W: Any, b: Any, *, second_order: bool = True
) -> BinaryLayerStats:
    r"""Precompute the step-independent statistics of a two-class layer (eqs. B2--B7, B12).

    Parameters
    ----------
    model : GaussianModel
        Two-class Gaussian feature model.
    W : array of shape (2, n_features)
    b : array of shape (2,) or None
    second_order : bool, default True
        Also compute :math:`\|\nabla^2R\|_F^2` and :math:`\sum_i (\nabla^2 R)_{ii}^2` for the
        second-order spread (eq. B12); costs two more matrix--vector products.

    Returns
    -------
    BinaryLayerStats
    """
    v, c = _layer(model, W, b)
    return _prepare(model, v, c, second_order=second_order)


def _prepare(model: GaussianModel, v: np.ndarray, c: float, *, second_order: bool):
    cache = _model_cache(model)
    mu, cov, pri = model.means, model.covariances, model.priors
    if cache["pooled"]:
        u = np.broadcast_to(_symv(cov[0], v), (2, v.size))  # Sigma v
    else:
        u = np.stack([_symv(cov[0], v), _symv(cov[1], v)])  # (2, d)  u_k = Sigma_k v
    m = mu @ v + c  # (eq. B2)
    tau2 = np.einsum("ka,a->k", u, v)
    if np.any(tau2 <= 0):
        raise ValueError("v^T Sigma_k v is not positive: the covariances are degenerate")
    tau = np.sqrt(tau2)
    g = m / tau
    phi = _phi(g)
    # (eq. B4): grad g_k = mu_k / tau_k - m_k u_k / tau_k^3 = B_k gamma_k
    gam = np.stack([1.0 / tau, -m / tau**3], axis=1)  # (2, 2)
    grad_g = gam[:, :1] * mu + gam[:, 1:] * u  # (2, d)
    a = _EPS * pri * phi  # (2,)
    grad_r = -(a[:, None] * grad_g).sum(axis=0)  # (eq. B6)
    mu_u = np.einsum("ka,ka->k", mu, u)
    uu = np.einsum("ka,ka->k", u, u)
    # (eq. B5) tr grad^2 g_k = -2 mu^T u / tau^3 - m tr Sigma / tau^3 + 3 m |u|^2 / tau^5
    tr_hg = -2 * mu_u / tau**3 - m * cache["trace"] / tau**3 + 3 * m * uu / tau**5
    gg = np.einsum("ka,ka->k", grad_g, grad_g)
    tr_h = float(np.sum(a * (g * gg - tr_hg)))  # (eq. B7)
    risk = float(np.sum(pri * ndtr(-_EPS * g)))  # (eq. B3)
    hbeta, hcore = _hessian_parts(m, tau, g, a)
    fro2 = diag2 = np.nan
    if second_order:
        fro2, diag2 = _hessian_norms(model, cache, hbeta, hcore, u)
    u.setflags(write=False)
    return BinaryLayerStats(
        priors=pri,
        margin=m,
        scale=tau,
        second_moment=cache["M"],
        gradient=grad_r,
        hessian_trace=tr_h,
        hessian_fro2=fro2,
        hessian_diag2=diag2,
        risk=risk,
        v=v,
        c=c,
        hessian_beta=hbeta,
        hessian_core=hcore,
        u=u,
        model=model,
    )


def _hessian_parts(m, tau, g, a):
    r"""Coefficients of :math:`\nabla^2 R = \sum_k \beta_k \Sigma_k + B C B^\top` (eq. B7).

    ``B = [mu_1, u_1, mu_2, u_2]`` (d, 4); returns ``beta`` (2,) and ``C`` (4, 4).
    """
    beta = a * m / tau**3
    C = np.zeros((4, 4))
    for k in range(2):
        gam = np.array([1.0 / tau[k], -m[k] / tau[k] ** 3])
        ck = g[k] * np.outer(gam, gam)
        ck += np.array([[0.0, 1.0], [1.0, 0.0]]) / tau[k] ** 3
        ck[1, 1] -= 3 * m[k] / tau[k] ** 5
        C[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = a[k] * ck
    return beta, C


def _hessian_norms(model, cache, beta, C, u) -> tuple[float, float]:
    r"""Frobenius norm squared and sum of squared diagonal of :math:`\nabla^2R` (eq. B12)."""
    _model_cache_second_order(model, cache)
    mu = model.means
    B = np.stack([mu[0], u[0], mu[1], u[1]], axis=1)  # (d, 4)
    G = B.T @ B
    # B^T Sigma_k B needs Sigma_k mu_j (cached) and Sigma_k u_j
    cov = model.covariances
    if cache["pooled"]:
        su = _symv(cov[0], u[0])
        sig_u = np.stack([np.stack([su, su]), np.stack([su, su])])  # (k, j, d)
    else:
        sig_u = np.array([[_symv(cov[k], u[j]) for j in range(2)] for k in range(2)])  # (k, j, d)
    fro2 = float(beta @ cache["gram"] @ beta)
    for k in range(2):
        sb = np.stack(
            [cache["sigma_mu"][k, 0], sig_u[k, 0], cache["sigma_mu"][k, 1], sig_u[k, 1]], axis=1
        )  # (d, 4)  Sigma_k B
        fro2 += 2 * beta[k] * float(np.sum(C * (B.T @ sb)))
    cg = C @ G
    fro2 += float(np.sum(cg * cg.T))
    diag = beta @ cache["diag"] + np.einsum("ia,ab,ib->i", B, C, B)
    return max(fro2, 0.0), float(diag @ diag)


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class BayesRisk:
    r"""Error probability of a two-class layer under H_G (eq. B3)."""

    risk: float  # R = pi_1 Phi(-g_1) + pi_2 Phi(g_2)
    class_error: np.ndarray  # (2,)  P(error | class k)
    margin: np.ndarray  # (2,)  m_k
    scale: np.ndarray  # (2,)  tau_k
    priors: np.ndarray  # (2,)

    def accuracy(self) -> float:
        """1 - risk."""
        return 1.0 - self.risk

    def to_frame(self) -> pd.DataFrame:
        """One row per class."""
        import pandas as pd

        return pd.DataFrame(
            {
                "class": [0, 1],
                "prior": self.priors,
                "margin": self.margin,
                "scale": self.scale,
                "class_error": self.class_error,
                "risk": self.risk,
            }
        )


def _alias(new: str, old: str):
    """A read-only property ``old`` that warns and returns the attribute ``new``."""

    def get(self):
        return deprecated_alias(new, old, getattr(self, new))

    get.__doc__ = f"Deprecated alias of ``{new}``."
    return property(get)


@dataclass(frozen=True)
class DistortionResult:
    r"""Distortion :math:`D = E_E[R(W+E)] - R(W)` of one step size by one method.

    ``stderr`` is a deprecated alias of ``distortion_stderr``.
    """

    method: str
    distortion: float  # D
    distortion_stderr: float  # Monte Carlo standard error of D (NaN for closed forms)
    risk: float  # R(W), float weights
    risk_quantized: float  # E_E[R(W+E)] = risk + distortion
    spread: float  # sd_E[R(W+E)] of a single realization (eq. B12 or Monte Carlo)
    step: np.ndarray  # (2,)  step of each row of W
    noise_variance: float  # s^2 = (Delta_1^2 + Delta_2^2) / 12 (eq. B8)
    n_draws: int = 0  # antithetic pairs of draws (0 for closed forms)

    stderr = _alias("distortion_stderr", "stderr")

    def confidence_interval(
        self, confidence_level: float = 0.95, *, level: float | None = None
    ) -> ConfidenceInterval:
        """Normal-approximation interval for D (Monte Carlo only; NaN otherwise).

        ``level=`` is a deprecated alias of ``confidence_level=``.
        """
        if level is not None:
            confidence_level = deprecated_alias("confidence_level=", "level=", level)
        check_confidence_level(confidence_level)
        return normal_interval(self.distortion, self.distortion_stderr, confidence_level)

    def to_frame(self) -> pd.DataFrame:
        """One row."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "method": self.method,
                    "step_1": float(self.step[0]),
                    "step_2": float(self.step[1]),
                    "noise_variance": self.noise_variance,
                    "risk": self.risk,
                    "risk_quantized": self.risk_quantized,
                    "distortion": self.distortion,
                    "distortion_stderr": self.distortion_stderr,
                    "spread": self.spread,
                    "n_draws": self.n_draws,
                }
            ]
        )


@dataclass(frozen=True)
class FlipResult:
    r"""Flip rate: the probability that the quantized decision differs from the float one.

    ``probability``, ``stderr`` and ``class_probability`` are deprecated aliases of
    ``flip_rate``, ``flip_rate_stderr`` and ``class_flip_rate``.
    """

    method: str
    flip_rate: float  # P(sign s_hat != sign s)
    flip_rate_stderr: float  # Monte Carlo standard error (NaN for closed forms)
    class_flip_rate: np.ndarray  # (2,)  P(flip | class k)
    step: np.ndarray  # (2,)  step of each row (NaN for method="weights")
    n_draws: int = 0

    probability = _alias("flip_rate", "probability")
    stderr = _alias("flip_rate_stderr", "stderr")
    class_probability = _alias("class_flip_rate", "class_probability")

    def confidence_interval(self, confidence_level: float = 0.95) -> ConfidenceInterval:
        """Normal-approximation interval for the flip rate (Monte Carlo only; NaN otherwise)."""
        check_confidence_level(confidence_level)
        return normal_interval(self.flip_rate, self.flip_rate_stderr, confidence_level)

    def to_frame(self) -> pd.DataFrame:
        """One row."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "method": self.method,
                    "step_1": float(self.step[0]),
                    "step_2": float(self.step[1]),
                    "flip_rate": self.flip_rate,
                    "flip_rate_stderr": self.flip_rate_stderr,
                    "flip_class_0": float(self.class_flip_rate[0]),
                    "flip_class_1": float(self.class_flip_rate[1]),
                    "n_draws": self.n_draws,
                }
            ]
        )


@dataclass(frozen=True)
class DistortionCurve:
    r"""Distortion and flip rate against bit-width, for several methods.

    ``stderr``, ``flip_probability`` and ``flip_stderr`` are deprecated aliases of
    ``distortion_stderr``, ``flip_rate`` and ``flip_rate_stderr``. The columns of
    :meth:`to_frame` keep their names (``stderr``, ``flip_probability``, ``flip_stderr``)
    for the plotting and experiment code that reads them.
    """

    bits: np.ndarray  # (n_bits,)
    step: np.ndarray  # (n_bits, 2)  per-row steps
    methods: tuple[str, ...]  # (n_methods,)
    risk: float  # R(W)
    distortion: np.ndarray  # (n_bits, n_methods)
    distortion_stderr: np.ndarray  # (n_bits, n_methods)  NaN for closed forms
    spread: np.ndarray  # (n_bits, n_methods)
    flip_rate: np.ndarray  # (n_bits, n_methods)
    flip_rate_stderr: np.ndarray  # (n_bits, n_methods)
    n_draws: int = 0

    stderr = _alias("distortion_stderr", "stderr")
    flip_probability = _alias("flip_rate", "flip_probability")
    flip_stderr = _alias("flip_rate_stderr", "flip_stderr")

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per bit-width x method."""
        import pandas as pd

        nb, nm = self.distortion.shape
        return pd.DataFrame(
            {
                "bits": np.repeat(self.bits, nm),
                "method": np.tile(np.array(self.methods, dtype=object), nb),
                "step_1": np.repeat(self.step[:, 0], nm),
                "step_2": np.repeat(self.step[:, 1], nm),
                "noise_variance": np.repeat(uniform_error_variance(self.step).sum(axis=1), nm),
                "risk": self.risk,
                "distortion": self.distortion.ravel(),
                "stderr": self.distortion_stderr.ravel(),
                "spread": self.spread.ravel(),
                "flip_probability": self.flip_rate.ravel(),
                "flip_stderr": self.flip_rate_stderr.ravel(),
            }
        )


# ---------------------------------------------------------------------------- risk
def bayes_risk(model: GaussianModel, W: Any, b: Any) -> BayesRisk:
    r"""Exact error probability of a two-class layer under H_G.

    Parameters
    ----------
    model : GaussianModel
        Two-class model, :math:`x \mid k \sim N(\mu_k, \Sigma_k)`.
    W : array of shape (2, n_features)
    b : array of shape (2,) or None

    Returns
    -------
    BayesRisk

    Notes
    -----
    Class index 0 is decided when :math:`s = v^\top x + c > 0`; :math:`s \mid k \sim
    N(m_k, \tau_k^2)` (eq. B2), so

    .. math:: R = \pi_1 \Phi(-m_1/\tau_1) + \pi_2 \Phi(m_2/\tau_2). \quad \text{(B3)}
    """
    v, c = _layer(model, W, b)
    return _bayes_risk(model, v, c)


def _bayes_risk(model: GaussianModel, v: np.ndarray, c: float) -> BayesRisk:
    m = model.means @ v + c  # (eq. B2)
    tau2 = (model.covariances @ v) @ v
    if np.any(tau2 <= 0):
        raise ValueError("v^T Sigma_k v is not positive: the covariances are degenerate")
    tau = np.sqrt(tau2)
    err = ndtr(-_EPS * m / tau)  # (eq. B3)
    return BayesRisk(
        risk=float(model.priors @ err), class_error=err, margin=m, scale=tau, priors=model.priors
    )


def risk_of_weights(model: GaussianModel, W_hat: Any, b_hat: Any) -> BayesRisk:
    r"""Risk of given (for example actually quantized) weights under H_G — level 2.

    The same closed form as :func:`bayes_risk` (eq. B3), applied to :math:`\hat W, \hat b`:
    the quantization error is the actual one, only the features are modelled.

    Parameters
    ----------
    model : GaussianModel
    W_hat : array of shape (2, n_features)
        Weights (numpy array, or a CPU torch tensor such as ``QuantizedTensor.values``).
    b_hat : array of shape (2,) or None

    Returns
    -------
    BayesRisk
    """
    v, c = _layer(model, W_hat, b_hat, names=("W_hat", "b_hat"))
    return _bayes_risk(model, v, c)


def risk_gradient(model: GaussianModel, W: Any, b: Any) -> np.ndarray:
    r"""Gradient of the risk with respect to :math:`v = w_1 - w_2` (eqs. B4, B6).

    Returns
    -------
    array of shape (n_features,)

    Notes
    -----
    .. math:: \nabla R = -\sum_k \pi_k \epsilon_k \varphi(g_k) \nabla g_k, \qquad
       \nabla g_k = \frac{\mu_k}{\tau_k} - \frac{m_k \Sigma_k v}{\tau_k^3},

    with :math:`\epsilon = (1, -1)` and :math:`g_k = m_k/\tau_k`.
    """
    return prepare_layer(model, W, b, second_order=False).gradient


def risk_hessian_trace(model: GaussianModel, W: Any, b: Any) -> float:
    r"""Trace of the Hessian of the risk with respect to :math:`v` (eqs. B5, B7).

    Notes
    -----
    The Hessian of :math:`\Phi(-h(v))` is :math:`\varphi(h)[h\nabla h\nabla h^\top -
    \nabla^2 h]`; with :math:`h = \epsilon_k g_k`,

    .. math:: \operatorname{tr}\nabla^2 R = \sum_k \pi_k\epsilon_k\varphi(g_k)
       \left[g_k\|\nabla g_k\|^2 - \operatorname{tr}\nabla^2 g_k\right].
    """
    return prepare_layer(model, W, b, second_order=False).hessian_trace


def risk_hessian(model: GaussianModel, W: Any, b: Any) -> np.ndarray:
    r"""Full Hessian of the risk with respect to :math:`v` (eq. B7); O(d^2) memory.

    Returns
    -------
    array of shape (n_features, n_features)
    """
    st = prepare_layer(model, W, b, second_order=False)
    beta, C = st.hessian_beta, st.hessian_core
    mu = model.means
    B = np.stack([mu[0], st.u[0], mu[1], st.u[1]], axis=1)
    H = np.einsum("k,kab->ab", beta, model.covariances) + B @ C @ B.T
    return 0.5 * (H + H.T)


# ---------------------------------------------------------------------------- steps
def _steps_from(W: Any, quantizer: Any, step: Any) -> np.ndarray:
    """Per-row steps (2,) from exactly one of ``quantizer`` and ``step``."""
    if (quantizer is None) == (step is None):
        raise ValueError(
            "pass exactly one of quantizer= (a UniformQuantizer) and step= (Delta, scalar or "
            "per-row of shape (2,))"
        )
    if quantizer is not None:
        if not hasattr(quantizer, "quantize"):
            raise ValueError(
                f"quantizer must have a .quantize(W) method, got {type(quantizer).__name__}"
            )
        step = np.asarray(_quantizer_step(quantizer, W))
        name = "quantizer.quantize(W).step"
    else:
        name = "step"
    return _check_step(step, name)


def _quantizer_step(quantizer: Any, W: Any) -> np.ndarray:
    """``quantizer.quantize(W).step``, through the cheaper ``qparams`` when there is one."""
    W = np.asarray(W, dtype=np.float64)
    if hasattr(quantizer, "qparams"):
        return quantizer.qparams(W).step
    return quantizer.quantize(W).step


def _check_step(step: Any, name: str) -> np.ndarray:
    """Per-row steps (2,): a scalar or one per row; 0 (a constant row) is valid."""
    return _check_row_steps(step, 2, name=name)


def _noise(step: np.ndarray) -> tuple[float, float]:
    """Variance s^2 and fourth cumulant of each entry of e = e_1 - e_2 (eq. B8)."""
    s2 = float(np.sum(uniform_error_variance(step)))  # (eq. E1)
    kappa = float(-np.sum(step**4) / 120.0)  # fourth cumulant of U(-D/2, D/2)
    return s2, kappa


# ---------------------------------------------------------------------------- closed forms
def _taylor(st: BinaryLayerStats, s2: float) -> float:
    return 0.5 * s2 * st.hessian_trace  # (eq. B9)


def _moment_risk(st: BinaryLayerStats, s2: float) -> tuple[float, float]:
    tau_hat = np.sqrt(st.scale**2 + s2 * st.second_moment)  # (eq. B10)
    x_hat = -_EPS * st.margin / tau_hat
    x = -_EPS * st.margin / st.scale
    d = float(st.priors @ _phi_diff(x_hat, x))  # (eq. B11)
    return d, float(st.priors @ ndtr(x_hat))


def _mixture_risk(st: BinaryLayerStats, s2: float) -> tuple[float, float]:
    r"""Distortion and quantized risk of the mixture form (eqs. B21--B22)."""
    mu, u = st.model.means, st.u
    tr = _model_cache(st.model)["trace"]
    uu = np.einsum("ka,ka->k", u, u)
    mu_u = np.einsum("ka,ka->k", mu, u)
    mm = np.einsum("ka,ka->k", mu, mu)
    safe = np.where(uu > 0, uu, 1.0)
    rho = np.where(uu > 0, mu_u / safe, 0.0)  # E[p | w] = rho w
    cond = np.maximum(mm - rho * mu_u, 0.0)  # Var(p | w) / s^2
    x, wts = _gauss_hermite()
    w = np.sqrt(2.0 * s2 * uu)[:, None] * x  # (2, n) nodes of w ~ N(0, s^2 |u|^2)
    var = (st.scale**2 + s2 * (tr + cond))[:, None] + 2.0 * w  # (eq. B21)
    var = np.maximum(var, _VAR_FLOOR * st.scale[:, None] ** 2)
    arg = -_EPS[:, None] * (st.margin[:, None] + rho[:, None] * w) / np.sqrt(var)
    x0 = -_EPS * st.margin / st.scale
    d = float(st.priors @ (_phi_diff(arg, x0[:, None]) @ wts))  # (eq. B22)
    return d, st.risk + d


@functools.cache
def _gauss_hermite() -> tuple[np.ndarray, np.ndarray]:
    """Nodes x_i and weights w_i with E f(sigma Z) = sum_i w_i f(sqrt(2) sigma x_i), Z ~ N(0, 1)."""
    x, w = np.polynomial.hermite.hermgauss(_GH_NODES)
    return x, w / np.sqrt(np.pi)


#: floor of the conditional margin variance, relative to tau_k^2 (eq. B21, far tail only)
_VAR_FLOOR = 1e-6


def _spread(st: BinaryLayerStats, s2: float, kappa: float) -> float:
    var = s2 * float(st.gradient @ st.gradient)  # (eq. B12), first order
    if np.isfinite(st.hessian_fro2):
        var += 0.25 * (2 * s2**2 * st.hessian_fro2 + kappa * st.hessian_diag2)
    return float(np.sqrt(max(var, 0.0)))


def _flip_closed(st: BinaryLayerStats, s2: float) -> np.ndarray:
    """P(flip | k) under moment matching, shape (2,) (eq. B14)."""
    tau_hat = np.sqrt(st.scale**2 + s2 * st.second_moment)
    lam = np.sqrt(s2 * st.second_moment) / st.scale
    return 2.0 * owens_t(st.margin / tau_hat, lam)


def _bvn_flip(m, tau2, p, w, q) -> np.ndarray:
    r"""P(sign(s) != sign(s + delta)) for (s, delta) bivariate normal (eq. B17).

    ``s ~ N(m, tau2)``, ``delta`` has mean ``p``, variance ``q`` and ``Cov(s, delta) = w``.
    Broadcasts over all arguments.
    """
    m, tau2, p, w, q = np.broadcast_arrays(
        *(np.asarray(t, dtype=np.float64) for t in (m, tau2, p, w, q))
    )
    tau = np.sqrt(tau2)
    tau_hat = np.sqrt(np.maximum(tau2 + 2 * w + q, np.finfo(float).tiny))
    m_hat = m + p
    det = np.maximum(tau2 * q - w * w, np.finfo(float).tiny * np.maximum(tau2 * q, 1.0))
    sq = np.sqrt(det)
    a = m / tau
    bb = m_hat / tau_hat
    num_a = tau2 * p - m * w
    num_b = m * w + m * q - tau2 * p - w * p
    with np.errstate(divide="ignore", invalid="ignore"):
        ta = np.where(m != 0, owens_t(a, num_a / (m * sq)), 0.25 * np.sign(num_a))
        tb = np.where(m_hat != 0, owens_t(bb, num_b / (m_hat * sq)), 0.25 * np.sign(num_b))
    opposite = (a >= 0) != (bb >= 0)
    out = 2.0 * (ta + tb) + opposite.astype(np.float64)
    both_zero = (m == 0) & (m_hat == 0)  # centred pair: P = arccos(rho) / pi
    if np.any(both_zero):
        rho = np.clip((tau2 + w) / (tau * tau_hat), -1.0, 1.0)
        out = np.where(both_zero, np.arccos(rho) / np.pi, out)
    return out


# ---------------------------------------------------------------------------- Monte Carlo
@dataclass(frozen=True)
class _Draws:
    """Step-free statistics of the uniform draws, per class (eq. B16).

    ``e = Delta_1 U_1 - Delta_2 U_2`` with ``U_j ~ U(-1/2, 1/2)^d``; stored are the linear
    forms ``U_j^T mu_k``, ``U_j^T u_k`` and the quadratic forms ``U_i^T Sigma_k U_j``, each of
    shape (n, 2). For a per-tensor step only ``z = U_1 - U_2`` is needed (``per_row=False``).
    """

    per_row: bool
    p: tuple  # per_row: (p1, p2); else (p,)
    w: tuple
    q: tuple  # per_row: (q11, q12, q22); else (q,)

    def forms(self, step: np.ndarray):
        d1, d2 = float(step[0]), float(step[1])
        if not self.per_row:
            return d1 * self.p[0], d1 * self.w[0], d1 * d1 * self.q[0]
        p = d1 * self.p[0] - d2 * self.p[1]
        w = d1 * self.w[0] - d2 * self.w[1]
        q = d1 * d1 * self.q[0] - 2 * d1 * d2 * self.q[1] + d2 * d2 * self.q[2]
        return p, w, q


def _draw(st: BinaryLayerStats, n_draws: int, seed, per_row: bool) -> _Draws:
    model = st.model
    d = model.n_features
    mu, cov = model.means, model.covariances
    pooled = model.covariance_type == "pooled"
    rng = np.random.default_rng(seed)
    chunk = int(max(1, min(n_draws, _CHUNK_ELEMENTS // (2 * d))))
    n_forms = 2 if per_row else 1
    p = [np.empty((n_draws, 2)) for _ in range(n_forms)]
    w = [np.empty((n_draws, 2)) for _ in range(n_forms)]
    q = [np.empty((n_draws, 2)) for _ in range(3 if per_row else 1)]
    for start in range(0, n_draws, chunk):
        stop = min(n_draws, start + chunk)
        U = rng.uniform(-0.5, 0.5, size=(stop - start, 2, d))
        Z = (U[:, 0], U[:, 1]) if per_row else (U[:, 0] - U[:, 1],)
        for i, z in enumerate(Z):
            p[i][start:stop] = z @ mu.T
            w[i][start:stop] = z @ st.u.T
        for k in range(1 if pooled else 2):
            sz = [z @ cov[k] for z in Z]
            if per_row:
                vals = (
                    np.einsum("na,na->n", sz[0], Z[0]),
                    np.einsum("na,na->n", sz[0], Z[1]),
                    np.einsum("na,na->n", sz[1], Z[1]),
                )
            else:
                vals = (np.einsum("na,na->n", sz[0], Z[0]),)
            for qq, val in zip(q, vals, strict=True):
                qq[start:stop, k] = val
                if pooled:
                    qq[start:stop, 1] = val
    return _Draws(per_row=per_row, p=tuple(p), w=tuple(w), q=tuple(q))


def _mc_eval(st: BinaryLayerStats, draws: _Draws, step: np.ndarray, *, flip: bool):
    """Monte Carlo D, its stderr, the spread and (optionally) the flip probability."""
    p, w, q = draws.forms(step)  # (n, 2) each
    m, tau2 = st.margin, st.scale**2
    x0 = -_EPS * m / st.scale  # (2,)
    risks, diffs = [], []
    for sign in (1.0, -1.0):  # antithetic pair e, -e (eq. B16)
        tau_hat = np.sqrt(np.maximum(tau2 + 2 * sign * w + q, np.finfo(float).tiny))
        x = -_EPS * (m + sign * p) / tau_hat
        diffs.append(_phi_diff(x, x0) @ st.priors)  # R(v +- e) - R(v)
        risks.append(ndtr(x) @ st.priors)
    y = 0.5 * (diffs[0] + diffs[1])  # (n,)  antithetic pair means of R(v+e) - R(v)
    n = y.size
    # control variate (eq. B16): x = e^T H e / 2, with E[x] = s^2 tr H / 2 known exactly;
    # e^T H e = sum_k beta_k e^T Sigma_k e + z^T C z with z = B^T e = (p_1, w_1, p_2, w_2)
    z = np.stack([p[:, 0], w[:, 0], p[:, 1], w[:, 1]], axis=1)
    x = 0.5 * (q @ st.hessian_beta + np.einsum("na,ab,nb->n", z, st.hessian_core, z))
    s2, _ = _noise(step)
    dist, se = _control_variate_mean(y, x, 0.5 * s2 * st.hessian_trace)
    allr = np.concatenate(risks)
    spread = float(allr.std(ddof=1)) if n > 1 else np.nan
    fl = fl_se = np.nan
    fk = np.full(2, np.nan)
    if flip:
        f_pair = 0.5 * (_bvn_flip(m, tau2, p, w, q) + _bvn_flip(m, tau2, -p, -w, q))  # (n, 2)
        fk = f_pair.mean(axis=0)
        per = f_pair @ st.priors
        fl = float(per.mean())
        fl_se = float(per.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
    return dist, se, spread, fl, fl_se, fk


def _control_variate_mean(y: np.ndarray, x: np.ndarray, x_mean: float) -> tuple[float, float]:
    """Mean of ``y`` with the control variate ``x`` of known mean (regression estimator)."""
    n = y.size
    if n < 3:
        return float(y.mean()), np.nan
    xc = x - x.mean()
    vx = float(xc @ xc)
    coef = float(xc @ (y - y.mean())) / vx if vx > 0 else 0.0
    r = y - coef * (x - x_mean)
    se = float(np.sqrt(np.sum((r - r.mean()) ** 2) / (n - 2) / n))
    return float(r.mean()), se


def _check_draws(n_draws: Any) -> int:
    if not isinstance(n_draws, (int, np.integer)) or n_draws < 2:
        raise ValueError(f"n_draws must be an integer >= 2, got {n_draws!r}")
    return int(n_draws)


# ---------------------------------------------------------------------------- public API
def distortion(
    model: GaussianModel,
    W: Any,
    b: Any,
    *,
    quantizer: Any = None,
    step: float | np.ndarray | None = None,
    method: DistortionMethod = "taylor",
    n_draws: int = 2000,
    seed: int | np.random.Generator | None = None,
    second_order_spread: bool = True,
) -> DistortionResult:
    r"""Distortion :math:`D = E_E[R(W+E)] - R(W)` of a quantized two-class layer.

    Parameters
    ----------
    model : GaussianModel
        Two-class Gaussian feature model (H_G).
    W : array of shape (2, n_features)
        Float weights.
    b : array of shape (2,) or None
        Bias, kept in floating point.
    quantizer : UniformQuantizer, optional
        The step is read from ``quantizer.quantize(W).step`` (scalar per tensor, shape (2,)
        per channel). Exactly one of ``quantizer`` and ``step``.
    step : float or array of shape (2,), optional
        Quantization step :math:`\Delta` (per tensor) or :math:`\Delta_j` per row.
    method : {"taylor", "moment", "mixture", "montecarlo"}, default "taylor"
        Second-order delta method (eq. B9), moment matching (eq. B11), the Gaussian mixture
        over the error's projection on :math:`\Sigma_k v` (eqs. B21--B22: non-perturbative
        like moment matching and exact to second order like Taylor, so without the bias
        B19), or Monte Carlo over the uniform error, exact under H_G and H_U (eq. B16).
    n_draws : int, default 2000
        Antithetic pairs of error draws (``"montecarlo"`` only).
    seed : int, Generator or None
        Seed of the Monte Carlo.
    second_order_spread : bool, default True
        Include the second-order term of the spread (eq. B12) for the closed forms; it is
        what remains when the gradient vanishes (Bayes-optimal weights) and costs two more
        passes over each covariance.

    Returns
    -------
    DistortionResult

    Notes
    -----
    With :math:`s^2 = (\Delta_1^2+\Delta_2^2)/12` and :math:`M_k = \operatorname{tr}\Sigma_k
    + \|\mu_k\|^2`,

    .. math::
       D_{\text{taylor}} = \tfrac12 s^2 \operatorname{tr}\nabla^2 R(v), \qquad
       D_{\text{moment}} = \sum_k \pi_k \left[\Phi\!\left(\frac{-\epsilon_k m_k}
       {\sqrt{\tau_k^2 + s^2 M_k}}\right) - \Phi\!\left(\frac{-\epsilon_k m_k}{\tau_k}
       \right)\right].

    The spread is :math:`\sqrt{s^2\|\nabla R\|^2 + \tfrac14(2s^4\|\nabla^2R\|_F^2 + \kappa_4
    \sum_i (\nabla^2R)_{ii}^2)}` for the closed forms (eq. B12) and the sample standard
    deviation of :math:`R(W+E)` for Monte Carlo.
    """
    if method not in ("taylor", "moment", "mixture", "montecarlo"):
        raise ValueError(
            f"method must be 'taylor', 'moment', 'mixture' or 'montecarlo', got {method!r}"
        )
    v, c = _layer(model, W, b)
    steps = _steps_from(W, quantizer, step)
    st = _prepare(model, v, c, second_order=second_order_spread and method != "montecarlo")
    s2, kappa = _noise(steps)
    if method == "montecarlo":
        n_draws = _check_draws(n_draws)
        draws = _draw(st, n_draws, seed, per_row=bool(steps[0] != steps[1]))
        d, se, spread, *_ = _mc_eval(st, draws, steps, flip=False)
        return DistortionResult(
            method=method,
            distortion=d,
            distortion_stderr=se,
            risk=st.risk,
            risk_quantized=st.risk + d,
            spread=spread,
            step=steps,
            noise_variance=s2,
            n_draws=n_draws,
        )
    if method == "taylor":
        d = _taylor(st, s2)
        rq = st.risk + d
    elif method == "mixture":
        d, rq = _mixture_risk(st, s2)
    else:
        d, rq = _moment_risk(st, s2)
    return DistortionResult(
        method=method,
        distortion=d,
        distortion_stderr=np.nan,
        risk=st.risk,
        risk_quantized=rq,
        spread=_spread(st, s2, kappa),
        step=steps,
        noise_variance=s2,
    )


def flip_rate(
    model: GaussianModel,
    W: Any,
    b: Any,
    *,
    quantizer: Any = None,
    step: float | np.ndarray | None = None,
    method: FlipMethod = "closed",
    n_draws: int = 2000,
    seed: int | np.random.Generator | None = None,
) -> FlipResult:
    r"""Flip rate: the probability that the quantized layer decides differently.

    Parameters
    ----------
    model, W, b, quantizer, step
        As in :func:`distortion`.
    method : {"closed", "montecarlo"}, default "closed"
        Moment matching: :math:`(s, \hat s) \mid k` bivariate normal (eq. B14); or Monte
        Carlo over the uniform error with the exact conditional probability given each draw
        (eq. B17), which averages exactly over the Gaussian features.
    n_draws : int, default 2000
        Antithetic pairs of draws (``"montecarlo"``).
    seed : int, Generator or None

    Returns
    -------
    FlipResult

    Notes
    -----
    :math:`\operatorname{Cov}(s, \hat s \mid k) = \tau_k^2` and
    :math:`\operatorname{Var}(\hat s\mid k) = \hat\tau_k^2 = \tau_k^2 + s^2 M_k`, so the
    correlation is :math:`\rho_k = \tau_k/\hat\tau_k` and, with Owen's :math:`T` [2]_,

    .. math:: P(\text{flip} \mid k) = \Phi(a) + \Phi(b) - 2\Phi_2(a, b; \rho_k)
       = 2\,T\!\left(\frac{m_k}{\hat\tau_k}, \frac{s\sqrt{M_k}}{\tau_k}\right),

    where :math:`a = m_k/\tau_k`, :math:`b = m_k/\hat\tau_k = \rho_k a`.
    """
    if method not in ("closed", "montecarlo"):
        raise ValueError(f"method must be 'closed' or 'montecarlo', got {method!r}")
    v, c = _layer(model, W, b)
    steps = _steps_from(W, quantizer, step)
    st = _prepare(model, v, c, second_order=False)
    s2, _ = _noise(steps)
    if method == "closed":
        fk = _flip_closed(st, s2)
        return FlipResult(
            method=method,
            flip_rate=float(st.priors @ fk),
            flip_rate_stderr=np.nan,
            class_flip_rate=fk,
            step=steps,
        )
    n_draws = _check_draws(n_draws)
    draws = _draw(st, n_draws, seed, per_row=bool(steps[0] != steps[1]))
    *_, fl, fl_se, fk = _mc_eval(st, draws, steps, flip=True)
    return FlipResult(
        method=method,
        flip_rate=fl,
        flip_rate_stderr=fl_se,
        class_flip_rate=fk,
        step=steps,
        n_draws=n_draws,
    )


def flip_rate_of_weights(
    model: GaussianModel, W: Any, b: Any, W_hat: Any, b_hat: Any
) -> FlipResult:
    r"""Exact flip rate between two given layers under H_G (level 2).

    Parameters
    ----------
    model : GaussianModel
    W, b : arrays of shape (2, n_features) and (2,)
        Float layer.
    W_hat, b_hat : arrays of shape (2, n_features) and (2,)
        Quantized layer (for example ``QuantizedTensor.values``).

    Returns
    -------
    FlipResult
        ``method="weights"``, no sampling error.

    Notes
    -----
    :math:`(s, \hat s - s)` is bivariate normal given the class, with
    :math:`\hat s - s = e^\top x + \delta c`; eq. B17 gives the probability of opposite
    signs (eq. B18).
    """
    v, c = _layer(model, W, b)
    v_hat, c_hat = _layer(model, W_hat, b_hat, names=("W_hat", "b_hat"))
    st = _prepare(model, v, c, second_order=False)
    e = v_hat - v
    cov = model.covariances
    p = model.means @ e + (c_hat - c)
    w = st.u @ e
    q = (cov @ e) @ e
    fk = _bvn_flip(st.margin, st.scale**2, p, w, q)
    return FlipResult(
        method="weights",
        flip_rate=float(st.priors @ fk),
        flip_rate_stderr=np.nan,
        class_flip_rate=fk,
        step=np.full(2, np.nan),
    )


def flip_probability(*args: Any, **kwargs: Any) -> FlipResult:
    """Deprecated alias of :func:`flip_rate`."""
    return deprecated_alias("flip_rate", "flip_probability", flip_rate)(*args, **kwargs)


def flip_probability_of_weights(*args: Any, **kwargs: Any) -> FlipResult:
    """Deprecated alias of :func:`flip_rate_of_weights`."""
    fn = deprecated_alias(
        "flip_rate_of_weights", "flip_probability_of_weights", flip_rate_of_weights
    )
    return fn(*args, **kwargs)


def _curve_steps(W, bits, steps, quantizer_options, need_values) -> tuple[np.ndarray, list | None]:
    if steps is not None:
        s = np.asarray(steps, dtype=np.float64)
        if s.ndim == 1:
            s = np.stack([s, s], axis=1)
        if s.shape != (bits.size, 2):
            raise ValueError(
                f"steps must have shape (n_bits,) or (n_bits, 2) = ({bits.size}, 2), "
                f"got {np.shape(steps)}"
            )
        return np.stack([_check_step(r, "steps") for r in s]), None
    from distortion.quantize import UniformQuantizer

    opts = dict(quantizer_options or {})
    qts, rows = [], []
    for bb in bits:
        try:
            qz = UniformQuantizer(int(bb), **opts)
        except TypeError as exc:
            raise ValueError(
                f"quantizer_options are not accepted by UniformQuantizer: {exc}"
            ) from exc
        if need_values:
            qt = qz.quantize(np.asarray(W, dtype=np.float64))
            step, values = qt.step, qt.values
        else:
            step, values = _quantizer_step(qz, W), None
        rows.append(_check_step(np.asarray(step), "quantizer.quantize(W).step"))
        qts.append(values)
    return np.stack(rows), qts


def distortion_curve(
    model: GaussianModel,
    W: Any,
    b: Any,
    *,
    bits: Iterable[int] = range(1, 17),
    steps: np.ndarray | None = None,
    quantizer_options: dict | None = None,
    methods: Sequence[CurveMethod] = ("taylor", "moment", "montecarlo"),
    n_draws: int = 2000,
    seed: int | np.random.Generator | None = None,
    flip: bool = True,
    second_order_spread: bool = True,
) -> DistortionCurve:
    r"""Distortion and flip probability against bit-width.

    Parameters
    ----------
    model : GaussianModel
    W : array of shape (2, n_features)
    b : array of shape (2,) or None
    bits : iterable of int, default 1..16
        Bit-widths, each in 1..16.
    steps : array of shape (n_bits,) or (n_bits, 2), optional
        Steps to use instead of quantizing ``W``.
    quantizer_options : dict, optional
        Keyword arguments of :class:`distortion.quantize.UniformQuantizer` (``scheme``,
        ``granularity``, ``clipping``, ...); the step of each bit-width is that of
        ``UniformQuantizer(bits, **quantizer_options).quantize(W)``.
    methods : sequence of {"taylor", "moment", "mixture", "montecarlo", "actual"}
        ``"actual"`` is level 2: the risk of the actually quantized weights (eq. B3) minus
        :math:`R(W)`, and their exact flip probability (eq. B17); needs a quantizer.
    n_draws : int, default 2000
        Antithetic pairs of draws for ``"montecarlo"``; the same draws (scaled by the step)
        serve every bit-width.
    seed : int, Generator or None
    flip : bool, default True
        Also compute the flip probability (closed form eq. B14 for ``"taylor"`` and
        ``"moment"``, Monte Carlo for ``"montecarlo"``).
    second_order_spread : bool, default True
        Second-order term of the closed-form spread (eq. B12); see :func:`distortion`.

    Returns
    -------
    DistortionCurve
        ``.to_frame()`` has one row per bit-width and method.

    Notes
    -----
    Everything that does not depend on the step (:math:`\Sigma_k v`, the gradient and the
    Hessian trace, :math:`M_k`) is computed once, so the closed forms cost O(1) per
    bit-width after an :math:`O(d^2)` preparation.
    """
    bits_arr = np.asarray(list(bits), dtype=np.int64)
    if bits_arr.ndim != 1 or bits_arr.size == 0 or np.any((bits_arr < 1) | (bits_arr > 16)):
        raise ValueError(f"bits must be a non-empty sequence of integers in 1..16, got {bits!r}")
    methods = tuple(methods)
    bad = [m for m in methods if m not in (*_CLOSED, "montecarlo", "actual")]
    if not methods or bad:
        raise ValueError(
            f"methods must be a non-empty subset of 'taylor', 'moment', 'mixture', "
            f"'montecarlo', 'actual'; got {methods!r}"
        )
    if "actual" in methods and steps is not None:
        raise ValueError(
            "method 'actual' needs quantized weights: pass quantizer_options, not steps"
        )
    v, c = _layer(model, W, b)
    step_rows, qts = _curve_steps(W, bits_arr, steps, quantizer_options, "actual" in methods)
    closed = any(m in _CLOSED for m in methods)
    st = _prepare(model, v, c, second_order=closed and second_order_spread)
    nb, nm = bits_arr.size, len(methods)
    out = {k: np.full((nb, nm), np.nan) for k in ("d", "se", "sp", "fl", "fse")}
    draws = None
    if "montecarlo" in methods:
        n_draws = _check_draws(n_draws)
        per_row = bool(np.any(step_rows[:, 0] != step_rows[:, 1]))
        draws = _draw(st, n_draws, seed, per_row=per_row)
    for i, steps_i in enumerate(step_rows):
        s2, kappa = _noise(steps_i)
        fk_closed = _flip_closed(st, s2) if flip and closed else None
        for j, meth in enumerate(methods):
            if meth == "taylor":
                out["d"][i, j] = _taylor(st, s2)
            elif meth == "moment":
                out["d"][i, j] = _moment_risk(st, s2)[0]
            elif meth == "mixture":
                out["d"][i, j] = _mixture_risk(st, s2)[0]
            if meth in _CLOSED:
                out["sp"][i, j] = _spread(st, s2, kappa)
                if fk_closed is not None:
                    out["fl"][i, j] = float(st.priors @ fk_closed)
            elif meth == "montecarlo":
                d, se, sp, fl, fse, _ = _mc_eval(st, draws, steps_i, flip=flip)
                out["d"][i, j], out["se"][i, j], out["sp"][i, j] = d, se, sp
                out["fl"][i, j], out["fse"][i, j] = fl, fse
            else:  # actual, level 2
                vals = qts[i]
                r = risk_of_weights(model, vals, b).risk
                out["d"][i, j] = r - st.risk
                if flip:
                    out["fl"][i, j] = flip_rate_of_weights(model, W, b, vals, b).flip_rate
    return DistortionCurve(
        bits=bits_arr,
        step=step_rows,
        methods=methods,
        risk=st.risk,
        distortion=out["d"],
        distortion_stderr=out["se"],
        spread=out["sp"],
        flip_rate=out["fl"],
        flip_rate_stderr=out["fse"],
        n_draws=int(n_draws) if draws is not None else 0,
    )
