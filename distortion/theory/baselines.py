r"""Published comparators: Sakr et al.'s mismatch bound and the HAWQ-V2 sensitivity.

Both are computed from the same quantities as the first-order model of
:mod:`distortion.theory.multilayer`, so that they can be shown beside it:

* :func:`sakr_bound` — Sakr, Kim and Shanbhag (ICML 2017), Theorem 1 for weight
  quantization: :math:`p_m \le \sum_\ell \Delta_\ell^2 E_\ell` with the noise gain
  :math:`E_\ell = E_x\bigl[\sum_{j\ne\hat y} G_{\ell j}(x) / (24\,(z_{\hat y}-z_j)^2)\bigr]`
  (eq. BL1-BL4), from the squared margin gradient norms :math:`G_{\ell j}` of a
  :class:`~distortion.theory.multilayer.GradientGrams` and the float margins.
* :func:`hawq_v2_sensitivity` — Dong et al. (NeurIPS 2020):
  :math:`\Omega_\ell = \operatorname{Tr}(H_\ell)/n_\ell \cdot \|Q(W_\ell) - W_\ell\|^2`
  (eq. BL5), with the Hutchinson trace of :class:`HessianTrace` (eq. BL6), estimated by
  :func:`distortion.experiments.sensitivity.hessian_trace` — or, exactly for networks
  that are piecewise linear in each layer's weights (ReLU, batch norm in eval mode), from
  the same Grams by :func:`gauss_newton_trace` (eq. BL7).

The derivations are in ``theory/baselines.md`` (equations ``BL#``).

References
----------
.. [1] C. Sakr, Y. Kim and N. Shanbhag, "Analytical guarantees on numerical precision of
   deep neural networks", ICML 2017, PMLR 70:3007-3016.
.. [2] Z. Dong, Z. Yao, D. Arfeen, A. Gholami, M. W. Mahoney and K. Keutzer, "HAWQ-V2:
   Hessian aware trace-weighted quantization of neural networks", NeurIPS 2020.
.. [3] M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
   Laplacian smoothing splines", Comm. Statist. Simulation Comput. 18(3), 1989.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

from distortion.results import Prediction
from distortion.theory.error_models import uniform_error_variance
from distortion.theory.multilayer import GradientGrams

__all__ = [
    "HawqSensitivity",
    "HessianTrace",
    "SakrBound",
    "gauss_newton_trace",
    "hawq_v2_sensitivity",
    "sakr_bound",
    "sakr_noise_gains",
]


# ----------------------------------------------------------------------------- Sakr et al.
def _packed_index(k: int) -> np.ndarray:
    """(K, K) index of entry (i, j) in a row-major packed upper triangle."""
    iu = np.triu_indices(k)
    idx = np.empty((k, k), dtype=np.int64)
    idx[iu] = np.arange(iu[0].size)
    idx[iu[1], iu[0]] = np.arange(iu[0].size)
    return idx


def _per_sample_gains(grams: GradientGrams, *, channel: bool) -> np.ndarray:
    r"""Per-sample noise gains :math:`\sum_{j\ne\hat y} G_{\ell j}/(24 m_j^2)` (eq. BL3).

    Shape (N, L), or (N, C) per output channel.
    """
    n, k = grams.n_samples, grams.n_classes
    pred = grams.predictions()
    rows = np.arange(n)
    m = grams.logits[rows, pred][:, None] - grams.logits  # (N, K), 0 at j = pred
    others = np.ones((n, k), dtype=bool)
    others[rows, pred] = False
    with np.errstate(divide="ignore"):
        w = np.where(others, 1.0 / (24.0 * m**2), 0.0)  # (eq. BL3); inf on exact ties
    if not channel:
        g = grams.margin_gradient_norms()  # (N, L, K)
        with np.errstate(invalid="ignore"):
            return np.einsum("nlk,nk->nl", g, w)
    if grams.channel_grams is None:
        raise ValueError(
            "per-channel gains need per-channel Gram matrices; recompute the cache with "
            "gradient_grams(..., granularity='channel')"
        )
    idx = _packed_index(k)
    cg = grams.channel_grams
    rr = cg[rows, :, idx[pred, pred]].astype(np.float64)  # (N, C)
    rj = np.swapaxes(cg[rows[:, None], :, idx[pred]], 1, 2).astype(np.float64)  # (N, C, K)
    jj = cg[:, :, idx[np.arange(k), np.arange(k)]].astype(np.float64)  # (N, C, K)
    g = np.clip(rr[:, :, None] - 2.0 * rj + jj, 0.0, None)
    with np.errstate(invalid="ignore"):
        return np.einsum("nck,nk->nc", g, w)


def sakr_noise_gains(grams: GradientGrams, *, channel: bool = False) -> np.ndarray:
    r"""Sakr et al.'s weight noise gains :math:`E_\ell`, shape (L,) (or (C,) per channel).

    .. math:: E_\ell = E_x\Bigl[\sum_{j\ne\hat y}\sum_{w\in W_\ell}
              \frac{|\partial(z_j - z_{\hat y})/\partial w|^2}{24\,(z_{\hat y} - z_j)^2}\Bigr]
              \qquad \text{(eq. BL4)}

    ``inf`` when a sample has an exact tie between its two largest logits.
    """
    return _per_sample_gains(grams, channel=channel).mean(axis=0)


@dataclass(frozen=True)
class SakrBound:
    r"""Sakr et al.'s upper bound on the mismatch (flip) probability.

    Attributes
    ----------
    bound : float
        :math:`\sum_\ell \Delta_\ell^2 E_\ell` (eq. BL4) — may exceed 1.
    bound_clipped : float
        :math:`E_x[\min(1, b(x))]` with :math:`b(x)` the per-sample bound: also valid, tighter.
    layer_names : tuple of str, length L
    layer_terms : array of shape (L,)
        :math:`\Delta_\ell^2 E_\ell` (summed over channels for per-channel steps).
    gains : array of shape (L,)
        :math:`E_\ell` (per-tensor gains; NaN for layers with per-channel steps).
    per_sample : array of shape (N,)
        :math:`b(x_i)`.
    """

    bound: float
    bound_clipped: float
    layer_names: tuple[str, ...] = field(repr=False)  # (L,)
    layer_terms: np.ndarray = field(repr=False)  # (L,)
    gains: np.ndarray = field(repr=False)  # (L,)
    per_sample: np.ndarray = field(repr=False)  # (N,)

    @property
    def vacuous(self) -> bool:
        """Whether the published bound is >= 1 and so says nothing."""
        return bool(self.bound >= 1.0)

    def to_prediction(self) -> Prediction:
        """The bound, clipped at 1 per image, in the shared shape (level ``"sakr"``; an
        upper bound on the flip rate, no band, no accuracy loss)."""
        return Prediction(
            level="sakr", flip_rate=self.bound_clipped, flip_rate_stderr=0.0,
            n_samples=int(self.per_sample.size), method="chebyshev-union",
        )  # fmt: skip

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: its gain and its term of the bound."""
        import pandas as pd

        return pd.DataFrame(
            {"layer": list(self.layer_names), "gain": self.gains, "term": self.layer_terms}
        )


