"""The compressor protocol and the error models of the rounding quantizers."""

import numpy as np
import pytest

from distortion.compression import Compressed, Compressor, error_second_moment, realization_seed
from distortion.quantize import UniformQuantizer
from distortion.theory.error_models import (
    ErrorModel,
    empirical_second_moment,
    stochastic_rounding_second_moment,
    uniform_error_variance,
)


def _mc_second_moment(q, w, n=400):
    draws = np.stack([q.quantize(w, seed=s).error ** 2 for s in range(n)])
    per = draws.reshape(n, w.shape[0], -1).mean(axis=2)  # (R, C)
    return per.mean(axis=0), per.std(axis=0, ddof=1) / np.sqrt(n)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("rounding", ["stochastic", "dither"])
def test_error_model_matches_monte_carlo_of_the_actual_error(rounding, granularity):
    w = np.random.default_rng(3).standard_normal((6, 40))
    q = UniformQuantizer(3, granularity=granularity, rounding=rounding)
    c = q.compress(w, seed=0)
    mc, se = _mc_second_moment(UniformQuantizer(3, granularity="channel", rounding=rounding), w)
    if granularity == "tensor":
        draws = np.stack([q.quantize(w, seed=s).error ** 2 for s in range(400)]).mean(axis=(1, 2))
        mc, se = draws.mean(), draws.std(ddof=1) / np.sqrt(draws.size)
    assert np.all(np.abs(c.error_model.second_moment - mc) < 4 * se + 1e-15)


def test_stochastic_second_moment_naive_transcription():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 17))
    step = np.array([0.3, 0.11, 0.7])
    naive = []
    for c in range(3):
        acc = 0.0
        for v in w[c]:
            x = v / step[c]
            p = x - np.floor(x)
            acc += step[c] ** 2 * p * (1 - p)
        naive.append(acc / w.shape[1])
    got = stochastic_rounding_second_moment(w, step, channel_axis=0)
    np.testing.assert_allclose(got, naive, rtol=1e-13)
    # averaged over a uniform position in the cell, Delta^2 / 6 (eq. E3)
    u = np.linspace(0, 1, 200001)[None, :]
    assert stochastic_rounding_second_moment(u * 0.5, 0.5) == pytest.approx(0.25 / 6, rel=1e-4)


def test_uniform_variance_rule_and_validation():
    np.testing.assert_allclose(uniform_error_variance([0.0, 0.6]), [0.0, 0.36 / 12])
    with pytest.raises(ValueError, match="non-negative"):
        uniform_error_variance(-1.0)
    with pytest.raises(ValueError, match="finite"):
        uniform_error_variance(np.nan)


def test_compress_is_the_protocol_and_equals_quantize():
    w = np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32)
    q = UniformQuantizer(4, granularity="channel")
    assert isinstance(q, Compressor)
    c = q.compress(w)
    assert isinstance(c, Compressed)
    np.testing.assert_array_equal(c.values, q.quantize(w).values)
    np.testing.assert_array_equal(c.error, q.quantize(w).error)
    assert c.values.dtype == np.float32 and c.error_model.random
    np.testing.assert_allclose(error_second_moment(c), uniform_error_variance(c.detail.step))
    np.testing.assert_allclose(
        error_second_moment(c, "empirical"), np.mean(c.error.reshape(4, -1) ** 2, axis=1)
    )
    assert c.to_frame().shape[0] == 4
    with pytest.raises(ValueError, match="rule"):
        error_second_moment(c, "actual")
    np.testing.assert_allclose(q.error_model(w).second_moment, c.error_model.second_moment)


def test_error_model_validation():
    with pytest.raises(ValueError, match="negative"):
        ErrorModel(np.array(-1.0))
    with pytest.raises(ValueError, match="per-channel"):
        ErrorModel(np.array(1.0), granularity="channel")
    with pytest.raises(ValueError, match="finite"):
        ErrorModel(np.array([1.0, np.inf]), granularity="channel")
    m = ErrorModel(np.array([1.0, 2.0]), np.array([0.5, 1.0]), granularity="channel")
    np.testing.assert_allclose(m.variance, [0.75, 1.0])
    np.testing.assert_allclose(empirical_second_moment(np.ones((2, 3)) * 2), 4.0)


def test_realization_seed_is_deterministic_and_distinct():
    assert realization_seed(None, 1) is None
    assert realization_seed(7, 1, 2) == realization_seed(7, 1, 2)
    assert len({realization_seed(7, i) for i in range(50)}) == 50
    with pytest.raises(ValueError, match="seed"):
        realization_seed(-1)
