"""Tests of distortion.theory.multiclass (theory/multiclass.md, eqs. M1-M17).

References are independent of the code under test: naive transcriptions in float64,
Monte Carlo in *feature* space (draw x, and E where needed, then take argmaxes), direct
``scipy.stats.multivariate_normal.cdf`` calls, and the two-class theory of
``distortion.theory.binary``. Stochastic checks are seeded: ``|a - b| < 4 * stderr`` (3 for
the orthant-vs-Monte-Carlo acceptance check).
"""

from __future__ import annotations

import time
import types
from functools import cache

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from distortion.theory import binary
from distortion.theory import multiclass as M
from distortion.theory.gaussian import GaussianModel
from distortion.theory.multiclass import (
    multiclass_accuracy,
    multiclass_distortion,
    multiclass_distortion_actual,
    semiparametric_distortion,
)


# ----------------------------------------------------------------------------- fixtures
@cache
def make_case(K=10, d=64, seed=0, pooled=False, scale=0.6):
    """K-class Gaussian model with class covariances and a layer near the LDA direction."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, d)) * scale
    if pooled:
        a = rng.normal(size=(d, d)) / np.sqrt(d)
        covs = a @ a.T + 0.5 * np.eye(d)
    else:
        a = rng.normal(size=(K, d, d)) / np.sqrt(d)
        covs = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(d)
    priors = rng.uniform(0.5, 1.5, size=K)
    model = GaussianModel.from_params(means, covs, priors / priors.sum())
    W = rng.normal(size=(K, d)) * 0.3 + means * 0.5
    b = rng.normal(size=K) * 0.1
    return model, W, b


def step_for(W, bits):
    """Per-tensor symmetric max-scaling step with 2^(bits-1)-1 positive levels."""
    return float(np.abs(W).max() / (2 ** (bits - 1) - 1))


def feature_space_mc(model, W, b, n_per_class, seed, W_hat=None, noise_step=None):
    """Decisions from draws of x (and of a fresh uniform E per draw): an independent path.

    Returns per-class (acc_float, acc_quant, flip) means and their standard errors.
    """
    rng = np.random.default_rng(seed)
    K, d = W.shape
    out = np.zeros((2, 3, K))
    L = np.linalg.cholesky(model.covariances)
    for k in range(K):
        x = model.means[k] + rng.standard_normal((n_per_class, d)) @ L[k].T
        z = x @ W.T + b
        if W_hat is not None:
            zq = x @ W_hat.T + b
        else:
            steps = np.broadcast_to(np.asarray(noise_step, float), (K,))
            zq = z.copy()
            for j in range(K):  # row j of E: d uniform entries per draw
                e = rng.uniform(-0.5, 0.5, size=(n_per_class, d)) * steps[j]
                zq[:, j] += np.sum(e * x, axis=1)
        p, pq = z.argmax(1), zq.argmax(1)
        for i, v in enumerate([p == k, pq == k, p != pq]):
            out[0, i, k] = v.mean()
            out[1, i, k] = v.std(ddof=1) / np.sqrt(n_per_class)
    return out


# ----------------------------------------------------------------------------- moments
def test_logit_moments_match_naive_transcription():
    model, W, b = make_case(K=4, d=6, seed=1)
    steps = np.array([0.1, 0.2, 0.05, 0.3])
    joint = M._LogitJoint(model, W, b, step=steps)
    for k in range(4):
        mu, S = model.means[k], model.covariances[k]
        a = W @ mu + b
        t = np.trace(S) + mu @ mu
        a_q, S_q = joint.quantized_moments(k)
        np.testing.assert_allclose(joint.mean[k], a, rtol=1e-13)
        np.testing.assert_allclose(joint.cov[k], W @ S @ W.T, rtol=1e-12)
        np.testing.assert_allclose(S_q, W @ S @ W.T + np.diag(steps**2 / 12) * t, rtol=1e-12)
        np.testing.assert_allclose(a_q, a, rtol=1e-13)


def test_quantized_covariance_matches_feature_space_simulation():
    """Eq. M3 is exact under H_G + H_U: check every entry by Monte Carlo over (x, E)."""
    model, W, b = make_case(K=3, d=5, seed=2, scale=1.0)
    steps = np.array([0.4, 0.8, 0.6])
    rng = np.random.default_rng(3)
    n, k = 400_000, 1
    x = model.means[k] + rng.standard_normal((n, 5)) @ np.linalg.cholesky(model.covariances[k]).T
    e = rng.uniform(-0.5, 0.5, size=(n, 3, 5)) * steps[None, :, None]
    zq = x @ W.T + b + np.einsum("nkd,nd->nk", e, x)
    a_q, S_q = M._LogitJoint(model, W, b, step=steps).quantized_moments(k)
    c = zq - a_q
    prods = c[:, :, None] * c[:, None, :]
    est = prods.mean(axis=0)
    se = prods.std(axis=0, ddof=1) / np.sqrt(n)
    assert np.all(np.abs(est - S_q) < 4 * se), (est, S_q, se)
    assert np.all(np.abs(c.mean(axis=0)) < 4 * c.std(axis=0) / np.sqrt(n))


def test_margin_helpers_match_matrix_form():
    rng = np.random.default_rng(0)
    K = 5
    m = rng.normal(size=(K, K))
    v = rng.normal(size=K)
    for r in range(K):
        for s in range(K):
            A_r = np.eye(K)[r] - np.delete(np.eye(K), r, axis=0)
            A_s = np.eye(K)[s] - np.delete(np.eye(K), s, axis=0)
            np.testing.assert_allclose(M._margin_cov(m, r, s), A_r @ m @ A_s.T, atol=1e-14)
        np.testing.assert_allclose(M._margin_mean(v, r), A_r @ v, atol=1e-15)


# ----------------------------------------------------------------------------- accuracy
def test_float_accuracy_orthant_matches_feature_space_mc():
    model, W, b = make_case(K=6, d=12, seed=4)
    res = multiclass_accuracy(model, W, b, method="orthant", seed=0, abseps=1e-5)
    ref = feature_space_mc(model, W, b, 40_000, seed=1, W_hat=W)
    acc_ref = model.priors @ ref[0, 0]
    se_ref = np.sqrt(np.sum(model.priors**2 * ref[1, 0] ** 2))
    assert abs(res.accuracy - acc_ref) < 4 * se_ref
    assert np.all(np.abs(res.class_accuracy - ref[0, 0]) < 4 * ref[1, 0] + 1e-5)


def test_orthant_and_montecarlo_agree_K10():
    """Acceptance: K = 10, d = 64; orthant vs logit-space Monte Carlo within 3 stderr."""
    model, W, b = make_case()
    step = step_for(W, 4)
    orth = multiclass_distortion(model, W, b, step=step, method="orthant", seed=0, abseps=1e-4)
    mc = multiclass_distortion(model, W, b, step=step, method="montecarlo", seed=1)
    for q in ("accuracy_float", "accuracy_quantized", "accuracy_loss"):
        se = getattr(mc, "stderr_" + q)
        assert abs(getattr(orth, q) - getattr(mc, q)) < 3 * se, q
    assert orth.flip_method == mc.flip_method == "montecarlo"
    assert orth.flip_rate > 0.01  # a regime where the check has power
    assert orth.accuracy_loss > 3 * mc.stderr_accuracy_loss
    # the float-only entry point gives the same orthant numbers for the same seed
    acc = multiclass_accuracy(model, W, b, method="orthant", seed=0, abseps=1e-4)
    assert abs(acc.accuracy - orth.accuracy_float) < 1e-4


def test_moment_matching_close_to_exact_uniform_error():
    """Level 1 (moment-matched Gaussian) vs feature-space simulation with uniform E (exact
    under H_G + H_U); d = 64 makes the CLT approximation good to Monte-Carlo precision."""
    model, W, b = make_case(K=5, d=64, seed=5)
    step = step_for(W, 3)
    res = multiclass_distortion(model, W, b, step=step, method="orthant", seed=0, abseps=1e-5)
    ref = feature_space_mc(model, W, b, 20_000, seed=2, noise_step=step)
    for i, q in enumerate(("accuracy_float", "accuracy_quantized")):
        est = model.priors @ ref[0, i]
        se = np.sqrt(np.sum(model.priors**2 * ref[1, i] ** 2))
        assert abs(getattr(res, q) - est) < 4 * se, q
    flip_ref = model.priors @ ref[0, 2]
    flip_se = np.sqrt(np.sum(model.priors**2 * ref[1, 2] ** 2))
    mc = multiclass_distortion(model, W, b, step=step, method="montecarlo", seed=3)
    assert abs(mc.flip_rate - flip_ref) < 4 * np.hypot(flip_se, mc.stderr_flip_rate)


def test_flip_orthant_matches_montecarlo_small_K():
    model, W, b = make_case(K=3, d=8, seed=6)
    step = step_for(W, 3)
    orth = multiclass_distortion(
        model, W, b, step=step, method="orthant", flip_method="orthant", seed=0
    )
    mc = multiclass_distortion(model, W, b, step=step, method="montecarlo", seed=1)
    assert np.isnan(orth.stderr_flip_rate)
    assert orth.flip_rate > 0.02
    assert abs(orth.flip_rate - mc.flip_rate) < 4 * mc.stderr_flip_rate
    assert np.all(np.abs(orth.class_flip - mc.class_flip) < 4 * mc.class_stderr_flip)


def test_pooled_path_equals_class_path():
    """A pooled model is projected once; its numbers equal the per-class path's."""
    model, W, b = make_case(K=3, d=10, seed=7, pooled=True)
    cov = np.array(model.covariances)  # (K, d, d) copies: the per-class path
    as_class = GaussianModel(
        priors=model.priors, means=model.means, covariances=cov, covariance_type="class"
    )
    broadcast = types.SimpleNamespace(  # stride-0 stack, how ImageNet sizes stay small
        priors=model.priors,
        means=model.means,
        covariances=np.broadcast_to(cov[0], cov.shape),
    )
    assert M._LogitJoint(broadcast, W, b).pooled and M._LogitJoint(model, W, b).pooled
    assert not M._LogitJoint(as_class, W, b).pooled
    step = step_for(W, 3)
    res = [
        multiclass_distortion(
            m, W, b, step=step, method="orthant", flip_method="orthant", seed=0
        ).to_frame(per_class=True)
        for m in (model, as_class, broadcast)
    ]
    for r in res[1:]:
        pd.testing.assert_frame_equal(r, res[0], rtol=1e-10)


