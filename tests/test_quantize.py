"""Tests of distortion.quantize against a naive loop over levels, plus properties and statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from distortion.quantize import MSE_RATIOS, UniformQuantizer, choose_qparams

SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("tensor", "channel")
CLIPPINGS = ("max", "mse")


# --------------------------------------------------------------------------------------------
# Naive reference: one group (tensor or channel) at a time, a plain loop over the levels.
# --------------------------------------------------------------------------------------------
def _naive_levels(lo, hi, bits, scheme):
    """(codes, level values, step, zero point) of the grid over [lo, hi]."""
    if scheme == "symmetric":
        L = 2 ** (bits - 1) - 1
        step = hi / L
        codes = list(range(-L, L + 1))
        values = [hi if k == L else -hi if k == -L else k * step for k in codes]
        return codes, values, step, 0
    qmax = 2**bits - 1
    step = (hi - lo) / qmax
    zp = int(min(max(np.round(-lo / step), 0), qmax)) if step > 0 else 0
    codes = list(range(qmax + 1))
    return codes, [(k - zp) * step for k in codes], step, zp


def _naive_nearest(w, codes, values, zp):
    """Nearest level of every entry by a loop over levels; exact ties go to the even (k - zp)."""
    best_code = np.zeros(w.shape, dtype=np.int64)
    best_val = np.zeros(w.shape)
    best_dist = np.full(w.shape, np.inf)
    for k, v in zip(codes, values, strict=True):
        dist = np.abs(w - v)
        take = (dist < best_dist) | ((dist == best_dist) & ((k - zp) % 2 == 0))
        best_code[take], best_val[take], best_dist[take] = k, v, dist[take]
    return best_code, best_val


def _naive_group(w, bits, scheme, clipping, dtype):
    """Naive quantization of one group (a flat float64 array)."""
    if np.all(w == w[0]):
        return np.zeros(w.shape, dtype=np.int64), w.copy(), 0.0
    if bits == 1 and scheme == "symmetric":
        a = np.abs(w)
        alpha = a.max() if np.all(a == a.max()) else a.mean()
        codes = np.where(w >= 0, 1, -1)
        return codes, codes * alpha, 2 * alpha
    if scheme == "symmetric":
        lo, hi = -np.abs(w).max(), np.abs(w).max()
    else:
        lo, hi = min(w.min(), 0.0), max(w.max(), 0.0)
    if clipping == "mse":
        best = None
        for r in MSE_RATIOS:
            c, v, _, zp = _naive_levels(lo * r, hi * r, bits, scheme)
            if scheme == "symmetric":  # the search scores the plain grid k * step
                v = [k * (hi * r / (2 ** (bits - 1) - 1)) for k in c]
            _, vals = _naive_nearest(w, c, v, zp)
            sse = float(np.sum((vals - w) ** 2))
            if best is None or sse < best[0]:
                best = (sse, r)
        r = best[1]
        lo, hi = float(dtype.type(lo * r)), float(dtype.type(hi * r))
    codes, values, step, zp = _naive_levels(lo, hi, bits, scheme)
    c, v = _naive_nearest(w, codes, values, zp)
    return c, v, step


def naive_quantize(w, bits, scheme, granularity, clipping):
    w64 = np.asarray(w, dtype=np.float64)
    groups = [w64.ravel()] if granularity == "tensor" else [row.ravel() for row in w64]
    out = [_naive_group(g, bits, scheme, clipping, np.asarray(w).dtype) for g in groups]
    codes = np.concatenate([o[0] for o in out]).reshape(w64.shape)
    values = np.concatenate([o[1] for o in out]).reshape(w64.shape)
    return codes, values.astype(np.asarray(w).dtype), np.array([o[2] for o in out])


def _tensors():
    rng = np.random.default_rng(20261123)
    return {
        "normal": rng.standard_normal((6, 40)),
        "heavy_t2": rng.standard_t(2, size=(5, 3, 3, 3)),
        "float32_laplace": rng.laplace(size=(4, 25)).astype(np.float32),
        "positive": rng.exponential(size=(3, 30)),
    }


@pytest.mark.parametrize("name", list(_tensors()))
@pytest.mark.parametrize(
    "scheme,granularity,clipping", list(itertools.product(SCHEMES, GRANULARITIES, CLIPPINGS))
)
def test_bit_exact_against_naive_loop(name, scheme, granularity, clipping):
    w = _tensors()[name]
    for bits in range(1, 9):
        q = UniformQuantizer(bits, scheme=scheme, granularity=granularity, clipping=clipping)
        res = q.quantize(w)
        codes, values, steps = naive_quantize(w, bits, scheme, granularity, clipping)
        np.testing.assert_array_equal(res.codes, codes, err_msg=f"bits={bits}")
        np.testing.assert_array_equal(res.values, values, err_msg=f"bits={bits}")
        np.testing.assert_array_equal(np.atleast_1d(res.step), steps, err_msg=f"bits={bits}")


ALL_CONFIGS = list(itertools.product(SCHEMES, GRANULARITIES, CLIPPINGS))


@pytest.mark.parametrize("scheme,granularity,clipping", ALL_CONFIGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_idempotent(scheme, granularity, clipping, dtype):
    w = np.random.default_rng(1).standard_t(3, size=(8, 30)).astype(dtype)
    for bits in (1, 2, 3, 4, 8, 16):
        q = UniformQuantizer(bits, scheme=scheme, granularity=granularity, clipping=clipping)
        once = q.quantize(w)
        twice = q.quantize(once.values)
        np.testing.assert_array_equal(twice.codes, once.codes)
        if scheme == "symmetric":
            np.testing.assert_array_equal(twice.values, once.values)
        else:  # the recomputed range is rounded: same codes, values within a few ulps
            np.testing.assert_allclose(twice.values, once.values, rtol=4 * np.finfo(dtype).eps)


def test_stochastic_rounding_of_symmetric_grid_is_idempotent():
    w = np.random.default_rng(2).standard_normal((5, 20))
    q = UniformQuantizer(4, rounding="stochastic")
    once = q.quantize(w, seed=0)
    np.testing.assert_array_equal(q.quantize(once.values, seed=1).values, once.values)


@pytest.mark.parametrize("scheme,granularity,clipping", ALL_CONFIGS)
def test_error_bounded_levels_counted_and_channel_equals_rowwise(scheme, granularity, clipping):
    rng = np.random.default_rng(3)
    w = rng.standard_t(2, size=(6, 50))
    for bits in range(1, 9):
        q = UniformQuantizer(bits, scheme=scheme, granularity=granularity, clipping=clipping)
        res = q.quantize(w)
        step = res.step if res.step.ndim == 0 else res.step[:, None]
        bound = np.broadcast_to(step / 2, w.shape)
        assert np.all(np.abs(res.error[~res.clipped]) <= bound[~res.clipped] * (1 + 1e-12))
        groups = [res.values.ravel()] if granularity == "tensor" else list(res.values)
        for g in groups:
            assert len(np.unique(g)) <= 2**bits
        if clipping == "max" and bits > 1:
            assert res.clipped_fraction == 0.0
    for bits in (2, 5):
        chan = UniformQuantizer(bits, scheme=scheme, granularity="channel", clipping=clipping)
        tens = UniformQuantizer(bits, scheme=scheme, granularity="tensor", clipping=clipping)
        res = chan.quantize(w)
        for i, row in enumerate(w):
            r = tens.quantize(row)
            np.testing.assert_array_equal(res.values[i], r.values)
            np.testing.assert_array_equal(res.codes[i], r.codes)
            assert res.step[i] == r.step


def test_mse_clipping_beats_max_and_clips_heavy_tails():
    w = np.random.default_rng(4).standard_t(2, size=4000)
    mx = UniformQuantizer(3).quantize(w)
    mse = UniformQuantizer(3, clipping="mse").quantize(w)
    assert np.mean(mse.error**2) < np.mean(mx.error**2)
    assert 0 < mse.clipped_fraction < 0.2


def test_stochastic_rounding_is_unbiased():
    # Mean error of one entry over 4000 seeds: within 4 standard errors of 0.
    w = np.random.default_rng(5).standard_normal(64)
    q = UniformQuantizer(3, rounding="stochastic")
    errs = np.stack([q.quantize(w, seed=s).error for s in range(4000)])
    mean, se = errs.mean(axis=0), errs.std(axis=0, ddof=1) / np.sqrt(len(errs))
    nz = se > 0
    assert np.all(
        np.abs(mean[nz]) < 4.5 * se[nz]
    )  # 64 entries: 4.5 sd keeps the family error < 1e-3
    pooled = errs.mean(axis=0).mean()
    assert abs(pooled) < 4 * errs.mean(axis=0).std(ddof=1) / np.sqrt(64)


def test_dither_error_is_uniform_and_uncorrelated():
    w = np.random.default_rng(6).standard_normal(20000)
    res = UniformQuantizer(3, rounding="dither").quantize(w, seed=7)
    u = res.error / res.step
    assert stats.kstest(u, stats.uniform(loc=-0.5, scale=1).cdf).pvalue > 0.01
    r = stats.pearsonr(res.error, w)
    assert r.pvalue > 0.01
    # nearest rounding at 2 bits is far from uniform on the same weights (the test has power)
    near = UniformQuantizer(2).quantize(w)
    assert stats.kstest(near.error / near.step, stats.uniform(loc=-0.5, scale=1).cdf).pvalue < 1e-6


def test_seeded_rounding_is_reproducible_and_seeds_differ():
    w = np.random.default_rng(8).standard_normal(100)
    for rounding in ("stochastic", "dither"):
        q = UniformQuantizer(4, rounding=rounding)
        np.testing.assert_array_equal(q.quantize(w, seed=1).values, q.quantize(w, seed=1).values)
        assert not np.array_equal(q.quantize(w, seed=1).values, q.quantize(w, seed=2).values)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "dither"])
@pytest.mark.parametrize("scheme,granularity,clipping", ALL_CONFIGS)
def test_torch_and_numpy_identical(rounding, scheme, granularity, clipping):
    torch = pytest.importorskip("torch")
    w = np.random.default_rng(9).standard_normal((4, 3, 3)).astype(np.float32)
    q = UniformQuantizer(
        3, scheme=scheme, granularity=granularity, clipping=clipping, rounding=rounding
    )
    t = torch.tensor(w)
    rt, rn = q.quantize(t, seed=3), q.quantize(w, seed=3)
    assert isinstance(rt.values, torch.Tensor) and rt.values.dtype == torch.float32
    np.testing.assert_array_equal(rt.values.numpy(), rn.values)
    np.testing.assert_array_equal(rt.codes, rn.codes)
    np.testing.assert_array_equal(rt.step, rn.step)
    np.testing.assert_array_equal(t.numpy(), w)  # input untouched


@settings(max_examples=60, deadline=None)
@given(
    w=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
        elements=st.floats(-1e4, 1e4, allow_nan=False, width=32),
    ),
    bits=st.integers(1, 16),
    scheme=st.sampled_from(SCHEMES),
    granularity=st.sampled_from(GRANULARITIES),
    clipping=st.sampled_from(CLIPPINGS),
)
def test_properties(w, bits, scheme, granularity, clipping):
    before = w.copy()
    q = UniformQuantizer(bits, scheme=scheme, granularity=granularity, clipping=clipping)
    res = q.quantize(w)
    np.testing.assert_array_equal(w, before)  # never modifies its input
    assert res.values.shape == w.shape and res.values.dtype == w.dtype
    assert res.codes.dtype == np.int64 and res.error.dtype == np.float64
    assert np.all(np.isfinite(res.values))
    expected_steps = 1 if granularity == "tensor" else w.shape[0]
    assert np.atleast_1d(res.step).shape == (expected_steps,) and np.all(res.step >= 0)
    step = res.step if res.step.ndim == 0 else res.step.reshape((-1,) + (1,) * (w.ndim - 1))
    bound = np.broadcast_to(step, w.shape) / 2
    ok = ~res.clipped
    # float32 values are the float64 levels rounded once: allow a few ulps of the value
    tol = 4 * np.finfo(w.dtype).eps * np.maximum(np.abs(w[ok]), bound[ok])
    assert np.all(np.abs(res.error[ok]) <= bound[ok] * (1 + 1e-9) + tol)
    if scheme == "symmetric" and bits > 1:
        L = 2 ** (bits - 1) - 1
        assert np.all(np.abs(res.codes) <= L)
    if scheme == "asymmetric":
        assert np.all((res.codes >= 0) & (res.codes < 2**bits))
    again = q.quantize(res.values).values
    if scheme == "symmetric":
        np.testing.assert_array_equal(again, res.values)
    else:
        np.testing.assert_allclose(again, res.values, rtol=4 * np.finfo(w.dtype).eps, atol=0)


@pytest.mark.parametrize("bits", [0, 17, -1, 2.5, True, "4"])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits"):
        UniformQuantizer(bits)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"scheme": "log"}, "scheme"),
        ({"granularity": "row"}, "granularity"),
        ({"clipping": "percentile"}, "clipping"),
        ({"rounding": "floor"}, "rounding"),
    ],
)
def test_unknown_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        UniformQuantizer(4, **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(bad):
    w = np.array([0.1, bad, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        UniformQuantizer(4).quantize(w)


def test_empty_and_scalar_inputs():
    with pytest.raises(ValueError, match="empty"):
        UniformQuantizer(4).quantize(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="channel"):
        UniformQuantizer(4, granularity="channel").quantize(np.float64(1.0))
    with pytest.raises(ValueError, match="real numbers"):
        UniformQuantizer(4).quantize(np.array(["a"]))


@pytest.mark.parametrize("scheme,granularity,clipping", ALL_CONFIGS)
@pytest.mark.parametrize("bits", [1, 2, 8])
def test_constant_tensor_quantizes_to_itself(scheme, granularity, clipping, bits):
    for value in (0.0, 0.37, -2.5):
        w = np.full((3, 4), value)
        with np.errstate(all="raise"):  # no division by zero anywhere
            res = UniformQuantizer(
                bits, scheme=scheme, granularity=granularity, clipping=clipping
            ).quantize(w)
        np.testing.assert_array_equal(res.values, w)
        assert np.all(res.step == 0) and np.all(res.error == 0) and np.all(res.codes == 0)


def test_choose_qparams_matches_quantizer():
    w = np.random.default_rng(10).standard_normal((3, 7))
    qp = choose_qparams(w, 4, granularity="channel")
    assert qp.step.shape == (3,)
    np.testing.assert_array_equal(
        qp.step, UniformQuantizer(4, granularity="channel").quantize(w).step
    )
    # the H_U variance against the mean square of a dithered error (exactly uniform), 400
    # seeded realizations: the relative standard error of a mean of u^2 is ~0.9 / sqrt(n)
    q = UniformQuantizer(4, granularity="channel", rounding="dither")
    e2 = np.mean([q.quantize(w, seed=s).error ** 2 for s in range(400)], axis=(0, 2))
    np.testing.assert_allclose(qp.noise_variance, e2, rtol=4 * 0.9 / np.sqrt(400 * 7))


def test_noise_variance_of_stochastic_rounding_is_its_own():
    # stochastic rounding: E[e^2] = step^2 p (1 - p) per entry (eq. E2), not step^2 / 12;
    # checked against a seeded Monte Carlo of the actual error (4 standard errors)
    w = np.random.default_rng(11).standard_normal((4, 200))
    q = UniformQuantizer(3, granularity="channel", rounding="stochastic")
    res = q.quantize(w, seed=0)
    draws = np.stack([q.quantize(w, seed=s).error ** 2 for s in range(300)])  # (R, C, n)
    mc = draws.mean(axis=(0, 2))
    se = draws.mean(axis=2).std(axis=0, ddof=1) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(res.noise_variance - mc) < 4 * se)
    assert np.all(np.abs(res.noise_variance - res.step**2 / 12) > 10 * se)


def test_to_frame():
    res = UniformQuantizer(4, granularity="channel").quantize(
        np.random.default_rng(0).normal(size=(3, 9))
    )
    df = res.to_frame()
    assert list(df["channel"]) == [0, 1, 2]
    np.testing.assert_allclose(df["uniform_var"], res.step**2 / 12)


# --------------------------------------------------------------------------------------------
# The full symmetric range (PyTorch's convention) and the clip ratio (issue 14).
# --------------------------------------------------------------------------------------------
def _torch_fake_quantize(w32: np.ndarray, bits: int, granularity: str):
    """PyTorch's own observer + fake quantization of float32 weights (the reference)."""
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    t = torch.from_numpy(w32)
    if granularity == "channel":
        obs = PerChannelMinMaxObserver(
            ch_axis=0,
            dtype=torch.qint8,
            quant_min=qmin,
            quant_max=qmax,
            qscheme=torch.per_channel_symmetric,
        )
        obs(t)
        scale, zp = obs.calculate_qparams()
        fq = torch.fake_quantize_per_channel_affine(t, scale, zp.to(torch.int32), 0, qmin, qmax)
    else:
        obs = MinMaxObserver(
            dtype=torch.qint8, quant_min=qmin, quant_max=qmax, qscheme=torch.per_tensor_symmetric
        )
        obs(t)
        scale, zp = obs.calculate_qparams()
        fq = torch.fake_quantize_per_tensor_affine(t, float(scale), int(zp), qmin, qmax)
    return scale.numpy().astype(np.float64).reshape(-1), fq.numpy()


