r"""Level 3: the empirical features of the last layer and an error model (H_U), per sample.

The last layer is :math:`z = Wx + b`, :math:`W \in \mathbb{R}^{K\times d}`; its compressed
version :math:`\hat W = W + E` has errors of variance :math:`\sigma_j^2` in row :math:`j`
(what a compressor's error model gives: :math:`\Delta_j^2/12` for rounding under H_U,
through :func:`distortion.theory.error_models.uniform_error_variance`). Without any
hypothesis on the features, the flip and correct-decision probabilities of each sample are
one-dimensional Gauss--Hermite integrals (``theory/multiclass.md``, eq. M12--M14), and the
flip count of *one* realization of :math:`E` gets an order-statistic band from simulated
realizations on the same samples (eq. M15--M16; degenerate cases: ``theory/multilayer.md``
eq. L15).

Moved here from :mod:`distortion.theory.multiclass`, which still re-exports
:class:`SemiParametricDistortion` and :func:`semiparametric_distortion`.

numpy and scipy only at import time (pandas is imported by ``to_frame``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import special

from distortion._validation import (
    as_float_array,
    check_count,
    check_linear_layer,
    resolve_variance,
)
from distortion.results import Band, Prediction, check_confidence_level, deprecated_alias
from distortion.theory._bands import min_realizations, order_statistic_band
from distortion.theory.error_models import UNIFORM_SECOND_MOMENT

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SemiParametricDistortion", "semiparametric_distortion"]

_CHUNK_ELEMENTS = 1 << 21  # floats per work array (16 MiB)
_NAN_BAND = Band(float("nan"), float("nan"))


# ----------------------------------------------------------------------------- quadrature
def _hermite_rule(n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Gauss--Hermite rule for :math:`E f(t)`, :math:`t \sim N(0, 1)` (eq. M10)."""
    t, w = special.roots_hermitenorm(n_nodes)
    return t, w / w.sum()


def _auto_nodes(sigma: np.ndarray) -> int:
    """Enough nodes for the sharpest factor of the integrand (eq. M10).

    Rows without error (:math:`\\sigma_j = 0`, a constant row) do not count: their factor
    is an indicator, handled by the truncation of :func:`_truncated_stay`.
    """
    pos = sigma[sigma > 0]
    if pos.size == 0:
        return 48
    ratio = float(pos.max() / pos.min())
    return int(min(1024, 48 * math.ceil(ratio)))


