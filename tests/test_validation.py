"""Tests of distortion._validation (one rule per check) and of the theory's light imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from distortion._validation import (
    as_float_array,
    check_count,
    check_step,
    check_variance,
    resolve_variance,
)


def test_as_float_array_checks_finiteness_rank_and_shape():
    a = as_float_array([1, 2, 3], "x", ndim=1, shape=(3,))
    assert a.dtype == np.float64 and a.tolist() == [1.0, 2.0, 3.0]
    f = np.ones((2, 3))
    assert as_float_array(f, "x") is f  # no copy of a float64 array
    assert as_float_array(f, "x", shape=(None, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"x must be finite; found 1 NaN"):
        as_float_array([1.0, np.nan], "x")
    with pytest.raises(ValueError, match="numeric"):
        as_float_array(["a"], "x")
    with pytest.raises(ValueError, match="numeric"):
        as_float_array([1j], "x")
    with pytest.raises(ValueError, match="2 dimension"):
        as_float_array([1.0], "x", ndim=2)
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        as_float_array(f, "x", shape=(None, 4))


def test_check_step_accepts_zero_and_rejects_negative_or_non_finite():
    """A zero step is a constant row (returned unchanged, error 0): valid everywhere."""
    np.testing.assert_array_equal(check_step(0.0, 3), np.zeros(3))
    np.testing.assert_array_equal(check_step([0.1, 0.0, 0.2], 3), [0.1, 0.0, 0.2])
    np.testing.assert_array_equal(check_step(np.full((3, 1), 0.5), 3), np.full(3, 0.5))
    np.testing.assert_array_equal(check_step([0.5], 2), [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        check_step(-0.1, 3)
    with pytest.raises(ValueError, match="finite"):
        check_step(np.inf, 3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        check_step(np.ones(2), 3)
    with pytest.raises(ValueError, match="must be given"):
        check_step(None, 3)
    with pytest.raises(ValueError, match="variance must be non-negative"):
        check_variance([-1.0, 0.0], 2)


def test_resolve_variance_needs_exactly_one_and_converts_steps_by_the_error_model():
    from distortion.theory.error_models import uniform_error_variance

    s = np.array([0.3, 0.0])
    np.testing.assert_array_equal(resolve_variance(s, None, 2), uniform_error_variance(s))
    np.testing.assert_array_equal(resolve_variance(None, 0.01, 2), [0.01, 0.01])
    for step, var in ((None, None), (0.1, 0.01)):
        with pytest.raises(ValueError, match="exactly one"):
            resolve_variance(step, var, 2)


def test_check_count():
    assert check_count(3, "n", 1) == 3 and check_count(np.int64(0), "n") == 0
    for bad in (0, 2.0, True, "3"):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            check_count(bad, "n", 1)


def test_theory_imports_neither_pandas_nor_sklearn_nor_torch():
    code = (
        "import sys, distortion.theory.binary, distortion.theory.gaussian, "
        "distortion.theory.multiclass, distortion.theory.multilayer, "
        "distortion.theory.semiparametric, distortion._validation, distortion.theory._bands, "
        "distortion.theory.baselines, distortion.theory.error_models\n"
        "bad = {'pandas', 'sklearn', 'torch', 'matplotlib'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