def _near_ties(bits: int, n_out: int = 8, n_in: int = 300, seed: int = 0) -> np.ndarray:
    """float32 weights with many entries at and next to the half-way points of torch's grid."""
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=0.1, size=(n_out, n_in)).astype(np.float32)
    half = (2**bits - 1) / 2.0
    for c in range(n_out):
        amax = np.float32(np.abs(w[c]).max())
        s = np.float32(amax / np.float32(half))
        k = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, size=60)
        ties = ((k + 0.5) * s).astype(np.float32)
        ties = ties[np.abs(ties) < amax]
        w[c, : ties.size] = ties
        w[c, 100 : 100 + ties.size] = np.nextafter(ties, np.float32(np.inf))
        w[c, 200 : 200 + ties.size] = np.nextafter(ties, np.float32(-np.inf))
    return w


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", [8, 4])
def test_full_range_is_bit_exact_with_torch(bits, granularity):
    w = _near_ties(bits)
    scale, ref = _torch_fake_quantize(w, bits, granularity)
    res = UniformQuantizer(bits, granularity=granularity, symmetric_range="full").quantize(w)
    assert res.values.dtype == np.float32
    np.testing.assert_array_equal(np.atleast_1d(res.step), scale)  # the observer's scales
    np.testing.assert_array_equal(res.values, ref)  # bit for bit, near-ties included
    assert res.codes.min() >= -(2 ** (bits - 1)) and res.codes.max() <= 2 ** (bits - 1) - 1
    # the torch path (a tensor in, a tensor out) is the same
    torch = pytest.importorskip("torch")
    rt = UniformQuantizer(bits, granularity=granularity, symmetric_range="full").quantize(
        torch.from_numpy(w)
    )
    np.testing.assert_array_equal(rt.values.numpy(), ref)