def test_singular_logit_covariance_d_smaller_than_K():
    """d = 3 < K = 5: W Sigma W^T has rank 3 (eigen-factor and singular orthants)."""
    model, W, b = make_case(K=5, d=3, seed=20, scale=1.0)
    res = multiclass_accuracy(model, W, b, method="orthant", seed=0, abseps=1e-4)
    ref = feature_space_mc(model, W, b, 40_000, seed=1, W_hat=W)
    se = np.sqrt(np.sum(model.priors**2 * ref[1, 0] ** 2))
    assert abs(res.accuracy - model.priors @ ref[0, 0]) < 4 * se
    # adding the same vector to every row shifts all logits equally: no decision changes
    # (the joint covariance of (z, delta) is singular too)
    same = multiclass_distortion_actual(
        model, W, b, W + 0.05, method="montecarlo", n_draws=20_000, seed=0
    )
    assert same.flip_rate == 0 and same.accuracy_loss == 0


def test_montecarlo_is_seeded():
    model, W, b = make_case(K=4, d=10, seed=7)
    a = multiclass_distortion(model, W, b, step=0.1, method="montecarlo", n_draws=5000, seed=3)
    c = multiclass_distortion(model, W, b, step=0.1, method="montecarlo", n_draws=5000, seed=3)
    assert a.to_frame().equals(c.to_frame())
    assert a.n_draws.sum() >= 5000 - 4