def sakr_bound(
    grams: GradientGrams,
    steps: Sequence[Any] | None = None,
    *,
    variances: Sequence[Any] | None = None,
) -> SakrBound:
    r"""Sakr et al.'s bound on the flip rate for given quantization steps or error variances.

    Parameters
    ----------
    grams : GradientGrams
    steps : sequence of length L, optional
        Step :math:`\Delta_\ell` of each layer: a scalar (per tensor; 0 or None for a
        layer kept in float) or an array of shape (C_l,) (per channel) — the published
        form, whose error variance is H_U's :math:`\Delta^2/12`.
    variances : sequence of length L, optional
        Or the error second moment :math:`\sigma_\ell^2` of each layer, as a compressor's
        error model gives it (exactly one of ``steps`` and ``variances``); the bound is then
        Chebyshev's with that variance, the published one when
        :math:`\sigma^2 = \Delta^2/12`.

    Returns
    -------
    SakrBound

    Notes
    -----
    Union bound over the classes, then the one-sided Chebyshev inequality for the
    symmetric margin noise :math:`\nu_j` with variance
    :math:`\sum_\ell (\Delta_\ell^2/12) G_{\ell j}` (eq. BL1-BL3):

    .. math:: P(\text{flip}\mid x) \le \sum_{j\ne\hat y} P(\nu_j \ge m_j)
              \le \sum_{j\ne\hat y}\frac{\operatorname{Var}\nu_j}{2 m_j^2}
              = \sum_\ell \Delta_\ell^2 \sum_{j\ne\hat y}\frac{G_{\ell j}}{24\, m_j^2}.
    """
    if (steps is None) == (variances is None):
        raise ValueError("pass exactly one of steps and variances (one entry per layer)")
    what = "steps" if variances is None else "variances"
    given = steps if variances is None else variances
    if len(given) != grams.n_layers:
        raise ValueError(
            f"{what} must have one entry per cached layer ({grams.n_layers}), got {len(given)}"
        )
    # Delta^2 of the published form; from a variance, the step whose H_U variance it is
    unit = float(uniform_error_variance(1.0))
    sq: list[np.ndarray] = []
    counts = grams.channel_counts()
    for name, c, s in zip(grams.layer_names, counts, given, strict=True):
        a = np.zeros(()) if s is None else np.asarray(s, dtype=np.float64)
        if a.ndim > 1 or (a.ndim == 1 and a.shape != (c,)):
            raise ValueError(
                f"{what[:-1]} of layer {name!r} must be a scalar or have shape ({c},), "
                f"got {a.shape}"
            )
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"{what[:-1]} of layer {name!r} must be finite and >= 0")
        if a.ndim == 1 and np.all(a == a[0]):
            a = np.asarray(a[0])
        sq.append(a**2 if variances is None else a / unit)
    tensor = np.array([float(a) if a.ndim == 0 else 0.0 for a in sq])
    per_tensor = _per_sample_gains(grams, channel=False)  # (N, L)
    with np.errstate(invalid="ignore"):
        contrib = per_tensor * tensor[None, :]
    contrib = np.where(tensor[None, :] == 0, 0.0, contrib)
    gains = per_tensor.mean(axis=0)
    if any(a.ndim == 1 for a in sq):
        per_ch = _per_sample_gains(grams, channel=True)  # (N, C)
        off = grams.channel_offsets()
        for i, a in enumerate(sq):
            if a.ndim == 1:
                with np.errstate(invalid="ignore"):
                    part = per_ch[:, off[i] : off[i + 1]] @ a
                contrib[:, i] = part
                gains[i] = np.nan
    per_sample = contrib.sum(axis=1)  # (eq. BL4)
    return SakrBound(
        bound=float(per_sample.mean()),
        bound_clipped=float(np.minimum(per_sample, 1.0).mean()),
        layer_names=grams.layer_names,
        layer_terms=contrib.mean(axis=0),
        gains=gains,
        per_sample=per_sample,
    )