def test_full_range_differs_from_division_at_near_ties():
    """The reciprocal rule matters: dividing by the step gives other codes on some near-ties."""
    w = _near_ties(8)
    q = UniformQuantizer(8, granularity="channel", symmetric_range="full")
    res = q.quantize(w)
    step = res.step.reshape(-1, 1)
    by_division = np.clip(np.round(w.astype(np.float64) / step), -128, 127)
    assert np.any(by_division != res.codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_full_range_against_naive_levels(bits):
    """float64 weights: the nearest level k * 2 alpha / (2^b - 1), k = -2^(b-1)..2^(b-1)-1."""
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(5, 40))
    res = UniformQuantizer(bits, granularity="channel", symmetric_range="full").quantize(w)
    for c in range(5):
        alpha = np.abs(w[c]).max()
        step = alpha / ((2**bits - 1) / 2.0)
        codes = list(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))
        nc, nv = _naive_nearest(w[c], codes, [k * step for k in codes], 0)
        # -alpha sits exactly half-way between qmin and qmin + 1 (a tie up to round-off)
        keep = w[c] != -alpha
        np.testing.assert_array_equal(res.codes[c][keep], nc[keep])
        np.testing.assert_allclose(res.values[c][keep], nv[keep], rtol=0, atol=1e-15)
        assert set(res.codes[c][~keep]) <= {codes[0], codes[1]}
        # the positive maximum is clipped (it sits at qmax + 1/2), the negative one is not
        top = np.argmax(w[c])
        assert res.clipped[c, top] == (w[c, top] > (2 ** (bits - 1) - 1) * step)
        assert not np.any(res.clipped[c][w[c] < 0])
    np.testing.assert_array_equal(res.clipped, w > _per_row(res.step, w) * (2 ** (bits - 1) - 1))


