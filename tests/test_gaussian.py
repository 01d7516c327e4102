"""Tests of distortion.theory.gaussian: construction, validation, fitting and sampling."""

import numpy as np
import pytest
from scipy import stats
from sklearn.covariance import LedoitWolf

from distortion.theory.gaussian import GaussianModel, GaussianSample


def _random_model(d=4, k=3, seed=0, priors=None, pooled=False):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d))
    if pooled:
        a = rng.standard_normal((d, d))
        cov = a @ a.T / d + 0.5 * np.eye(d)
    else:
        a = rng.standard_normal((k, d, d))
        cov = a @ a.transpose(0, 2, 1) / d + 0.5 * np.eye(d)
    return GaussianModel.from_params(means, cov, priors)


# ---------------------------------------------------------------------------- from_params
def test_from_params_class_and_pooled():
    m = _random_model(pooled=False)
    assert m.covariance_type == "class"
    assert (m.n_classes, m.n_features) == (3, 4)
    np.testing.assert_allclose(m.priors, np.full(3, 1 / 3))
    np.testing.assert_array_equal(m.n_samples, 0)
    np.testing.assert_array_equal(m.shrinkage, 0.0)
    p = _random_model(pooled=True)
    assert p.covariance_type == "pooled"
    assert p.covariances.shape == (3, 4, 4)
    assert p.covariances.strides[0] == 0  # one matrix, not K copies
    np.testing.assert_array_equal(p.covariances[0], p.covariances[2])
    # a stride-0 stack passed explicitly is recognized as pooled
    q = GaussianModel.from_params(p.means, np.broadcast_to(p.covariances[0], (3, 4, 4)))
    assert q.covariance_type == "pooled"


def test_arrays_are_read_only_copies():
    means = np.zeros((2, 3))
    m = GaussianModel.from_params(means, np.eye(3))
    means[0, 0] = 5.0
    assert m.means[0, 0] == 0.0
    with pytest.raises(ValueError):
        m.means[0, 0] = 1.0


def test_condition_numbers_and_traces_match_numpy():
    for pooled in (False, True):
        m = _random_model(d=5, k=2, seed=3, pooled=pooled)
        np.testing.assert_allclose(m.condition_numbers(), np.linalg.cond(m.covariances), rtol=1e-10)
        naive = np.array(
            [np.trace(c) + mu @ mu for c, mu in zip(m.covariances, m.means, strict=True)]
        )
        np.testing.assert_allclose(m.second_moment_traces(), naive, rtol=1e-12)
        chol = m.cholesky_factors()
        np.testing.assert_allclose(chol @ chol.transpose(0, 2, 1), m.covariances, atol=1e-12)


def test_to_frame_one_row_per_class():
    f = _random_model(k=3).to_frame()
    assert list(f["class"]) == [0, 1, 2]
    assert {"prior", "n_samples", "shrinkage", "condition_number", "mean_norm"} <= set(f.columns)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"covariances": np.diag([1.0, -1.0, 1.0])}, "not positive definite.*shrinkage"),
        ({"covariances": np.zeros((3, 3))}, "not positive definite"),
        ({"covariances": np.eye(4)}, "shape"),
        ({"covariances": np.stack([np.eye(3)] * 3)}, "shape"),
        ({"priors": [0.5, 0.6]}, "sum to 1"),
        ({"priors": [0.5, 0.3, 0.2]}, "priors must have shape"),
        ({"priors": [1.2, -0.2]}, "positive"),
        ({"means": np.full((2, 3), np.nan)}, "finite"),
        ({"covariances": np.array([[1.0, 0.5, 0], [0.0, 1, 0], [0, 0, 1]])}, "symmetric"),
        ({"means": np.zeros(3)}, "means must have shape"),
    ],
)
def test_from_params_rejects_bad_input(kwargs, match):
    args = {"means": np.zeros((2, 3)), "covariances": np.eye(3), "priors": None} | kwargs
    with pytest.raises(ValueError, match=match):
        GaussianModel.from_params(**args)


def test_constructor_rejects_non_identical_pooled():
    cov = np.stack([np.eye(2), 2 * np.eye(2)])
    with pytest.raises(ValueError, match="identical"):
        GaussianModel(np.array([0.5, 0.5]), np.zeros((2, 2)), cov, covariance_type="pooled")
    with pytest.raises(ValueError, match="covariance_type"):
        GaussianModel(np.array([0.5, 0.5]), np.zeros((2, 2)), cov, covariance_type="diag")


# ---------------------------------------------------------------------------- sample
def test_sample_shapes_seed_and_class_frequencies():
    m = _random_model(d=3, k=3, priors=[0.2, 0.3, 0.5])
    x, y = m.sample(20_000, seed=1)
    s = m.sample(20_000, seed=1)
    assert isinstance(s, GaussianSample)
    np.testing.assert_array_equal(s.features, x)
    assert x.shape == (20_000, 3) and y.dtype == np.int64
    counts = np.bincount(y, minlength=3)
    # chi-square goodness of fit of the labels against the priors
    assert stats.chisquare(counts, 20_000 * m.priors).pvalue > 1e-4
    with pytest.raises(ValueError, match="n must be"):
        m.sample(-1)


