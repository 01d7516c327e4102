"""Tests of distortion.theory.semiparametric: level 3 (theory/multiclass.md, eqs. M12-M16).

References are independent of the code under test: ``scipy.stats.multivariate_normal.cdf``
of the margins, direct Monte Carlo over the error E in feature space, and an independent
transcription of the order-statistic band (eq. M16, L15). Stochastic checks are seeded:
``|a - b| < 4 * stderr``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from distortion.results import Band, Prediction
from distortion.theory import semiparametric as S
from distortion.theory._bands import order_statistic_band
from distortion.theory.error_models import uniform_error_variance
from distortion.theory.multiclass import SemiParametricDistortion
from distortion.theory.multiclass import semiparametric_distortion as mc_semiparametric
from distortion.theory.multilayer import MultilayerDistortion
from distortion.theory.semiparametric import semiparametric_distortion


def step_for(W, bits):
    """Per-tensor symmetric max-scaling step with 2^(bits-1)-1 positive levels."""
    return float(np.abs(W).max() / (2 ** (bits - 1) - 1))


# ----------------------------------------------------------------------------- level 3
def synthetic_features(N=60, K=10, d=64, seed=5):
    """ReLU-like (non-negative) features around class means, and a random layer."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, d))
    W = rng.normal(size=(K, d)) / np.sqrt(d)
    y = rng.integers(0, K, N)
    X = np.abs(means[y] + rng.normal(size=(N, d)))
    b = rng.normal(size=K) * 0.1
    return X, y, W, b


def test_quadrature_matches_naive_orthant_cdf():
    """Eq. M13 vs the margins' orthant with covariance r^2 (s_ref^2 11^T + diag(s_j^2))."""
    X, y, W, b = synthetic_features(N=8, K=5, d=20, seed=1)
    steps = np.array([0.3, 0.1, 0.2, 0.25, 0.15])
    res = semiparametric_distortion(X, W, b, step=steps, labels=y, n_realizations=0)
    sig2 = steps**2 / 12
    rng = np.random.default_rng(0)
    for i in range(X.shape[0]):
        z = W @ X[i] + b
        r2 = X[i] @ X[i]
        for ref, got in (
            (np.argmax(z), 1 - res.flip_probabilities[i]),
            (y[i], res.correct_probabilities[i]),
        ):
            o = np.delete(np.arange(5), ref)
            cov = r2 * (sig2[ref] + np.diag(sig2[o]))
            want = stats.multivariate_normal.cdf(
                z[ref] - z[o], mean=np.zeros(4), cov=cov, abseps=1e-7, releps=1e-7, rng=rng
            )
            assert got == pytest.approx(want, abs=2e-6)