def _per_row(step, w):
    return np.asarray(step).reshape((-1,) + (1,) * (w.ndim - 1))


@pytest.mark.parametrize("ratio", [1.03, 0.97, 0.933, 0.5])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_clip_ratio_against_naive_transcription(ratio, granularity):
    rng = np.random.default_rng(7)
    w = rng.normal(size=(6, 30))
    res = UniformQuantizer(4, granularity=granularity, clip_ratio=ratio).quantize(w)
    groups = w.reshape(1, -1) if granularity == "tensor" else w
    codes = res.codes.reshape(groups.shape)
    values = res.values.reshape(groups.shape)
    clipped = res.clipped.reshape(groups.shape)
    for g, row in enumerate(groups):
        hi = ratio * np.abs(row).max()
        nc, nv = _naive_nearest(row, *_naive_levels(-hi, hi, 4, "symmetric")[:2], 0)
        np.testing.assert_array_equal(codes[g], nc)
        np.testing.assert_allclose(values[g], nv, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(clipped[g], np.abs(row) > hi * (1 + 1e-12))
        assert np.atleast_1d(res.step)[g] == pytest.approx(hi / 7, rel=1e-15)
    if ratio > 1:
        assert not res.clipped.any()
    else:
        assert res.clipped.any()


def test_clip_ratio_one_and_narrow_range_are_todays_quantizer():
    w = np.random.default_rng(3).normal(size=(4, 9)).astype(np.float32)
    a = UniformQuantizer(4, granularity="channel").quantize(w)
    b = UniformQuantizer(4, granularity="channel", symmetric_range="narrow",
                         clip_ratio=1.0).quantize(w)  # fmt: skip
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.step, b.step)