# ----------------------------------------------------------------------------- HAWQ-V2
@dataclass(frozen=True)
class HessianTrace:
    r"""Hutchinson estimates of :math:`\operatorname{Tr}(H_\ell)` per layer (eq. BL6).

    Attributes
    ----------
    layer_names : tuple of str, length L
    n_params : array of shape (L,)
        :math:`n_\ell`, weights of each layer.
    draws : array of shape (m, L)
        Independent unbiased terms of each layer's trace: :math:`v_\ell^\top H_{\ell\ell}
        v_\ell` for a Rademacher vector :math:`v_\ell` on that layer's block alone, one per
        draw (eq. BL6; :func:`distortion.experiments.sensitivity.hessian_trace`), or each
        sample's term of :func:`gauss_newton_trace`.
    n_samples : int
        Samples of the loss.
    seed : int
    trace : array of shape (L,)
        Mean over the draws.
    stderr : array of shape (L,)
        Standard error of each layer's ``trace``: the sd of its draws / :math:`\sqrt m`.
    method : str
        ``"hutchinson"`` (per-layer block probing) or ``"gauss-newton"``.
    """

    layer_names: tuple[str, ...]  # (L,)
    n_params: np.ndarray  # (L,)
    draws: np.ndarray = field(repr=False)  # (m, L)
    n_samples: int = 0
    seed: int = 0
    method: str = "hutchinson"
    trace: np.ndarray = field(init=False)  # (L,)
    stderr: np.ndarray = field(init=False)  # (L,)

    def __post_init__(self) -> None:
        draws = np.asarray(self.draws, dtype=np.float64)
        n_params = np.asarray(self.n_params, dtype=np.int64)
        L = len(self.layer_names)
        if draws.ndim != 2 or draws.shape[1] != L or draws.shape[0] < 2:
            raise ValueError(f"draws must have shape (m >= 2, {L}), got {draws.shape}")
        if n_params.shape != (L,) or np.any(n_params < 1):
            raise ValueError(f"n_params must be positive integers of shape ({L},)")
        if not np.all(np.isfinite(draws)):
            raise ValueError("draws must be finite")
        object.__setattr__(self, "layer_names", tuple(self.layer_names))
        object.__setattr__(self, "draws", draws)
        object.__setattr__(self, "n_params", n_params)
        object.__setattr__(self, "trace", draws.mean(axis=0))
        object.__setattr__(self, "stderr", draws.std(axis=0, ddof=1) / math.sqrt(draws.shape[0]))

    @property
    def n_draws(self) -> int:
        """m, the number of Rademacher draws."""
        return int(self.draws.shape[0])

    def mean_trace(self) -> np.ndarray:
        r""":math:`\operatorname{Tr}(H_\ell)/n_\ell`, shape (L,) (HAWQ-V2's average eigenvalue)."""
        return self.trace / self.n_params

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: weights, trace, its standard error, mean trace."""
        import pandas as pd

        return pd.DataFrame(
            {
                "layer": list(self.layer_names),
                "n_params": self.n_params,
                "trace": self.trace,
                "stderr": self.stderr,
                "mean_trace": self.mean_trace(),
                "method": self.method,
            }
        )


def gauss_newton_trace(grams: GradientGrams) -> HessianTrace:
    r"""Trace of each layer's cross-entropy Hessian block from the Jacobian Grams.

    Parameters
    ----------
    grams : GradientGrams

    Returns
    -------
    HessianTrace
        With ``method="gauss-newton"``; ``draws`` are the per-sample terms, so ``stderr``
        is the sampling error of the mean over the N samples (no Monte-Carlo error).

    Notes
    -----
    For the mean cross-entropy :math:`\frac1N\sum_i \ell(z(x_i), y_i)`, the Hessian block
    of layer :math:`\ell` is
    :math:`\frac1N\sum_i J_\ell^\top(\operatorname{diag}p_i - p_ip_i^\top)J_\ell
    + \sum_k (p_{ik} - [y_i = k])\,\partial^2 z_k/\partial W_\ell^2` with
    :math:`p_i = \operatorname{softmax}(z(x_i))`. The second term vanishes almost everywhere
    when :math:`z` is piecewise linear in :math:`W_\ell` (ReLU networks, batch norm in eval
    mode), so

    .. math:: \operatorname{Tr}(H_\ell) = \frac1N\sum_i
              \operatorname{tr}\big[(\operatorname{diag}p_i - p_ip_i^\top)\,
              \Gamma_\ell(x_i)\big] \qquad \text{(eq. BL7)},

    with no labels needed.
    """
    z = grams.logits
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    a = -p[:, :, None] * p[:, None, :]
    idx = np.arange(grams.n_classes)
    a[:, idx, idx] += p  # diag(p) - p p^T, shape (N, K, K)
    terms = np.einsum("nkj,nlkj->nl", a, grams.grams)  # (eq. BL7)
    return HessianTrace(
        layer_names=grams.layer_names,
        n_params=grams.layer_sizes(),
        draws=terms,
        n_samples=grams.n_samples,
        seed=0,
        method="gauss-newton",
    )


@dataclass(frozen=True)
class HawqSensitivity:
    r"""HAWQ-V2 sensitivity :math:`\Omega_\ell` of each layer (eq. BL5).

    Attributes
    ----------
    layer_names : tuple of str, length L
    omega : array of shape (L,)
        :math:`\operatorname{Tr}(H_\ell)/n_\ell\cdot\|Q(W_\ell) - W_\ell\|^2`.
    omega_stderr : array of shape (L,)
        Its standard error from the Hutchinson draws.
    squared_error : array of shape (L,)
        :math:`\|Q(W_\ell) - W_\ell\|^2`.
    draws : array of shape (m, L), optional
        The terms of :math:`\Omega_\ell` per draw (the trace's draws scaled by
        :math:`\|Q(W_\ell) - W_\ell\|^2/n_\ell`), for :meth:`total_stderr`.
    """

    layer_names: tuple[str, ...]  # (L,)
    omega: np.ndarray  # (L,)
    omega_stderr: np.ndarray  # (L,)
    squared_error: np.ndarray  # (L,)
    draws: np.ndarray | None = field(default=None, repr=False)  # (m, L)

    def total(self) -> float:
        r""":math:`\sum_\ell \Omega_\ell`, HAWQ-V2's score of a whole allocation."""
        return float(np.sum(self.omega))

    def total_stderr(self) -> float:
        r"""Standard error of :meth:`total`: the sd over draws of the summed terms
        / :math:`\sqrt m` (valid also when the layers' terms are correlated); without the
        draws, :math:`\sqrt{\sum_\ell \mathrm{se}_\ell^2}` (independent layers)."""
        if self.draws is not None and self.draws.shape[0] >= 2:
            t = self.draws.sum(axis=1)
            return float(np.std(t, ddof=1) / math.sqrt(t.size))
        return float(np.sqrt(np.sum(np.asarray(self.omega_stderr) ** 2)))

    def to_frame(self) -> pd.DataFrame:
        """One row per layer."""
        import pandas as pd

        return pd.DataFrame(
            {
                "layer": list(self.layer_names),
                "omega": self.omega,
                "omega_stderr": self.omega_stderr,
                "squared_error": self.squared_error,
            }
        )