def test_level3_per_sample_matches_mc_over_E():
    """Acceptance: per-sample flip probabilities vs direct Monte Carlo over E (4 stderr).

    Gaussian E entries make eq. M12 exact (tight check of the quadrature); uniform E (H_U)
    checks the CLT step at d = 64 and 3 bits, the largest noise of interest.
    """
    X, y, W, b = synthetic_features()
    step = step_for(W, 3)
    res = semiparametric_distortion(X, W, b, step=step, labels=y, n_realizations=0)
    z = X @ W.T + b
    pred = z.argmax(1)
    R = 20_000
    for dist in ("gauss", "uniform"):
        rng = np.random.default_rng(7)
        flips = np.zeros(X.shape[0])
        correct = np.zeros(X.shape[0])
        for _ in range(R // 500):
            shape = (500, *W.shape)
            if dist == "gauss":
                E = rng.standard_normal(shape) * step / np.sqrt(12)
            else:
                E = rng.uniform(-0.5, 0.5, shape) * step
            zq = z[None] + np.einsum("nd,rkd->rnk", X, E)
            pq = zq.argmax(2)
            flips += (pq != pred).sum(0)
            correct += (pq == y).sum(0)
        for est, got in (
            (flips / R, res.flip_probabilities),
            (correct / R, res.correct_probabilities),
        ):
            se = np.sqrt(np.maximum(est * (1 - est), 1 / R) / R)
            assert np.all(np.abs(got - est) < 4 * se), (dist, np.max(np.abs(got - est) / se))
    assert 0.1 < res.flip_rate < 0.9


def test_level3_zero_feature_and_tiny_step():
    X, y, W, b = synthetic_features(N=20, K=4, d=8, seed=2)
    X[3] = 0.0
    res = semiparametric_distortion(X, W, b, step=1e-9, labels=y, n_realizations=40, seed=0)
    assert res.flip_probabilities[3] == 0
    assert res.flip_rate < 1e-6 and res.flip_counts.sum() == 0
    assert res.accuracy_loss == pytest.approx(0, abs=1e-6)
    assert res.flip_band() == (0.0, 0.0)


def test_level3_band_covers_new_realizations():
    """Eq. M16: the band covers the flip count of fresh realizations of E on the same samples
    at about the nominal rate, where a binomial band (independent flips) would not."""
    X, y, W, b = synthetic_features(N=400, K=5, d=16, seed=3)
    step = step_for(W, 3)
    res = semiparametric_distortion(X, W, b, step=step, labels=y, n_realizations=400, seed=1)
    assert res.flip_rate_realization_sd() > 1.3 * res.flip_rate_binomial_sd()  # strong dependence
    rng = np.random.default_rng(99)  # fresh realizations, independent of the band's
    z = X @ W.T + b
    pred = z.argmax(1)
    T = 1000
    E = rng.uniform(-0.5, 0.5, size=(T, *W.shape)) * step
    rates = ((z[None] + np.einsum("nd,rkd->rnk", X, E)).argmax(2) != pred).mean(1)
    lo, hi = res.flip_band()
    coverage = np.mean((rates >= lo) & (rates <= hi))
    assert 0.90 <= coverage <= 0.995, coverage
    half = 1.96 * res.flip_rate_binomial_sd()
    naive = np.mean(np.abs(rates - res.flip_rate) <= half)
    assert naive < 0.85, naive  # the binomial band would be dishonest here
    # the quadrature mean agrees with the simulated realizations (CLT, eq. M12)
    sim_se = res.flip_rate_realization_sd() / np.sqrt(res.n_realizations)
    assert abs(res.simulated_flip_rate() - res.flip_rate) < 4 * sim_se + 2e-3


def test_level3_result_frames_and_bands():
    X, y, W, b = synthetic_features(N=50, K=4, d=8, seed=4)
    res = semiparametric_distortion(
        X, W, b, step=0.2, labels=y, n_realizations=100, seed=0, coverage=0.9
    )
    f = res.to_frame()
    assert f.shape[0] == 1 and {"flip_rate_low", "accuracy_loss_high"} <= set(f.columns)
    g = res.to_frame(per_sample=True)
    assert g.shape == (50, 4)
    lo, hi = res.flip_band()
    assert lo <= hi and isinstance(res.flip_band(), Band)
    al, ah = res.accuracy_loss_band()
    assert al <= ah
    assert "flip_probabilities" not in repr(res)
    with pytest.raises(AttributeError):
        res.flip_rate = 0.0  # frozen
    nolab = semiparametric_distortion(X, W, b, step=0.2, n_realizations=0)
    assert np.isnan(nolab.accuracy_float) and nolab.correct_probabilities is None
    assert np.isnan(nolab.flip_band().low)
    with pytest.raises(ValueError, match="labels"):
        nolab.accuracy_band()


def test_level3_large_problem_shapes_N10000_K10():
    """Level 3 for N = 10 000, K = 10, d = 64 with the default 400-realization band.

    (Its speed is measured in ``benchmarks/bench_semiparametric.py``, not asserted here.)
    """
    X, y, W, b = synthetic_features(N=10_000, K=10, d=64, seed=6)
    res = semiparametric_distortion(X, W, b, step=step_for(W, 4), labels=y, seed=0)
    assert res.n_realizations == 400 and res.flip_probabilities.shape == (10_000,)
    # the CLT quadrature and the exact-H_U simulation agree (eq. M12)
    sim_se = res.flip_rate_realization_sd() / np.sqrt(res.n_realizations)
    assert abs(res.simulated_flip_rate() - res.flip_rate) < 4 * sim_se + 1e-3
    lo, hi = res.flip_band()
    assert lo < res.flip_rate < hi


def test_level3_validation():
    X, y, W, b = synthetic_features(N=10, K=4, d=8)
    with pytest.raises(ValueError, match="d mismatch"):
        semiparametric_distortion(X[:, :5], W, b, step=0.1)
    with pytest.raises(ValueError, match="labels"):
        semiparametric_distortion(X, W, b, step=0.1, labels=np.full(10, 4))
    with pytest.raises(ValueError, match="n_realizations"):
        semiparametric_distortion(X, W, b, step=0.1, n_realizations=10)
    with pytest.raises(ValueError, match="finite"):
        semiparametric_distortion(X * np.nan, W, b, step=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        semiparametric_distortion(X, W, b, step=0.1, variance=0.01)
    with pytest.raises(ValueError, match="exactly one"):
        semiparametric_distortion(X, W, b)
    with pytest.raises(ValueError, match="non-negative"):
        semiparametric_distortion(X, W, b, step=np.array([0.1, -0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="non-negative"):
        semiparametric_distortion(X, W, b, variance=-1e-3)


def test_moved_module_is_reexported():
    assert mc_semiparametric is semiparametric_distortion
    assert SemiParametricDistortion is S.SemiParametricDistortion


# ----------------------------------------------------------------------------- variance input
def test_variance_is_the_input_and_step_its_uniform_conversion():
    """step= is exactly variance=uniform_error_variance(step) (eq. E1), band included."""
    X, y, W, b = synthetic_features(N=40, K=5, d=16, seed=8)
    steps = np.array([0.3, 0.1, 0.2, 0.25, 0.15])
    a = semiparametric_distortion(X, W, b, step=steps, labels=y, n_realizations=60, seed=3)
    v = semiparametric_distortion(
        X, W, b, variance=uniform_error_variance(steps), labels=y, n_realizations=60, seed=3
    )
    np.testing.assert_array_equal(a.flip_probabilities, v.flip_probabilities)
    np.testing.assert_array_equal(a.flip_counts, v.flip_counts)
    np.testing.assert_allclose(v.noise_variances, steps**2 / 12, rtol=1e-15)
    # a variance that is not Delta^2/12 (stochastic rounding: Delta^2/6) moves the result
    s = semiparametric_distortion(X, W, b, variance=steps**2 / 6, n_realizations=0)
    assert s.flip_rate > a.flip_rate


# ----------------------------------------------------------------------------- defect 4
def _naive_stay(z, x, sig2, ref):
    """P(argmax(z + E x) = ref) for Gaussian E rows of variance sig2: a direct orthant CDF."""
    k = z.size
    o = np.delete(np.arange(k), ref)
    r2 = x @ x
    cov = r2 * (sig2[ref] + np.diag(sig2[o]))
    return stats.multivariate_normal.cdf(
        z[ref] - z[o],
        mean=np.zeros(k - 1),
        cov=cov,
        abseps=1e-8,
        releps=1e-8,
        rng=np.random.default_rng(0),
    )


def test_zero_step_row_is_valid_and_has_no_noise():
    """Defect 4: a constant row of W has a zero per-channel step (returned unchanged by the
    quantizer, error 0). Level 3 used to raise "step must be positive"; now its
    probabilities match the orthant CDF with that row's noise 0, and its simulated
    realizations match a naive simulation with that row exact."""
    X, y, W, b = synthetic_features(N=12, K=5, d=20, seed=1)
    W = W.copy()
    W[2] = 0.05  # a constant row
    steps = np.array([0.3, 0.1, 0.0, 0.25, 0.15])
    res = semiparametric_distortion(X, W, b, step=steps, labels=y, n_realizations=50, seed=4)
    sig2 = steps**2 / 12
    z_all = X @ W.T + b
    for i in range(X.shape[0]):
        z = z_all[i]
        want_stay = _naive_stay(z, X[i], sig2, int(np.argmax(z)))
        assert 1 - res.flip_probabilities[i] == pytest.approx(want_stay, abs=1e-5)
        want_c = _naive_stay(z, X[i], sig2, int(y[i]))
        assert res.correct_probabilities[i] == pytest.approx(want_c, abs=1e-5)
    # the reference row itself exact (the class of the constant row wins for these samples)
    b2 = b.copy()
    b2[2] = 50.0
    r2 = semiparametric_distortion(X, W, b2, step=steps, n_realizations=0)
    np.testing.assert_allclose(r2.flip_probabilities, 0.0, atol=1e-12)
    # realizations: the same draws with row 2 exact
    rng = np.random.default_rng(4)
    E = rng.uniform(-0.5, 0.5, size=(50, *W.shape)) * steps[None, :, None]
    assert np.all(E[:, 2] == 0)
    pred = z_all.argmax(1)
    naive = ((z_all[None] + np.einsum("nd,rkd->rnk", X, E)).argmax(2) != pred).sum(1)
    np.testing.assert_array_equal(res.flip_counts, naive)


def test_all_rows_exact_gives_no_flips():
    X, y, W, b = synthetic_features(N=20, K=4, d=8, seed=2)
    res = semiparametric_distortion(X, W, b, step=0.0, labels=y, n_realizations=40, seed=0)
    assert res.flip_rate == 0 and res.flip_counts.sum() == 0
    assert res.accuracy_loss == pytest.approx(0, abs=1e-12)


# ----------------------------------------------------------------------------- bands
def _independent_band(counts, n, coverage):
    """Eq. M16 written independently: the largest l with (R+1-2l)/(R+1) >= coverage."""
    r = len(counts)
    best = 0
    for l in range(1, r // 2 + 1):
        if (r + 1 - 2 * l) / (r + 1) >= coverage - 1e-12:
            best = l
    if best == 0 or n == 0:
        return (math.nan, math.nan)
    srt = sorted(counts)
    return (srt[best - 1] / n, srt[r - best] / n)


def _level3(counts, n, coverage=0.95):
    counts = np.asarray(counts, dtype=np.int64)
    return SemiParametricDistortion(
        n_samples=n,
        flip_rate=0.1,
        accuracy_float=0.9,
        accuracy_quantized=0.85,
        accuracy_loss=0.05,
        coverage=coverage,
        n_nodes=48,
        flip_probabilities=np.full(n, 0.1),
        correct_probabilities=None,
        predictions=np.zeros(n, dtype=np.int64),
        labels=None,
        flip_counts=counts,
        correct_counts=counts,
    )


def _level3l(counts, n, coverage=0.95):
    counts = np.asarray(counts, dtype=np.int64)
    return MultilayerDistortion(
        level="3L",
        method="radial",
        n_samples=n,
        flip_rate=0.1,
        flip_rate_stderr=0.0,
        accuracy_float=0.9,
        accuracy_quantized=0.85,
        accuracy_loss=0.05,
        coverage=coverage,
        layer_names=("a",),
        noise_variances=(np.asarray(1e-3),),
        flip_probabilities=np.full(n, 0.1),
        correct_probabilities=None,
        predictions=np.zeros(n, dtype=np.int64),
        labels=None,
        flip_counts=counts,
        correct_counts=counts,
    )


def _same(a, b):
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


DEGENERATE = [
    (np.arange(10), 50, 0.95),  # too few realizations for 95 % (needs 39)
    (np.arange(150), 500, 0.99),  # too few for 99 % (needs 199)
    (np.full(40, 7), 50, 0.95),  # all-equal counts
    (np.arange(19), 40, 0.9),  # exactly the minimum for 90 % (round-off in 1 - 0.9)
    (np.arange(39), 100, 0.95),  # exactly the minimum for 95 %
    (np.array([], dtype=np.int64), 10, 0.95),  # no realizations
]


@pytest.mark.parametrize(("counts", "n", "coverage"), DEGENERATE)
def test_level3_and_3L_bands_agree_on_degenerate_inputs(counts, n, coverage):
    """Defect 4: the two order-statistic bands follow one rule (eq. L15); they used to
    disagree (level 3 raised where level 3L returned NaN; round-off dropped a valid band)."""
    b3 = _level3(counts, n).flip_band(coverage)
    b3l = _level3l(counts, n).flip_band(coverage)
    assert _same(b3, b3l), (b3, b3l)
    assert _same(b3, _independent_band(list(counts), n, coverage)), b3


def test_bands_reject_a_bad_coverage_instead_of_using_the_default():
    """``flip_band(coverage=0.0)`` used to fall back to the result's coverage silently."""
    for res in (_level3(np.arange(50), 60), _level3l(np.arange(50), 60)):
        for bad in (0.0, 1.0, -0.5):
            with pytest.raises(ValueError, match="coverage"):
                res.flip_band(bad)


def test_band_has_its_nominal_coverage():
    """Eq. M16: for continuous exchangeable counts the band covers the next draw with
    probability exactly (R+1-2l)/(R+1): simulated with 20 000 replications."""
    rng = np.random.default_rng(11)
    R, reps, cov = 39, 20_000, 0.95
    draws = rng.normal(size=(reps, R + 1))
    hits = 0
    for row in draws:
        lo, hi = order_statistic_band(row[:R], 1, cov)
        hits += lo <= row[R] <= hi
    want = (R + 1 - 2 * 1) / (R + 1)
    se = math.sqrt(want * (1 - want) / reps)
    assert abs(hits / reps - want) < 4 * se


def test_to_prediction_maps_the_level3_fields():
    X, y, W, b = synthetic_features(N=50, K=4, d=8, seed=4)
    res = semiparametric_distortion(X, W, b, step=0.2, labels=y, n_realizations=100, seed=0)
    p = res.to_prediction()
    assert isinstance(p, Prediction) and p.level == "3"
    assert p.flip_rate == res.flip_rate and p.accuracy_loss == res.accuracy_loss
    assert p.accuracy_compressed == res.accuracy_quantized
    assert tuple(p.flip_rate_band) == tuple(res.flip_band())
    assert tuple(p.accuracy_loss_band) == tuple(res.accuracy_loss_band())
    assert p.n_samples == 50 and p.coverage == 0.95
    nolab = semiparametric_distortion(X, W, b, step=0.2, n_realizations=0).to_prediction()
    assert math.isnan(nolab.accuracy_loss) and math.isnan(nolab.flip_rate_band.low)


def test_deprecated_sd_name_warns():
    X, y, W, b = synthetic_features(N=30, K=4, d=8, seed=4)
    res = semiparametric_distortion(X, W, b, step=0.2, n_realizations=40, seed=0)
    with pytest.warns(DeprecationWarning, match="flip_rate_realization_sd"):
        assert res.flip_rate_sd() == res.flip_rate_realization_sd()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res.flip_rate_realization_sd()