def test_per_row_steps_enter_each_logit():
    """A large step on one row only must hurt that class more than the others."""
    model, W, b = make_case(K=4, d=10, seed=8)
    steps = np.full(4, 1e-4)
    steps[2] = step_for(W, 2)
    res = multiclass_distortion(model, W, b, step=steps, method="orthant", seed=0)
    tiny = multiclass_distortion(model, W, b, step=1e-4, method="orthant", seed=0)
    assert abs(tiny.accuracy_loss) < 1e-4
    joint = M._LogitJoint(model, W, b, step=steps)
    added = np.diag(joint.quantized_moments(0)[1] - joint.cov[0])
    assert np.argmax(added) == 2 and added[2] > 1e4 * added[0]
    assert res.flip_rate > 10 * tiny.flip_rate


# ----------------------------------------------------------------------------- K = 2
def test_two_classes_equal_binary_theory():
    """Eq. M17: accuracy = 1 - bayes_risk; loss = binary moment distortion; flip = closed."""
    model, W, b = make_case(K=2, d=7, seed=9)
    acc = multiclass_accuracy(model, W, b, method="orthant")
    assert acc.accuracy == pytest.approx(1 - binary.bayes_risk(model, W, b).risk, abs=1e-13)
    for steps in (step_for(W, 3), np.array([0.05, 0.2])):
        mine = multiclass_distortion(
            model, W, b, step=steps, method="orthant", flip_method="orthant", seed=0
        )
        theirs = binary.distortion(model, W, b, step=steps, method="moment")
        assert mine.accuracy_loss == pytest.approx(theirs.distortion, abs=1e-12)
        assert 1 - mine.accuracy_quantized == pytest.approx(theirs.risk_quantized, abs=1e-12)
        flip = binary.flip_probability(model, W, b, step=steps, method="closed")
        assert mine.flip_rate == pytest.approx(flip.probability, abs=1e-9)
        np.testing.assert_allclose(mine.class_flip, flip.class_probability, atol=1e-9)