def hawq_v2_sensitivity(trace: HessianTrace, squared_error: Sequence[float]) -> HawqSensitivity:
    r"""HAWQ-V2's sensitivity of each layer at given quantization errors.

    Parameters
    ----------
    trace : HessianTrace
    squared_error : array of shape (L,)
        :math:`\|Q(W_\ell) - W_\ell\|^2` of each layer (0 for a layer kept in float).

    Returns
    -------
    HawqSensitivity

    Notes
    -----
    .. math:: \Omega_\ell = \frac{\operatorname{Tr}(H_\ell)}{n_\ell}\,
              \|Q(W_\ell) - W_\ell\|_2^2 \qquad \text{(eq. BL5)}
    """
    e = np.asarray(squared_error, dtype=np.float64)
    if e.shape != (len(trace.layer_names),):
        raise ValueError(
            f"squared_error must have shape ({len(trace.layer_names)},) (one per layer), "
            f"got {e.shape}"
        )
    if not np.all(np.isfinite(e)) or np.any(e < 0):
        raise ValueError("squared_error must be finite and >= 0")
    omega = trace.mean_trace() * e  # (eq. BL5)
    return HawqSensitivity(
        layer_names=trace.layer_names,
        omega=omega,
        omega_stderr=trace.stderr / trace.n_params * e,
        squared_error=e,
        draws=trace.draws * (e / trace.n_params)[None, :],
    )