def test_new_fields_travel_with_the_quantizer():
    from dataclasses import asdict

    q = UniformQuantizer(4, granularity="channel", symmetric_range="full", clip_ratio=0.97)
    assert q.with_bits(8) == UniformQuantizer(8, granularity="channel", symmetric_range="full",
                                              clip_ratio=0.97)  # fmt: skip
    assert UniformQuantizer(**asdict(q)) == q
    assert "clip_ratio=0.97" in repr(q) and "symmetric_range='full'" in repr(q)
    assert q != UniformQuantizer(4, granularity="channel", symmetric_range="full")
    w = np.random.default_rng(0).normal(size=(3, 8))
    qp = q.qparams(w)
    assert qp.symmetric_range == "full" and (qp.qmin, qp.qmax) == (-8, 7)
    np.testing.assert_array_equal(qp.step, q.quantize(w).step)
    assert q.compress(w).detail.quantizer is q
    assert list(q.to_frame().columns)[-2:] == ["symmetric_range", "clip_ratio"]
    qp2 = choose_qparams(w, 4, granularity="channel", symmetric_range="full", clip_ratio=0.97)
    np.testing.assert_array_equal(qp2.step, qp.step)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_ratio": 0.0}, r"clip_ratio must be in \(0, 2\]"),
        ({"clip_ratio": -0.5}, r"clip_ratio must be in \(0, 2\]"),
        ({"clip_ratio": 2.5}, r"clip_ratio must be in \(0, 2\]"),
        ({"clip_ratio": float("nan")}, r"clip_ratio must be in \(0, 2\]"),
        ({"clip_ratio": True}, "clip_ratio must be a number"),
        ({"clip_ratio": "0.9"}, "clip_ratio must be a number"),
        ({"clip_ratio": 0.9, "clipping": "mse"}, "needs clipping='max'"),
        ({"symmetric_range": "wide"}, "symmetric_range must be one of"),
        ({"symmetric_range": "full", "scheme": "asymmetric"}, "scheme='symmetric' only"),
    ],
)
def test_bad_range_and_ratio_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UniformQuantizer(4, **kwargs)
    with pytest.raises(ValueError, match=match):
        choose_qparams(np.ones((2, 3)) * [1, 2, 3], 4, **kwargs)