def test_two_classes_level2_equals_binary_weights():
    model, W, b = make_case(K=2, d=7, seed=10)
    rng = np.random.default_rng(0)
    W_hat = W + rng.uniform(-0.1, 0.1, size=W.shape)
    b_hat = b + np.array([0.02, -0.01])
    mine = multiclass_distortion_actual(
        model, W, b, W_hat, b_hat=b_hat, method="orthant", flip_method="orthant", seed=0
    )
    risk = binary.risk_of_weights(model, W_hat, b_hat).risk
    assert 1 - mine.accuracy_quantized == pytest.approx(risk, abs=1e-12)
    flip = binary.flip_probability_of_weights(model, W, b, W_hat, b_hat)
    assert mine.flip_rate == pytest.approx(flip.probability, abs=1e-9)


# ----------------------------------------------------------------------------- level 2
def test_level2_matches_feature_space_mc():
    """Level 2 is exact under H_G: orthant accuracies and MC flips vs decisions on draws of x."""
    model, W, b = make_case(K=5, d=16, seed=11)
    from distortion.quantize import UniformQuantizer

    W_hat = np.asarray(UniformQuantizer(3).quantize(W).values)
    res = multiclass_distortion_actual(model, W, b, W_hat, method="orthant", seed=0)
    mc = multiclass_distortion_actual(model, W, b, W_hat, method="montecarlo", seed=1)
    ref = feature_space_mc(model, W, b, 30_000, seed=2, W_hat=W_hat)
    p = model.priors
    for i, q in enumerate(("accuracy_float", "accuracy_quantized", "flip_rate")):
        est, se = p @ ref[0, i], np.sqrt(np.sum(p**2 * ref[1, i] ** 2))
        for r in (res, mc):  # orthant values have no stderr (their error is <= 1e-5)
            own = np.nan_to_num(getattr(r, "stderr_" + q))
            assert abs(getattr(r, q) - est) < 4 * np.hypot(se, own), (r.method, q)
    assert res.level == 2 and res.flip_rate > 0.01


