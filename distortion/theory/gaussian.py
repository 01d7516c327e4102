r"""Class-conditional Gaussian model of the penultimate features (hypothesis H_G).

Under H_G the features of class :math:`k` are :math:`x \mid y=k \sim N(\mu_k, \Sigma_k)` with
prior :math:`\pi_k`. :class:`GaussianModel` holds these parameters, fits them from labelled
features (with Ledoit--Wolf or fixed shrinkage, so that :math:`d \ge n_k` works), validates
them (positive-definite covariances, priors summing to one) and samples from the model.

The derivations that use this model are in ``theory/binary.md`` (two classes) and
``theory/multiclass.md`` (K classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["GaussianModel", "GaussianSample"]

CovarianceType = Literal["class", "pooled"]
Shrinkage = Literal["ledoit-wolf"] | float | None


class GaussianSample(NamedTuple):
    """Features and labels drawn from a :class:`GaussianModel` (unpacks as ``X, y``)."""

    features: np.ndarray  # (n, d) float64
    labels: np.ndarray  # (n,) int64 in 0..K-1


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a.setflags(write=False)
    return a


def _cholesky_or_raise(cov: np.ndarray, k: int, pooled: bool) -> np.ndarray:
    """Cholesky factor of ``cov``; a ValueError that suggests shrinkage when not PD."""
    what = "pooled covariance" if pooled else f"covariance of class {k}"
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        lam = np.linalg.eigvalsh(cov)
        raise ValueError(
            f"{what} is not positive definite (smallest eigenvalue {lam[0]:.3g}, "
            f"largest {lam[-1]:.3g}); use shrinkage='ledoit-wolf' or a float shrinkage in "
            "(0, 1] when a class has fewer samples than features"
        ) from None


def _symmetrized(cov: np.ndarray, *, pooled: bool) -> np.ndarray:
    """Check near-symmetry of a (k, d, d) stack and return a symmetrized float64 copy."""
    scale = np.maximum(np.abs(cov).max(axis=(1, 2)), np.finfo(float).tiny)
    asym = np.abs(cov - cov.transpose(0, 2, 1)).max(axis=(1, 2)) / scale
    if np.any(asym > 1e-10):
        who = "the pooled covariance is" if pooled else f"class {int(np.argmax(asym))} is"
        raise ValueError(
            f"covariances must be symmetric ({who} not); symmetrize with (S + S.T) / 2"
        )
    return 0.5 * (cov + cov.transpose(0, 2, 1))


@dataclass(frozen=True, eq=False)
class GaussianModel:
    r"""Class-conditional Gaussian features: :math:`x \mid y=k \sim N(\mu_k, \Sigma_k)`.

    Build it with :meth:`fit` (from labelled features) or :meth:`from_params`. Arrays are
    stored as read-only float64 copies; the constructor validates them.

    Parameters
    ----------
    priors : array of shape (n_classes,)
        Class probabilities :math:`\pi_k`, positive, summing to 1.
    means : array of shape (n_classes, n_features)
        Class means :math:`\mu_k`.
    covariances : array of shape (n_classes, n_features, n_features)
        Class covariances :math:`\Sigma_k`, symmetric positive definite. For a pooled model
        the same matrix is repeated ``n_classes`` times.
    covariance_type : {"class", "pooled"}
        Whether each class has its own covariance or all share one.
    shrinkage : array of shape (n_classes,)
        Shrinkage intensity actually used for each class (the pooled value repeated for a
        pooled model; 0 for :meth:`from_params` and for unshrunk estimates).
    n_samples : array of shape (n_classes,)
        Samples per class used by :meth:`fit` (0 for :meth:`from_params`).

    Notes
    -----
    With shrinkage :math:`\alpha` the covariance estimate is the convex combination

    .. math:: \hat\Sigma = (1-\alpha) S + \alpha \frac{\operatorname{tr} S}{d} I,

    where :math:`S` is the sample covariance; Ledoit--Wolf [1]_ chooses :math:`\alpha` to
    minimize the expected Frobenius loss (computed by :func:`sklearn.covariance.ledoit_wolf`,
    which uses the maximum-likelihood :math:`S`, normalized by :math:`n_k`). Without
    shrinkage or with a fixed float, :math:`S` is the unbiased estimate (normalized by
    :math:`n_k-1`, or :math:`n-K` when pooled).

    References
    ----------
    .. [1] O. Ledoit and M. Wolf, "A well-conditioned estimator for large-dimensional
       covariance matrices", Journal of Multivariate Analysis 88(2), 2004.
    """

    priors: np.ndarray  # (K,)
    means: np.ndarray  # (K, d)
    covariances: np.ndarray  # (K, d, d)
    covariance_type: CovarianceType = "class"
    shrinkage: np.ndarray | None = None  # (K,) shrinkage used per class
    n_samples: np.ndarray | None = None  # (K,) samples per class
    _cholesky: np.ndarray = field(init=False, repr=False)  # (K, d, d) lower factors

    def __post_init__(self) -> None:
        means = np.asarray(self.means, dtype=np.float64)
        if means.ndim != 2:
            raise ValueError(
                f"means must have shape (n_classes, n_features), got shape {means.shape}"
            )
        n_classes, d = means.shape
        if n_classes < 1 or d < 1:
            raise ValueError(f"means must be non-empty, got shape {means.shape}")
        cov = np.asarray(self.covariances, dtype=np.float64)
        if cov.shape != (n_classes, d, d):
            raise ValueError(
                f"covariances must have shape (n_classes, n_features, n_features) = "
                f"{(n_classes, d, d)} to match means, got {cov.shape}"
            )
        priors = np.asarray(self.priors, dtype=np.float64)
        if priors.shape != (n_classes,):
            raise ValueError(
                f"priors must have shape (n_classes,) = ({n_classes},), got {priors.shape}"
            )
        cov_distinct = cov[:1] if cov.strides[0] == 0 else cov  # a stride-0 stack: check once
        for name, arr in (("means", means), ("covariances", cov_distinct), ("priors", priors)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} must be finite; found NaN or inf")
        if np.any(priors <= 0):
            raise ValueError(f"priors must be positive, got {priors!r}")
        if abs(priors.sum() - 1.0) > 1e-8:
            raise ValueError(
                f"priors must sum to 1, got sum {priors.sum()!r}; divide them by their sum"
            )
        if self.covariance_type not in ("class", "pooled"):
            raise ValueError(
                f"covariance_type must be 'class' or 'pooled', got {self.covariance_type!r}"
            )
        pooled = self.covariance_type == "pooled"
        if pooled:
            # one matrix; stored as a stride-0 stack so that K copies cost no memory
            if cov.strides[0] != 0 and n_classes > 1 and not np.all(cov == cov[:1]):
                raise ValueError("covariance_type='pooled' requires identical class covariances")
            mats = _symmetrized(cov[:1], pooled=True)
            chol0 = _cholesky_or_raise(mats[0], 0, True)
            chol0.setflags(write=False)
            mats.setflags(write=False)
            cov = np.broadcast_to(mats[0], (n_classes, d, d))
            chol = np.broadcast_to(chol0, (n_classes, d, d))
        else:
            cov = _symmetrized(cov, pooled=False)
            chol = np.empty_like(cov)
            for k in range(n_classes):
                chol[k] = _cholesky_or_raise(cov[k], k, False)
            cov.setflags(write=False)
            chol.setflags(write=False)
        shrink = (
            np.zeros(n_classes)
            if self.shrinkage is None
            else np.broadcast_to(np.asarray(self.shrinkage, dtype=np.float64), (n_classes,))
        )
        n_samp = (
            np.zeros(n_classes, dtype=np.int64)
            if self.n_samples is None
            else np.asarray(self.n_samples, dtype=np.int64).reshape(n_classes)
        )
        n_samp = n_samp.copy()
        n_samp.setflags(write=False)
        object.__setattr__(self, "means", _readonly(means))
        object.__setattr__(self, "covariances", cov)
        object.__setattr__(self, "priors", _readonly(priors))
        object.__setattr__(self, "shrinkage", _readonly(shrink))
        object.__setattr__(self, "n_samples", n_samp)
        object.__setattr__(self, "_cholesky", chol)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_params(
        cls,
        means: np.ndarray,
        covariances: np.ndarray,
        priors: np.ndarray | None = None,
    ) -> GaussianModel:
        r"""Model with given parameters.

        Parameters
        ----------
        means : array of shape (n_classes, n_features)
        covariances : array of shape (n_features, n_features) or (n_classes, n_features, n_features)
            A single matrix (or a stride-0 stack made by :func:`numpy.broadcast_to`) gives a
            pooled model; a stack gives one covariance per class.
        priors : array of shape (n_classes,), optional
            Class probabilities summing to 1; uniform when omitted.

        Returns
        -------
        GaussianModel
        """
        means = np.asarray(means, dtype=np.float64)
        if means.ndim != 2:
            raise ValueError(
                f"means must have shape (n_classes, n_features), got shape {means.shape}"
            )
        n_classes, d = means.shape
        cov = np.asarray(covariances, dtype=np.float64)
        if cov.ndim == 2:
            if cov.shape != (d, d):
                raise ValueError(
                    f"covariances must have shape ({d}, {d}) or ({n_classes}, {d}, {d}) to "
                    f"match means of shape {means.shape}, got {cov.shape}"
                )
            cov = np.broadcast_to(cov, (n_classes, d, d))
            ctype: CovarianceType = "pooled"
        else:
            # a stride-0 stack (np.broadcast_to of one matrix) is a pooled model
            ctype = "pooled" if cov.ndim == 3 and cov.strides[0] == 0 else "class"
        if priors is None:
            priors = np.full(n_classes, 1.0 / max(n_classes, 1))
        return cls(priors=priors, means=means, covariances=cov, covariance_type=ctype)

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        *,
        covariance: CovarianceType = "class",
        shrinkage: Shrinkage = "ledoit-wolf",
        n_classes: int | None = None,
        priors: np.ndarray | None = None,
    ) -> GaussianModel:
        r"""Estimate the class means, covariances and priors from labelled features.

        Parameters
        ----------
        features : array of shape (n_samples, n_features)
            Finite feature vectors.
        labels : array of shape (n_samples,)
            Integer class labels in ``0..n_classes-1``; every class must have at least
            2 samples.
        covariance : {"class", "pooled"}, default "class"
            One covariance per class, or a single within-class covariance.
        shrinkage : "ledoit-wolf", float in [0, 1] or None, default "ledoit-wolf"
            Ledoit--Wolf shrinkage (works when a class has fewer samples than features),
            a fixed intensity, or none (needs ``n_k > n_features``).
        n_classes : int, optional
            Number of classes; ``labels.max() + 1`` when omitted.
        priors : array of shape (n_classes,), optional
            Class probabilities; the empirical class frequencies when omitted.

        Returns
        -------
        GaussianModel

        Notes
        -----
        See the class docstring for the shrinkage estimate. For ``covariance="pooled"``
        the class-centred features are pooled before estimating one matrix.
        """
        from sklearn.covariance import ledoit_wolf

        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(
                f"features must have shape (n_samples, n_features), got shape {x.shape}"
            )
        if not np.all(np.isfinite(x)):
            bad = int(np.sum(~np.all(np.isfinite(x), axis=1)))
            raise ValueError(f"features must be finite; {bad} rows contain NaN or inf")
        y = np.asarray(labels)
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"labels must have shape (n_samples,) = ({x.shape[0]},), got {y.shape}"
            )
        if y.size == 0:
            raise ValueError("features and labels are empty; pass at least 2 samples per class")
        if not np.issubdtype(y.dtype, np.integer):
            if np.all(np.isfinite(y)) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            else:
                raise ValueError(f"labels must be integers 0..K-1, got dtype {y.dtype}")
        if y.min() < 0:
            raise ValueError(f"labels must be integers 0..K-1, got minimum {int(y.min())}")
        k_max = int(y.max()) + 1
        if n_classes is None:
            n_classes = k_max
        elif n_classes < k_max:
            raise ValueError(f"n_classes={n_classes} but labels go up to {k_max - 1}")
        if covariance not in ("class", "pooled"):
            raise ValueError(f"covariance must be 'class' or 'pooled', got {covariance!r}")
        if not (
            shrinkage is None
            or shrinkage == "ledoit-wolf"
            or (isinstance(shrinkage, (int, float)) and 0.0 <= float(shrinkage) <= 1.0)
        ):
            raise ValueError(
                f"shrinkage must be 'ledoit-wolf', None or a float in [0, 1], got {shrinkage!r}"
            )
        counts = np.bincount(y, minlength=n_classes)
        if np.any(counts == 0):
            empty = np.flatnonzero(counts == 0).tolist()
            raise ValueError(f"class(es) {empty} have no samples; labels must cover 0..n_classes-1")
        if np.any(counts < 2):
            few = np.flatnonzero(counts < 2).tolist()
            raise ValueError(
                f"class(es) {few} have a single sample; at least 2 per class are needed "
                "to estimate a covariance"
            )
        n, d = x.shape
        means = np.stack([x[y == k].mean(axis=0) for k in range(n_classes)])
        if priors is None:
            priors = counts / n

        def _shrunk(xc: np.ndarray, dof: int) -> tuple[np.ndarray, float]:
            """Covariance of centred rows ``xc`` with the requested shrinkage."""
            if shrinkage == "ledoit-wolf":
                s, alpha = ledoit_wolf(xc, assume_centered=True)
                return s, float(alpha)
            s = xc.T @ xc / dof
            alpha = 0.0 if shrinkage is None else float(shrinkage)
            if alpha > 0:
                s = (1 - alpha) * s + alpha * np.trace(s) / d * np.eye(d)
            return s, alpha

        if covariance == "pooled":
            xc = x - means[y]
            s, alpha = _shrunk(xc, n - n_classes)
            cov = np.broadcast_to(s, (n_classes, d, d))
            shrink = np.full(n_classes, alpha)
        else:
            cov = np.empty((n_classes, d, d))
            shrink = np.empty(n_classes)
            for k in range(n_classes):
                xc = x[y == k] - means[k]
                cov[k], shrink[k] = _shrunk(xc, counts[k] - 1)
        for k in range(1 if covariance == "pooled" else n_classes):
            try:
                np.linalg.cholesky(cov[k])
            except np.linalg.LinAlgError:
                who = "the pooled covariance" if covariance == "pooled" else f"class {k}"
                n_used = int(counts.sum() if covariance == "pooled" else counts[k])
                raise ValueError(
                    f"the covariance estimate of {who} is not positive definite "
                    f"(n_features={d}, samples={n_used}, "
                    f"shrinkage={shrink[k]:.3g}); pass shrinkage='ledoit-wolf' or a float "
                    "shrinkage in (0, 1], or use more samples (Ledoit-Wolf degenerates with "
                    "2 samples or constant features)"
                ) from None
        return cls(
            priors=priors,
            means=means,
            covariances=cov,
            covariance_type=covariance,
            shrinkage=shrink,
            n_samples=counts,
        )

    # ------------------------------------------------------------------ properties
    @property
    def n_classes(self) -> int:
        """Number of classes K."""
        return int(self.means.shape[0])

    @property
    def n_features(self) -> int:
        """Feature dimension d."""
        return int(self.means.shape[1])

    # ------------------------------------------------------------------ derived values
    def condition_numbers(self) -> np.ndarray:
        r"""Condition number :math:`\lambda_{\max}/\lambda_{\min}` of each covariance.

        Returns
        -------
        array of shape (n_classes,)
        """
        if self.covariance_type == "pooled":
            lam = np.linalg.eigvalsh(self.covariances[0])
            return np.full(self.n_classes, lam[-1] / lam[0])
        lam = np.linalg.eigvalsh(self.covariances)
        return lam[:, -1] / lam[:, 0]

    def second_moment_traces(self) -> np.ndarray:
        r"""Expected squared norm of the features of each class.

        .. math:: E[\|x\|^2 \mid k] = \operatorname{tr}\Sigma_k + \|\mu_k\|^2

        This is the factor that multiplies the quantization-noise variance in the logit
        variance under H_U (``theory/binary.md``, eq. B10).

        Returns
        -------
        array of shape (n_classes,)
        """
        return self.covariance_traces() + np.sum(self.means**2, axis=1)

    def covariance_traces(self) -> np.ndarray:
        r"""Traces :math:`\operatorname{tr}\Sigma_k`, shape (n_classes,)."""
        if self.covariance_type == "pooled":
            return np.full(self.n_classes, np.trace(self.covariances[0]))
        return np.trace(self.covariances, axis1=1, axis2=2)

    def cholesky_factors(self) -> np.ndarray:
        r"""Lower Cholesky factors :math:`L_k` with :math:`L_k L_k^\top = \Sigma_k`.

        Returns
        -------
        array of shape (n_classes, n_features, n_features), read-only
        """
        return self._cholesky

    def sample(self, n: int, *, seed: int | np.random.Generator | None = None) -> GaussianSample:
        r"""Draw labelled features: :math:`y \sim \mathrm{Cat}(\pi)`, :math:`x = \mu_y + L_y z`.

        Parameters
        ----------
        n : int
            Number of samples (>= 0).
        seed : int, Generator or None
            Seed of :func:`numpy.random.default_rng`.

        Returns
        -------
        GaussianSample
            ``features`` of shape (n, n_features) and ``labels`` of shape (n,).
        """
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        rng = np.random.default_rng(seed)
        y = rng.choice(self.n_classes, size=int(n), p=self.priors).astype(np.int64)
        x = np.empty((int(n), self.n_features))
        for k in range(self.n_classes):
            idx = np.flatnonzero(y == k)
            z = rng.standard_normal((idx.size, self.n_features))
            x[idx] = self.means[k] + z @ self._cholesky[k].T
        return GaussianSample(features=x, labels=y)

    def to_frame(self) -> pd.DataFrame:
        """One row per class: prior, samples, shrinkage, condition number, traces, mean norm."""
        import pandas as pd

        return pd.DataFrame(
            {
                "class": np.arange(self.n_classes),
                "prior": self.priors,
                "n_samples": self.n_samples,
                "covariance_type": self.covariance_type,
                "shrinkage": self.shrinkage,
                "condition_number": self.condition_numbers(),
                "trace_covariance": self.covariance_traces(),
                "mean_norm": np.linalg.norm(self.means, axis=1),
            }
        )