def test_clip_ratio_applies_to_the_asymmetric_range():
    w = np.random.default_rng(1).normal(size=(2, 50))
    a = UniformQuantizer(4, scheme="asymmetric", granularity="channel").qparams(w)
    b = UniformQuantizer(4, scheme="asymmetric", granularity="channel", clip_ratio=0.9).qparams(w)
    np.testing.assert_allclose(b.step, 0.9 * a.step, rtol=1e-12)
    np.testing.assert_allclose(b.hi, 0.9 * a.hi, rtol=1e-15)


# --------------------------------------------------------------------------------------------
# The clipping split of the error model (eq. E5-E7)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "q",
    [
        UniformQuantizer(4, granularity="channel", clip_ratio=0.9),
        UniformQuantizer(4, granularity="tensor", clip_ratio=0.8),
        UniformQuantizer(4, granularity="channel", symmetric_range="full"),
        UniformQuantizer(3, granularity="channel", clipping="mse"),
        UniformQuantizer(4, scheme="asymmetric", granularity="channel", clip_ratio=0.85),
    ],
)
def test_clipping_split_is_the_actual_error_on_clipped_entries(q):
    w = np.random.default_rng(5).standard_t(4, size=(6, 40))
    res = q.quantize(w)
    em = q.error_model(w, rule="clipping")
    d = em.deterministic
    assert d.shape == w.shape and em.rule == "clipping" and em.random
    sat = d != 0  # the saturated entries: beyond the outer levels
    np.testing.assert_allclose(d[sat], res.error[sat], rtol=0, atol=1e-14)
    half = _per_row(res.step, w) / 2 if q.granularity == "channel" else res.step / 2
    assert np.all(np.abs(np.where(sat, 0.0, res.error)) <= half * (1 + 1e-9))
    if q.scheme == "symmetric":
        np.testing.assert_array_equal(sat, res.clipped)
    assert np.all(d * w <= 0)  # towards zero
    axis = 1 if q.granularity == "channel" else None
    share = sat.reshape(6, -1).mean(axis=axis) if axis else sat.mean()
    np.testing.assert_allclose(em.second_moment, (1 - share) * np.asarray(res.step) ** 2 / 12)
    msd = (d.reshape(6, -1) ** 2).mean(axis=1) if axis else np.mean(d**2)
    np.testing.assert_allclose(em.total_second_moment, em.second_moment + msd)
    assert "deterministic_second_moment" in em.to_frame()
    # the default rule is today's model, with no deterministic part
    assert q.error_model(w).deterministic is None
    np.testing.assert_array_equal(q.error_model(w).second_moment, res.error_model.second_moment)