def test_level2_with_float_weights_is_lossless():
    model, W, b = make_case(K=4, d=8, seed=12)
    res = multiclass_distortion_actual(
        model, W, b, W.copy(), method="montecarlo", n_draws=4000, seed=0
    )
    assert res.flip_rate == 0 and res.accuracy_loss == 0


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
    assert res.flip_rate_sd() > 1.3 * res.flip_rate_binomial_sd()  # strong dependence
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
    sim_se = res.flip_rate_sd() / np.sqrt(res.n_realizations)
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
    assert lo <= hi and isinstance(res.flip_band(), M.Band)
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


def test_level3_timing_N10000_K10():
    """Level 3 for N = 10 000, K = 10, d = 64 with a 400-realization band in seconds."""
    X, y, W, b = synthetic_features(N=10_000, K=10, d=64, seed=6)
    t0 = time.perf_counter()
    res = semiparametric_distortion(X, W, b, step=step_for(W, 4), labels=y, seed=0)
    elapsed = time.perf_counter() - t0
    assert res.n_realizations == 400 and res.flip_probabilities.shape == (10_000,)
    assert elapsed < 30, elapsed


# ----------------------------------------------------------------------------- results
def test_distortion_result_frames():
    model, W, b = make_case(K=4, d=8, seed=13)
    res = multiclass_distortion(model, W, b, step=0.2, method="montecarlo", n_draws=4000, seed=0)
    f = res.to_frame()
    assert f.shape == (1, 12) and f["level"].iloc[0] == 1
    pc = res.to_frame(per_class=True)
    assert pc.shape[0] == 4 and np.allclose(pc["accuracy_loss"], res.class_accuracy_loss())
    lo, hi = res.confidence_interval("flip_rate")
    assert lo < res.flip_rate < hi
    assert isinstance(multiclass_accuracy(model, W, b).to_frame(), pd.DataFrame)
    assert "class_flip" not in repr(res)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"W": np.zeros((3, 8))}, "K mismatch"),
        ({"W": np.zeros((4, 7))}, "d mismatch"),
        ({"b": np.zeros(3)}, "K mismatch"),
        ({"W": np.full((4, 8), np.nan)}, "finite"),
        ({"step": 0.0}, "positive"),
        ({"step": np.ones(3)}, "shape"),
        ({"step": np.inf}, "finite"),
        ({"method": "exact"}, "method"),
        ({"flip_method": "closed"}, "flip_method"),
        ({"n_draws": 0}, "n_draws"),
        ({"abseps": -1.0}, "abseps"),
    ],
)
def test_level1_validation(kwargs, match):
    model, W, b = make_case(K=4, d=8, seed=14)
    args = {"W": W, "b": b, "step": 0.1} | kwargs
    with pytest.raises(ValueError, match=match):
        multiclass_distortion(model, args.pop("W"), args.pop("b"), **args)


def test_method_limits_and_other_validation():
    model, W, b = make_case(K=21, d=4, seed=15)
    with pytest.raises(ValueError, match="at most 20 classes"):
        multiclass_accuracy(model, W, b, method="orthant")
    assert multiclass_accuracy(model, W, b, n_draws=2000, seed=0).method == "montecarlo"
    model, W, b = make_case(K=13, d=4, seed=15)
    with pytest.raises(ValueError, match="flip_method='orthant'"):
        multiclass_distortion(model, W, b, step=0.1, flip_method="orthant")
    with pytest.raises(ValueError, match="GaussianModel"):
        multiclass_accuracy(object(), W, b)
    with pytest.raises(ValueError, match="W_hat.*K mismatch"):
        multiclass_distortion_actual(model, W, b, W[:3])
    X, y, W, b = synthetic_features(N=10, K=4, d=8)
    with pytest.raises(ValueError, match="d mismatch"):
        semiparametric_distortion(X[:, :5], W, b, step=0.1)
    with pytest.raises(ValueError, match="labels"):
        semiparametric_distortion(X, W, b, step=0.1, labels=np.full(10, 4))
    with pytest.raises(ValueError, match="n_realizations"):
        semiparametric_distortion(X, W, b, step=0.1, n_realizations=10)
    with pytest.raises(ValueError, match="finite"):
        semiparametric_distortion(X * np.nan, W, b, step=0.1)
