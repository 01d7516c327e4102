"""Tests of distortion.theory.multiclass (theory/multiclass.md, eqs. M1-M17).

References are independent of the code under test: naive transcriptions in float64,
Monte Carlo in *feature* space (draw x, and E where needed, then take argmaxes), direct
``scipy.stats.multivariate_normal.cdf`` calls, and the two-class theory of
``distortion.theory.binary``. Stochastic checks are seeded: ``|a - b| < 4 * stderr`` (3 for
the orthant-vs-Monte-Carlo acceptance check).
"""

from __future__ import annotations

import types
from functools import cache

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from distortion.results import ConfidenceInterval, Prediction
from distortion.theory import binary
from distortion.theory import multiclass as M
from distortion.theory.error_models import uniform_error_variance
from distortion.theory.gaussian import GaussianModel
from distortion.theory.multiclass import (
    multiclass_accuracy,
    multiclass_distortion,
    multiclass_distortion_actual,
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
        se = getattr(mc, q + "_stderr")
        assert abs(getattr(orth, q) - getattr(mc, q)) < 3 * se, q
    assert orth.flip_method == mc.flip_method == "montecarlo"
    assert orth.flip_rate > 0.01  # a regime where the check has power
    assert orth.accuracy_loss > 3 * mc.accuracy_loss_stderr
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
    assert abs(mc.flip_rate - flip_ref) < 4 * np.hypot(flip_se, mc.flip_rate_stderr)


def test_flip_orthant_matches_montecarlo_small_K():
    model, W, b = make_case(K=3, d=8, seed=6)
    step = step_for(W, 3)
    orth = multiclass_distortion(
        model, W, b, step=step, method="orthant", flip_method="orthant", seed=0
    )
    mc = multiclass_distortion(model, W, b, step=step, method="montecarlo", seed=1)
    assert np.isnan(orth.flip_rate_stderr)
    assert orth.flip_rate > 0.02
    assert abs(orth.flip_rate - mc.flip_rate) < 4 * mc.flip_rate_stderr
    assert np.all(np.abs(orth.class_flip_rate - mc.class_flip_rate) < 4 * mc.class_flip_rate_stderr)


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
        flip = binary.flip_rate(model, W, b, step=steps, method="closed")
        assert mine.flip_rate == pytest.approx(flip.flip_rate, abs=1e-9)
        np.testing.assert_allclose(mine.class_flip_rate, flip.class_flip_rate, atol=1e-9)


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
    flip = binary.flip_rate_of_weights(model, W, b, W_hat, b_hat)
    assert mine.flip_rate == pytest.approx(flip.flip_rate, abs=1e-9)


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
            own = np.nan_to_num(getattr(r, q + "_stderr"))
            assert abs(getattr(r, q) - est) < 4 * np.hypot(se, own), (r.method, q)
    assert res.level == 2 and res.flip_rate > 0.01


def test_level2_with_float_weights_is_lossless():
    model, W, b = make_case(K=4, d=8, seed=12)
    res = multiclass_distortion_actual(
        model, W, b, W.copy(), method="montecarlo", n_draws=4000, seed=0
    )
    assert res.flip_rate == 0 and res.accuracy_loss == 0


# ----------------------------------------------------------------------------- results
def test_distortion_result_frames():
    model, W, b = make_case(K=4, d=8, seed=13)
    res = multiclass_distortion(model, W, b, step=0.2, method="montecarlo", n_draws=4000, seed=0)
    f = res.to_frame()
    assert f.shape == (1, 12) and f["level"].iloc[0] == 1
    pc = res.to_frame(per_class=True)
    assert pc.shape[0] == 4 and np.allclose(pc["accuracy_loss"], res.class_accuracy_loss())
    ci = res.confidence_interval("flip_rate")
    assert isinstance(ci, ConfidenceInterval) and ci.confidence_level == 0.95
    # the half-width is z * stderr, z and the stderr computed independently of the interval
    z = stats.norm.ppf(0.975)
    se = np.sqrt(np.sum(res.priors**2 * res.class_flip_rate_stderr**2))  # (eq. M8)
    assert (ci.high - ci.low) / 2 == pytest.approx(z * se, rel=1e-12)
    assert (ci.high + ci.low) / 2 == pytest.approx(res.flip_rate, rel=1e-12)
    c90 = res.confidence_interval("flip_rate", confidence_level=0.9)
    assert c90.width / ci.width == pytest.approx(stats.norm.ppf(0.95) / z, rel=1e-12)
    with pytest.warns(DeprecationWarning, match="confidence_level"):
        old = res.confidence_interval("flip_rate", level=0.9)
    assert tuple(old) == tuple(c90)
    with pytest.raises(ValueError, match="confidence_level"):
        res.confidence_interval("flip_rate", 1.5)
    assert isinstance(multiclass_accuracy(model, W, b).to_frame(), pd.DataFrame)
    assert "class_flip" not in repr(res)
    assert {"flip_rate_stderr", "accuracy_loss_stderr"} <= set(f.columns)


def test_level1_zero_step_row_is_exact():
    """A zero step (a constant row, returned unchanged by the quantizer) is valid: that row
    gets no noise, the same as variance 0 there."""
    model, W, b = make_case(K=4, d=8, seed=16)
    steps = np.array([0.2, 0.0, 0.1, 0.3])
    kw = {"method": "orthant", "seed": 0}
    a = multiclass_distortion(model, W, b, step=steps, **kw)
    v = multiclass_distortion(model, W, b, variance=steps**2 / 12, **kw)
    assert a.accuracy_loss == pytest.approx(v.accuracy_loss, abs=1e-12)
    joint = M._LogitJoint(model, W, b, step=steps)
    assert np.all(joint.noise_diag[:, 1] == 0)


def test_variance_input_equals_uniform_step_conversion():
    """variance= is the primary input; step= converts through uniform_error_variance."""
    model, W, b = make_case(K=4, d=8, seed=17)
    steps = np.array([0.2, 0.15, 0.1, 0.3])
    kw = {"method": "montecarlo", "n_draws": 4000, "seed": 3}
    a = multiclass_distortion(model, W, b, step=steps, **kw)
    v = multiclass_distortion(model, W, b, variance=uniform_error_variance(steps), **kw)
    assert a.flip_rate == v.flip_rate and a.accuracy_loss == v.accuracy_loss
    acc_s = multiclass_accuracy(model, W, b, step=steps, method="orthant", seed=0)
    acc_v = multiclass_accuracy(model, W, b, variance=steps**2 / 12, method="orthant", seed=0)
    assert acc_v.quantized and acc_s.accuracy == pytest.approx(acc_v.accuracy, abs=1e-12)
    with pytest.raises(ValueError, match="exactly one"):
        multiclass_accuracy(model, W, b, step=steps, variance=steps**2 / 12)


def test_renamed_fields_keep_deprecated_aliases():
    model, W, b = make_case(K=4, d=8, seed=13)
    res = multiclass_distortion(model, W, b, step=0.2, method="montecarlo", n_draws=4000, seed=0)
    pairs = {
        "stderr_accuracy_float": "accuracy_float_stderr",
        "stderr_accuracy_quantized": "accuracy_quantized_stderr",
        "stderr_accuracy_loss": "accuracy_loss_stderr",
        "stderr_flip_rate": "flip_rate_stderr",
        "class_flip": "class_flip_rate",
        "class_stderr_flip": "class_flip_rate_stderr",
        "class_stderr_accuracy_loss": "class_accuracy_loss_stderr",
    }
    for old, new in pairs.items():
        with pytest.warns(DeprecationWarning, match=new):
            np.testing.assert_array_equal(getattr(res, old), getattr(res, new))
    acc = multiclass_accuracy(model, W, b, method="montecarlo", n_draws=2000, seed=0)
    with pytest.warns(DeprecationWarning, match="accuracy_stderr"):
        assert acc.stderr == acc.accuracy_stderr
    lo, hi = acc.confidence_interval(0.9)
    assert hi - lo == pytest.approx(2 * stats.norm.ppf(0.95) * acc.accuracy_stderr)


def test_to_prediction_levels_1_and_2():
    model, W, b = make_case(K=4, d=8, seed=13)
    res = multiclass_distortion(model, W, b, step=0.2, method="montecarlo", n_draws=4000, seed=0)
    p = res.to_prediction()
    assert isinstance(p, Prediction) and p.level == "1" and p.method == "montecarlo"
    assert p.flip_rate == res.flip_rate and p.flip_rate_stderr == res.flip_rate_stderr
    assert p.accuracy_loss == res.accuracy_loss
    assert p.accuracy_compressed == res.accuracy_quantized
    assert p.n_samples == int(res.n_draws.sum()) and np.isnan(p.flip_rate_band.low)
    W_hat = W + 0.01
    p2 = multiclass_distortion_actual(model, W, b, W_hat, method="orthant").to_prediction()
    assert p2.level == "2" and p2.method == "orthant+montecarlo"
    assert np.isnan(p2.accuracy_loss_stderr)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"W": np.zeros((3, 8))}, "K mismatch"),
        ({"W": np.zeros((4, 7))}, "d mismatch"),
        ({"b": np.zeros(3)}, "K mismatch"),
        ({"W": np.full((4, 8), np.nan)}, "finite"),
        ({"step": -0.1}, "non-negative"),
        ({"step": None}, "exactly one"),
        ({"variance": 0.01}, "exactly one"),
        ({"step": None, "variance": -1.0}, "non-negative"),
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