def _stay_probability(
    z: np.ndarray, scale: np.ndarray, ref: np.ndarray, t: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    r""":math:`P(\arg\max(z+\delta) = r)` and its complement, :math:`\delta_j \sim N(0, s_j^2)`.

    ``z`` and ``scale`` have shape (n, K) (``scale >= 0``), ``ref`` shape (n,). Conditioning
    on :math:`\delta_r = s_r t` leaves independent factors (eq. M9):
    :math:`P = E_t \prod_{j\ne r} \Phi((z_r - z_j + s_r t)/s_j)`, integrated by Gauss--Hermite
    (eq. M10) in log space so that tiny complements keep their relative accuracy. A factor
    with :math:`s_j = 0` is its limit, the indicator of :math:`z_r - z_j + s_r t > 0`
    (:math:`\Phi(0) = 1/2` on a tie): constant when :math:`s_r = 0`, else a truncation of
    the integral (:func:`_truncated_stay`).
    """
    n, k = z.shape
    stay = np.empty(n)
    leave = np.empty(n)
    rows = max(1, _CHUNK_ELEMENTS // (t.size * k))
    for s0 in range(0, n, rows):
        sl = slice(s0, min(n, s0 + rows))
        zc, sc, rc = z[sl], scale[sl], ref[sl]
        idx = np.arange(zc.shape[0])
        zero = sc == 0
        zero[idx, rc] = False
        sr = sc[idx, rc]
        trunc = np.any(zero, axis=1) & (sr > 0)
        if np.any(trunc):
            it = np.flatnonzero(trunc)
            stay[sl][it], leave[sl][it] = _truncated_stay(zc[it], sc[it], rc[it], t.size)
            keep = np.flatnonzero(~trunc)
            if keep.size == 0:
                continue
            zc, sc, rc, zero = zc[keep], sc[keep], rc[keep], zero[keep]
        else:
            keep = idx
        ii = np.arange(zc.shape[0])
        zr = zc[ii, rc]
        sr = sc[ii, rc]
        num = (zr[:, None] - zc)[:, None, :] + (sr[:, None] * t[None, :])[:, :, None]
        if np.any(sc == 0):  # rows without error; here s_r = 0: constant indicators
            with np.errstate(divide="ignore", invalid="ignore"):
                arg = num / sc[:, None, :]
            ind = np.where(num > 0, np.inf, np.where(num < 0, -np.inf, 0.0))
            arg = np.where(zero[:, None, :], ind, arg)
        else:
            arg = num / sc[:, None, :]
        logp = special.log_ndtr(arg)  # (m, Q, K)
        logp[ii, :, rc] = 0.0
        total = logp.sum(axis=2)  # (m, Q)
        stay[sl][keep] = np.exp(total) @ w
        leave[sl][keep] = -np.expm1(total) @ w
    return np.clip(stay, 0.0, 1.0), np.clip(leave, 0.0, 1.0)


def _truncated_stay(
    z: np.ndarray, scale: np.ndarray, ref: np.ndarray, n_nodes: int
) -> tuple[np.ndarray, np.ndarray]:
    r"""Stay / leave probabilities when some competitors have no error and :math:`s_r > 0`.

    The exact competitors :math:`j` (:math:`s_j = 0`) restrict the integral to
    :math:`t > c = \max_j (z_j - z_r)/s_r`, so that
    :math:`P(\text{stay}) = \int_c^\infty \varphi(t) \prod_{s_j > 0}
    \Phi((z_r - z_j + s_r t)/s_j)\,dt`. With :math:`v = \Phi(-t) \in (0, \Phi(-c))` the
    integrand is smooth, and Gauss--Legendre in :math:`v` integrates it;
    :math:`P(\text{leave}) = \Phi(c) + \int (1 - \prod)\,dv` keeps small leave
    probabilities accurate.
    """
    m, k = z.shape
    ii = np.arange(m)
    zr = z[ii, ref]
    sr = scale[ii, ref]
    zero = scale == 0
    zero[ii, ref] = False
    c = np.max(np.where(zero, (z - zr[:, None]) / sr[:, None], -np.inf), axis=1)  # (m,)
    top = special.ndtr(-c)  # (m,) the measure of t > c
    x, wl = np.polynomial.legendre.leggauss(max(int(n_nodes), 64))
    v = top[:, None] * (0.5 * (1.0 - x))[None, :]  # (m, Q) nodes in (0, top)
    wv = top[:, None] * (0.5 * wl)[None, :]
    tt = -special.ndtri(v)  # (m, Q) t > c
    num = (zr[:, None] - z)[:, None, :] + (sr[:, None] * tt)[:, :, None]  # (m, Q, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        arg = num / scale[:, None, :]
    arg = np.where(zero[:, None, :], np.inf, arg)  # satisfied on t > c
    logp = special.log_ndtr(arg)
    logp[ii, :, ref] = 0.0
    total = logp.sum(axis=2)
    stay = np.sum(wv * np.exp(total), axis=1)
    leave = special.ndtr(c) + np.sum(wv * -np.expm1(total), axis=1)
    return np.clip(stay, 0.0, 1.0), np.clip(leave, 0.0, 1.0)


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True)
class SemiParametricDistortion:
    r"""Level 3: per-sample flip and correctness probabilities (empirical features, H_U).

    Attributes
    ----------
    n_samples : int
    flip_rate : float
        Mean per-sample flip probability (moment-matched, eq. M13): the expected flip rate.
    accuracy_float : float
        Accuracy of the float layer on the samples (NaN without labels).
    accuracy_quantized : float
        Mean per-sample probability of a correct quantized decision (NaN without labels).
    accuracy_loss : float
        ``accuracy_float - accuracy_quantized`` (NaN without labels).
    coverage : float
        Nominal coverage of the bands.
    n_nodes : int
        Gauss--Hermite nodes of the quadrature (eq. M10).
    flip_probabilities : array of shape (n_samples,)
    correct_probabilities : array of shape (n_samples,) or None
    predictions : array of shape (n_samples,)
        Float decisions :math:`\hat y_i`.
    labels : array of shape (n_samples,) or None
    flip_counts : array of shape (n_realizations,)
        Flip counts of simulated realizations of :math:`E` (uniform, H_U) on the same samples.
    correct_counts : array of shape (n_realizations,) or None
        Correct quantized decisions in the same realizations.
    noise_variances : array of shape (n_classes,) or None
        The error variance :math:`\sigma_j^2` of each row of ``W`` that was used.
    """

    n_samples: int
    flip_rate: float
    accuracy_float: float
    accuracy_quantized: float
    accuracy_loss: float
    coverage: float
    n_nodes: int
    flip_probabilities: np.ndarray = field(repr=False)  # (N,)
    correct_probabilities: np.ndarray | None = field(repr=False)  # (N,) or None
    predictions: np.ndarray = field(repr=False)  # (N,) int64
    labels: np.ndarray | None = field(repr=False)  # (N,) int64 or None
    flip_counts: np.ndarray = field(repr=False)  # (R,) int64
    correct_counts: np.ndarray | None = field(repr=False)  # (R,) int64 or None
    noise_variances: np.ndarray | None = field(default=None, repr=False)  # (K,)

    @property
    def n_realizations(self) -> int:
        """Number of simulated realizations of E behind the bands."""
        return 0 if self.flip_counts is None else int(self.flip_counts.size)

    def _coverage(self, coverage: float | None) -> float:
        return self.coverage if coverage is None else check_confidence_level(coverage, "coverage")

    def expected_flips(self) -> float:
        r""":math:`\sum_i p_i`, the expected flip count of one realization (eq. M15)."""
        return float(self.flip_probabilities.sum())

    def flip_band(self, coverage: float | None = None) -> Band:
        """Prediction interval of the flip rate of one realization of E (eq. M16, L15)."""
        return order_statistic_band(self.flip_counts, self.n_samples, self._coverage(coverage))

    def accuracy_band(self, coverage: float | None = None) -> Band:
        """Prediction interval of the quantized accuracy of one realization (eq. M16, L15)."""
        if self.correct_counts is None:
            raise ValueError("accuracy_band needs labels; pass labels= to the function")
        return order_statistic_band(self.correct_counts, self.n_samples, self._coverage(coverage))

    def accuracy_loss_band(self, coverage: float | None = None) -> Band:
        """Prediction interval of the accuracy loss of one realization (eq. M16, L15).

        NaN ends without labels (as :meth:`MultilayerDistortion.accuracy_loss_band`).
        """
        if self.correct_counts is None:
            self._coverage(coverage)
            return _NAN_BAND
        lo, hi = self.accuracy_band(coverage)
        return Band(self.accuracy_float - hi, self.accuracy_float - lo)

    def flip_rate_realization_sd(self) -> float:
        """Standard deviation of the flip rate across realizations of E (eq. M15)."""
        if self.flip_counts is None or self.flip_counts.size < 2:
            return float("nan")
        return float(np.std(self.flip_counts, ddof=1)) / self.n_samples

    def flip_rate_sd(self) -> float:
        """Deprecated alias of :meth:`flip_rate_realization_sd`."""
        return deprecated_alias(
            "flip_rate_realization_sd()", "flip_rate_sd()", self.flip_rate_realization_sd()
        )

    def flip_rate_binomial_sd(self) -> float:
        r""":math:`\sqrt{\sum_i p_i(1-p_i)}/N`: the sd if the flips were independent."""
        p = self.flip_probabilities
        return float(np.sqrt(np.sum(p * (1 - p)))) / self.n_samples

    def simulated_flip_rate(self) -> float:
        """Mean flip rate of the simulated realizations (exact under H_U, no CLT)."""
        if self.flip_counts is None or self.flip_counts.size == 0:
            return float("nan")
        return float(np.mean(self.flip_counts)) / self.n_samples

    def to_prediction(self) -> Prediction:
        """The result as a level-``"3"`` :class:`~distortion.results.Prediction`.

        The flip rate and accuracy loss are deterministic quadratures (stderr 0); the bands
        are those of one realization (:meth:`flip_band`, :meth:`accuracy_loss_band`).
        """
        labelled = self.labels is not None
        return Prediction(
            level="3",
            flip_rate=self.flip_rate,
            flip_rate_stderr=0.0,
            flip_rate_band=self.flip_band(),
            accuracy_loss=self.accuracy_loss,
            accuracy_loss_stderr=0.0 if labelled else float("nan"),
            accuracy_loss_band=self.accuracy_loss_band(),
            accuracy_float=self.accuracy_float,
            accuracy_compressed=self.accuracy_quantized,
            n_samples=self.n_samples,
            coverage=self.coverage,
            method="quadrature",
        )

    def to_frame(self, *, per_sample: bool = False) -> pd.DataFrame:
        """Headline numbers and bands as one row, or the per-sample probabilities."""
        import pandas as pd

        if per_sample:
            cols = {
                "prediction": self.predictions,
                "flip_probability": self.flip_probabilities,
            }
            if self.labels is not None:
                cols["label"] = self.labels
                cols["correct_probability"] = self.correct_probabilities
            return pd.DataFrame(cols)
        fb = self.flip_band()
        row = {
            "n_samples": self.n_samples,
            "flip_rate": self.flip_rate,
            "flip_rate_low": fb.low,
            "flip_rate_high": fb.high,
            "flip_rate_realization_sd": self.flip_rate_realization_sd(),
            "flip_rate_binomial_sd": self.flip_rate_binomial_sd(),
            "accuracy_float": self.accuracy_float,
            "accuracy_quantized": self.accuracy_quantized,
            "accuracy_loss": self.accuracy_loss,
            "coverage": self.coverage,
            "n_realizations": self.n_realizations,
        }
        if self.correct_counts is not None and self.n_realizations:
            lb = self.accuracy_loss_band()
            row["accuracy_loss_low"], row["accuracy_loss_high"] = lb.low, lb.high
        return pd.DataFrame([row])


# ----------------------------------------------------------------------------- simulation
def _simulate_realizations(
    x: np.ndarray,
    z: np.ndarray,
    pred: np.ndarray,
    labels: np.ndarray | None,
    sigma: np.ndarray,
    n_realizations: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Flip (and correct) counts of uniform error realizations on the same samples.

    Row ``j`` of each realization is uniform with variance ``sigma[j]**2`` (H_U): width
    ``sigma / sqrt(E[u^2])`` for ``u ~ U(-1/2, 1/2)`` (eq. E1); a zero ``sigma`` leaves
    that row exact.
    """
    n, d = x.shape
    kk = z.shape[1]
    width = sigma / math.sqrt(UNIFORM_SECOND_MOMENT)  # the step of an H_U rounding
    flips = np.zeros(n_realizations, dtype=np.int64)
    correct = None if labels is None else np.zeros(n_realizations, dtype=np.int64)
    batch = max(1, min(n_realizations, _CHUNK_ELEMENTS // max(1, kk * min(n, 4096))))
    rows = max(1, _CHUNK_ELEMENTS // (batch * kk))
    for r0 in range(0, n_realizations, batch):
        nb = min(batch, n_realizations - r0)
        e = rng.uniform(-0.5, 0.5, size=(nb, kk, d)) * width[None, :, None]  # H_U
        ef = e.reshape(nb * kk, d).T  # (d, nb*K)
        for s0 in range(0, n, rows):
            sl = slice(s0, min(n, s0 + rows))
            zq = z[sl][:, None, :] + (x[sl] @ ef).reshape(-1, nb, kk)
            predq = np.argmax(zq, axis=2)  # (m, nb)
            flips[r0 : r0 + nb] += np.sum(predq != pred[sl][:, None], axis=0)
            if correct is not None:
                correct[r0 : r0 + nb] += np.sum(predq == labels[sl][:, None], axis=0)
    return flips, correct


def semiparametric_distortion(
    features: np.ndarray,
    W: np.ndarray,
    b: np.ndarray | None,
    *,
    variance: float | np.ndarray | None = None,
    step: float | np.ndarray | None = None,
    labels: np.ndarray | None = None,
    n_nodes: int | None = None,
    n_realizations: int = 400,
    coverage: float = 0.95,
    seed: int | np.random.Generator | None = None,
) -> SemiParametricDistortion:
    r"""Level 3: per-sample flip probabilities from the empirical features under H_U.

    Parameters
    ----------
    features : array of shape (n_samples, n_features)
        Penultimate features :math:`x_i` (no Gaussian hypothesis).
    W : array of shape (n_classes, n_features)
    b : array of shape (n_classes,) or None
    variance : float or array of shape (n_classes,), optional
        Error variance :math:`\sigma_j^2` of the entries of ``W`` (per tensor or per row),
        as a compressor's error model gives it (``ErrorModel.second_moment``); 0 for a row
        left exact. Exactly one of ``variance`` and ``step``.
    step : float or array of shape (n_classes,), optional
        Quantization step of ``W`` (per tensor or per row; 0 for a constant row, which the
        quantizer returns unchanged), converted to :math:`\Delta_j^2/12` by
        :func:`distortion.theory.error_models.uniform_error_variance`.
    labels : array of shape (n_samples,), optional
        True classes, needed only for the accuracy and its loss.
    n_nodes : int, optional
        Gauss--Hermite nodes (default 48 times the ceiling of the largest ratio of the
        positive :math:`\sigma_j`, at most 1024).
    n_realizations : int, default 400
        Simulated realizations of :math:`E` (uniform with these variances, H_U) on the same
        samples, for the band of one realization; 0 skips the simulation (bands are then
        NaN). Each costs about ``n_samples * n_features * n_classes`` flops (0.003 s for
        CIFAR-10 with d = 64; ~1e11 flops for the ImageNet validation set, where tens or 0
        are advisable).
    coverage : float, default 0.95
        Nominal coverage of the prediction bands; needs ``n_realizations`` of at least
        :func:`distortion.theory._bands.min_realizations` (39 at 0.95), or 0.
    seed : int, Generator or None
        Seeds the simulated realizations.

    Returns
    -------
    SemiParametricDistortion

    Notes
    -----
    Given :math:`x_i`, :math:`\hat z_i = z_i + Ex_i` has mean :math:`z_i` and covariance
    :math:`\|x_i\|^2\operatorname{diag}(\sigma_j^2)` under H_U, and is Gaussian to the
    order of the central limit theorem (eq. M12). With :math:`r = \hat y_i` the margins
    :math:`\hat z_r - \hat z_j` share :math:`\delta_r`; conditioning on it (eq. M9, M13)

    .. math:: P(\text{flip}_i) = 1 - E_{t\sim N(0,1)} \prod_{j \ne r}
              \Phi\!\left(\frac{z_{ir} - z_{ij} + \sigma_r\|x_i\|\,t}{\sigma_j\|x_i\|}\right),

    integrated by Gauss--Hermite quadrature (a row with :math:`\sigma_j = 0` contributes the
    indicator of a positive numerator). The flip count of a single realization of
    :math:`E` is a sum of *dependent* Bernoulli variables (they share :math:`E`, eq. M15);
    its band is the order-statistic prediction interval of ``n_realizations`` simulated
    uniform realizations on the same samples (eq. M16, L15), which covers a new realization
    with probability at least ``coverage`` under H_U.

    References
    ----------
    .. [1] D. Resmerita et al., "Distortion approximation of a compressed softmax layer",
       IEEE SSP 2021.
    .. [2] S. S. Wilks, "Determination of sample sizes for setting tolerance limits",
       Ann. Math. Statist. 12(1), 1941 (order-statistic prediction intervals).
    """
    x = as_float_array(features, "features")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(
            f"features must have shape (n_samples, n_features) with n_samples >= 1, "
            f"got shape {x.shape}"
        )
    w = as_float_array(W, "W")
    if w.ndim != 2:
        raise ValueError(f"W must have shape (n_classes, n_features), got shape {w.shape}")
    n, d = x.shape
    kk = w.shape[0]
    if kk < 2:
        raise ValueError(f"W must have at least 2 rows (classes), got {kk}")
    w, bias = check_linear_layer(w, b, kk, d)
    sigma2 = resolve_variance(step, variance, kk)
    y = None
    if labels is not None:
        y = np.asarray(labels)
        if y.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) to match features, got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= kk:
            raise ValueError(f"labels must be integers in 0..{kk - 1} (K mismatch otherwise)")
        y = y.astype(np.int64)
    n_realizations = check_count(n_realizations, "n_realizations", 0)
    coverage = check_confidence_level(coverage, "coverage")
    need = min_realizations(coverage)
    if 0 < n_realizations < need:
        raise ValueError(
            f"coverage={coverage} needs n_realizations >= {need} (or 0 for no band), "
            f"got {n_realizations}"
        )
    sigma = np.sqrt(sigma2)
    nodes = check_count(n_nodes, "n_nodes", 2) if n_nodes is not None else _auto_nodes(sigma)
    t, wq = _hermite_rule(nodes)

    z = x @ w.T + bias  # (N, K)
    pred = np.argmax(z, axis=1)
    norm = np.linalg.norm(x, axis=1)
    pos = norm > 0
    flip_p = np.zeros(n)  # zero features: the logits do not move
    correct_p = None if y is None else (pred == y).astype(np.float64)
    if np.any(pos):
        scale = norm[pos, None] * sigma[None, :]  # (eq. M12)
        _, flip_p[pos] = _stay_probability(z[pos], scale, pred[pos], t, wq)  # (eq. M13)
        if y is not None:
            correct_p[pos], _ = _stay_probability(z[pos], scale, y[pos], t, wq)
    rng = np.random.default_rng(seed)
    flips, correct = _simulate_realizations(x, z, pred, y, sigma, n_realizations, rng)
    acc_f = float(np.mean(pred == y)) if y is not None else float("nan")
    acc_q = float(np.mean(correct_p)) if y is not None else float("nan")
    return SemiParametricDistortion(
        n_samples=n,
        flip_rate=float(np.mean(flip_p)),
        accuracy_float=acc_f,
        accuracy_quantized=acc_q,
        accuracy_loss=acc_f - acc_q,
        coverage=float(coverage),
        n_nodes=nodes,
        flip_probabilities=flip_p,
        correct_probabilities=correct_p,
        predictions=pred.astype(np.int64),
        labels=y,
        flip_counts=flips,
        correct_counts=correct,
        noise_variances=sigma2,
    )