def test_sample_moments_are_calibrated():
    """KS of the standardized projection of each class against N(0, 1) (seeded)."""
    m = _random_model(d=4, k=2, seed=5)
    x, y = m.sample(4000, seed=2)
    rng = np.random.default_rng(0)
    for k in range(2):
        a = rng.standard_normal(4)
        z = (x[y == k] - m.means[k]) @ a / np.sqrt(a @ m.covariances[k] @ a)
        assert stats.ks_1samp(z, stats.norm.cdf).pvalue > 1e-4


# ---------------------------------------------------------------------------- fit
def test_fit_recovers_parameters_within_statistical_tolerance():
    m = _random_model(d=3, k=2, seed=7, priors=[0.3, 0.7])
    n = 40_000
    x, y = m.sample(n, seed=3)
    f = GaussianModel.fit(x, y, shrinkage=None)
    assert f.covariance_type == "class"
    np.testing.assert_array_equal(f.n_samples, np.bincount(y))
    # priors: binomial standard error
    assert np.all(np.abs(f.priors - m.priors) < 4 * np.sqrt(m.priors * (1 - m.priors) / n))
    for k in range(2):
        nk = f.n_samples[k]
        sd = np.sqrt(np.diag(m.covariances[k]) / nk)
        assert np.all(np.abs(f.means[k] - m.means[k]) < 4 * sd)
        s = m.covariances[k]
        # Var(S_ij) = (S_ii S_jj + S_ij^2) / n for Gaussian data
        se = np.sqrt((np.outer(np.diag(s), np.diag(s)) + s**2) / nk)
        assert np.all(np.abs(f.covariances[k] - s) < 4 * se)


def test_fit_unbiased_and_pooled_match_naive_formulas():
    m = _random_model(d=3, k=3, seed=11)
    x, y = m.sample(600, seed=4)
    f = GaussianModel.fit(x, y, shrinkage=None)
    for k in range(3):
        np.testing.assert_allclose(f.covariances[k], np.cov(x[y == k].T), rtol=1e-10)
    p = GaussianModel.fit(x, y, covariance="pooled", shrinkage=None)
    naive = sum((np.sum(y == k) - 1) * np.cov(x[y == k].T) for k in range(3)) / (600 - 3)
    np.testing.assert_allclose(p.covariances[0], naive, rtol=1e-10)
    assert p.covariance_type == "pooled"
    # a fixed shrinkage shrinks the unbiased estimate towards tr(S)/d I
    a = 0.3
    g = GaussianModel.fit(x, y, shrinkage=a)
    s0 = np.cov(x[y == 0].T)
    np.testing.assert_allclose(
        g.covariances[0], (1 - a) * s0 + a * np.trace(s0) / 3 * np.eye(3), rtol=1e-10
    )
    np.testing.assert_allclose(g.shrinkage, a)


def test_ledoit_wolf_with_more_features_than_samples():
    rng = np.random.default_rng(0)
    d = 50
    x = rng.standard_normal((30, d)) * np.linspace(0.5, 2, d)
    y = np.repeat([0, 1], 15)
    with pytest.raises(ValueError, match="not positive definite.*shrinkage"):
        GaussianModel.fit(x, y, shrinkage=None)
    f = GaussianModel.fit(x, y)  # Ledoit-Wolf by default
    assert np.all((f.shrinkage > 0) & (f.shrinkage <= 1))
    assert np.all(np.isfinite(f.condition_numbers()))
    for k in range(2):  # sklearn's estimator (which centres the data itself) as reference
        ref = LedoitWolf().fit(x[y == k])
        np.testing.assert_allclose(f.covariances[k], ref.covariance_, rtol=1e-10)
        np.testing.assert_allclose(f.shrinkage[k], ref.shrinkage_, rtol=1e-10)
    p = GaussianModel.fit(x, y, covariance="pooled")
    assert p.covariance_type == "pooled" and np.all(p.shrinkage == p.shrinkage[0])
    assert np.linalg.eigvalsh(p.covariances[0])[0] > 0


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "match"),
    [
        (np.ones((4, 2)), np.array([0, 0, 2, 2]), {}, r"class\(es\) \[1\] have no samples"),
        (np.ones((4, 2)), np.array([0, 0, 1, 1]), {"n_classes": 3}, "no samples"),
        (np.ones((3, 2)), np.array([0, 0, 1]), {}, "single sample"),
        (np.array([[1.0, np.nan], [0, 1], [1, 1], [2, 0]]), np.array([0, 0, 1, 1]), {}, "finite"),
        (np.ones((4, 2)), np.array([0, 0, 1]), {}, "labels must have shape"),
        (np.ones(4), np.array([0, 0, 1, 1]), {}, "features must have shape"),
        (np.ones((4, 2)), np.array([0, -1, 1, 1]), {}, "0..K-1"),
        (np.ones((4, 2)), np.array([0.0, 0.5, 1, 1]), {}, "integers"),
        (np.ones((4, 2)), np.array([0, 0, 1, 1]), {"covariance": "diag"}, "covariance must"),
        (np.ones((4, 2)), np.array([0, 0, 1, 1]), {"shrinkage": 2.0}, "shrinkage must"),
        (np.ones((4, 2)), np.array([0, 0, 1, 1]), {"shrinkage": "oas"}, "shrinkage must"),
    ],
)
def test_fit_rejects_bad_input(x, y, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianModel.fit(x, y, **kwargs)


def test_fit_constant_features_say_what_to_do():
    x = np.ones((6, 3))
    y = np.array([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="not positive definite.*more samples"):
        GaussianModel.fit(x, y)