def test_clipping_split_of_stochastic_rounding_and_dither():
    w = np.random.default_rng(2).normal(size=(4, 50))
    qs = UniformQuantizer(4, granularity="channel", clip_ratio=0.8, rounding="stochastic")
    em = qs.error_model(w, rule="clipping")
    res = qs.quantize(w, seed=0)
    step = res.step.reshape(-1, 1)
    p = w / step - np.floor(w / step)
    naive = np.where(res.clipped, 0.0, step**2 * p * (1 - p)).mean(axis=1)  # (eq. E2, E6)
    np.testing.assert_allclose(em.second_moment, naive, rtol=1e-12)
    qd = UniformQuantizer(4, granularity="channel", clip_ratio=0.8, rounding="dither")
    ed = qd.error_model(w, rule="clipping")
    np.testing.assert_allclose(ed.second_moment, res.step**2 / 12)  # dither: every entry
    np.testing.assert_array_equal(ed.deterministic, em.deterministic)


def test_clipping_split_of_dither_against_monte_carlo():
    """Dither: E = D + N exactly, N i.i.d. U(-step/2, step/2) — mean D, variance step^2/12.

    2 000 seeded realizations; |mean error - D| < 4 stderr on every entry, and the mean
    variance over entries within 4 stderr of step^2/12.
    """
    w = np.random.default_rng(11).normal(size=(3, 20))
    q = UniformQuantizer(3, granularity="channel", clip_ratio=0.7, rounding="dither")
    em = q.error_model(w, rule="clipping")
    errs = np.stack([q.quantize(w, seed=s).error for s in range(2000)])
    step = q.quantize(w, seed=0).step.reshape(-1, 1)
    se = step / np.sqrt(12 * 2000)
    assert np.all(np.abs(errs.mean(0) - em.deterministic) < 4 * se)
    var = errs.var(0) / (step**2 / 12)  # ~ 1, stderr sqrt(0.8 / 2000) per entry (uniform)
    assert abs(var.mean() - 1) < 4 * np.sqrt(0.8 / 2000 / var.size)


def test_error_model_rule_is_checked():
    with pytest.raises(ValueError, match="rule must be 'uniform' or 'clipping'"):
        UniformQuantizer(4).error_model(np.arange(5.0), rule="mse")
