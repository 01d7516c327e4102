"""Compressors beyond uniform rounding (distortion.compressors, theory/compression.md).

Each compressor is checked bit-exactly (or to rounding, where a library routine's summation
order differs) against a naive Python-loop transcription of its definition on small random
inputs, for idempotence, for exact sparsity / rank, for its error model, for torch
round-trips and for its argument checks.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import norm

from distortion.compression import Compressed, Compressor
from distortion.compressors import (
    NF4_TABLE,
    POWER_EXPONENTS,
    Compose,
    KMeansQuantizer,
    LowRank,
    MagnitudePruner,
    NonUniformQuantizer,
    ResidualExpansion,
    kmeans_1d,
    log2_levels,
    nf4_levels,
)
from distortion.quantize import UniformQuantizer
from distortion.theory.error_models import uniform_error_variance


def _w(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _moments(e, channel=True):
    rows = e.reshape(e.shape[0], -1) if channel else e.reshape(1, -1)
    return np.mean(rows**2, axis=1), np.mean(rows, axis=1)


def _assert_exact_model(c: Compressed, channel: bool):
    m2, mu = _moments(c.error, channel)
    assert c.error_model.granularity == ("channel" if channel else "tensor")
    assert c.error_model.random is False
    np.testing.assert_allclose(np.atleast_1d(c.error_model.second_moment), m2, rtol=1e-12)
    np.testing.assert_allclose(np.atleast_1d(c.error_model.mean), mu, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------- naive transcriptions
def _naive_nearest(x, levels):
    """Nearest level by a loop; halfway goes to the smaller magnitude, then the lower one."""
    best = None
    for j, lv in enumerate(levels):
        d = abs(x - lv)
        if best is None or d < best[0] or (d == best[0] and abs(lv) < abs(levels[best[1]])):
            best = (d, j)
    return best[1]


def _naive_unstructured(w, sparsity):
    flat = [abs(v) for v in w.ravel()]
    k = int(np.round(sparsity * len(flat)))
    order = sorted(range(len(flat)), key=lambda i: flat[i])  # Python's sort is stable
    out = w.ravel().copy()
    for i in order[:k]:
        out[i] = 0.0
    return out.reshape(w.shape)


def _naive_nm(w, n, m):
    out = w.reshape(w.shape[0], -1).copy()
    for r in range(out.shape[0]):
        for g in range(0, out.shape[1], m):
            idx = sorted(range(g, g + m), key=lambda i: abs(out[r, i]))
            for i in idx[: m - n]:
                out[r, i] = 0.0
    return out.reshape(w.shape)


def _naive_filter(w, sparsity, norm_="l1"):
    rows = w.reshape(w.shape[0], -1)
    norms = []
    for r in rows:
        if norm_ == "l1":
            norms.append(sum(abs(v) for v in r) / len(r))
        else:
            norms.append(math.sqrt(sum(v * v for v in r) / len(r)))
    k = int(np.round(sparsity * len(norms)))
    order = sorted(range(len(norms)), key=lambda i: norms[i])
    out = w.copy()
    for c in order[:k]:
        out[c] = 0.0
    return out


def _naive_lloyd(x, k, max_iter=100, init=None):
    x = list(x)
    c = sorted(init) if init is not None else list(np.linspace(min(x), max(x), k))
    for _ in range(max_iter):
        a = [_naive_nearest(v, c) for v in x]
        sums, counts = [0.0] * k, [0] * k
        for v, j in zip(x, a, strict=True):
            sums[j] += v
            counts[j] += 1
        new = sorted(sums[j] / counts[j] if counts[j] else c[j] for j in range(k))
        if new == c:
            break
        c = new
    a = [_naive_nearest(v, c) for v in x]
    return np.array(c), np.array(a)


def _naive_kmeanspp(x, k, seed):
    rng = np.random.default_rng(seed)
    chosen = [x[rng.integers(len(x))]]
    d2 = [(v - chosen[0]) ** 2 for v in x]
    while len(chosen) < k:
        cum = np.cumsum(d2)
        i = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(x) - 1)
        chosen.append(x[i])
        d2 = [min(d, (v - x[i]) ** 2) for d, v in zip(d2, x, strict=True)]
    return chosen


def _naive_power(row, bits, a):
    lv = 2 ** (bits - 1) - 1
    m = max(abs(v) for v in row)
    out = []
    for v in row:
        y = math.copysign((abs(v) / m) ** a, v) if v != 0 else 0.0
        k = round(y * lv)  # Python round: half to even, as numpy
        out.append(math.copysign((abs(k) / lv) ** (1 / a), k) * m if k != 0 else 0.0)
    return np.array(out)


def _naive_grid(row, levels):
    m = max(abs(v) for v in row)
    return np.array([levels[_naive_nearest(v / m, list(levels))] * m for v in row])


def _naive_uniform_symmetric(rows, bits):
    """Symmetric uniform, max clipping, nearest rounding, per row; outer levels are ±alpha."""
    lv = 2 ** (bits - 1) - 1
    out = rows.copy()
    for r in range(rows.shape[0]):
        row = rows[r]
        if row.max() == row.min():
            continue  # a constant row is returned unchanged
        alpha = max(abs(v) for v in row)
        step = alpha / lv
        for i, v in enumerate(row):
            code = min(max(round(v / step), -lv), lv)
            out[r, i] = alpha if code == lv else -alpha if code == -lv else code * step
    return out


def _naive_rex(w, bits, order, channel):
    rows = w.reshape(w.shape[0], -1) if channel else w.reshape(1, -1)
    residual, total = rows.copy(), np.zeros_like(rows)
    for _ in range(order):
        q = _naive_uniform_symmetric(residual, bits)
        total = total + q
        residual = residual - q
    return total.reshape(w.shape)


# ----------------------------------------------------------------------- protocol, torch
ALL = [
    MagnitudePruner(0.5),
    MagnitudePruner(None, pattern="n:m"),
    MagnitudePruner(0.25, pattern="filter", norm="l2"),
    LowRank(2),
    LowRank(energy=0.8),
    KMeansQuantizer(4),
    KMeansQuantizer(3, scope="channel", init="kmeans++"),
    KMeansQuantizer(4, algorithm="exact"),
    NonUniformQuantizer(3),
    NonUniformQuantizer(3, grid="log2", granularity="channel"),
    NonUniformQuantizer(4, grid="nf4"),
    ResidualExpansion(3, 2, granularity="channel"),
    Compose(MagnitudePruner(0.5), UniformQuantizer(4)),
]


@pytest.mark.parametrize("comp", ALL, ids=lambda c: type(c).__name__)
def test_protocol_and_numpy_input_unchanged(comp):
    w = _w((4, 8), seed=1).astype(np.float32)
    before = w.copy()
    c = comp.compress(w, seed=0)
    assert isinstance(comp, Compressor) and isinstance(c, Compressed)
    np.testing.assert_array_equal(w, before)
    assert c.values.dtype == np.float32 and c.values.shape == w.shape
    assert c.error.dtype == np.float64
    np.testing.assert_array_equal(c.error, c.values.astype(np.float64) - w.astype(np.float64))
    c.to_frame()


@pytest.mark.parametrize("comp", ALL, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_in_torch_out(comp, dtype):
    torch = pytest.importorskip("torch")
    w = torch.tensor(_w((4, 8), seed=2), dtype=getattr(torch, dtype))
    before = w.clone()
    c = comp.compress(w, seed=0)
    assert isinstance(c.values, torch.Tensor)
    assert c.values.dtype == w.dtype and c.values.device == w.device
    assert torch.equal(w, before)
    ref = comp.compress(w.numpy(), seed=0)
    np.testing.assert_array_equal(c.values.numpy(), ref.values)
    np.testing.assert_array_equal(c.error, ref.error)


def test_numpy_only_at_import():
    code = "import sys, distortion.compressors; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("comp", ALL, ids=lambda c: type(c).__name__)
def test_non_finite_weights_raise(comp):
    w = _w((4, 8))
    w[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        comp.compress(w)
    with pytest.raises(ValueError, match="empty"):
        comp.compress(np.zeros((0, 8)))


# ----------------------------------------------------------------------- pruning
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_pruning_naive_exact_sparsity_and_model(sparsity):
    w = _w((5, 7, 3), seed=3)
    w[0, :3, 0] = 0.25  # ties: the stable sort prunes the first index first
    w[2, 1, :] = -0.25
    c = MagnitudePruner(sparsity).compress(w)
    np.testing.assert_array_equal(c.values, _naive_unstructured(w, sparsity))
    assert np.count_nonzero(c.values == 0) == int(np.round(sparsity * w.size))
    assert c.detail.sparsity == pytest.approx(np.round(sparsity * w.size) / w.size)
    _assert_exact_model(c, channel=True)
    # eq. C2 written out
    pruned = c.detail.pruned.reshape(5, -1)
    wr = w.reshape(5, -1)
    np.testing.assert_allclose(c.error_model.second_moment, np.mean(wr**2 * pruned, axis=1))
    np.testing.assert_allclose(c.error_model.mean, -np.mean(wr * pruned, axis=1))
    again = MagnitudePruner(sparsity).compress(c.values)
    np.testing.assert_array_equal(again.values, c.values)  # idempotent


def test_keep_largest_is_the_stable_argsort_selection():
    from distortion.compressors.pruning import _keep_largest

    rng = np.random.default_rng(40)
    for trial in range(200):
        size = int(rng.integers(1, 60))
        scores = rng.integers(0, 1 + trial % 7, size).astype(np.float64)  # many ties
        for n_pruned in {0, size, int(rng.integers(0, size + 1))}:
            naive = np.ones(size, dtype=bool)
            naive[sorted(range(size), key=lambda i: scores[i])[:n_pruned]] = False
            np.testing.assert_array_equal(_keep_largest(scores, n_pruned), naive)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_nm_pruning_naive_and_per_group_count(n, m):
    w = _w((3, 4, 2, 2), seed=4)  # rows of 16: m divides
    w[1, 0, 0, :] = 0.5  # a tie inside a group
    c = MagnitudePruner(None, pattern="n:m", n=n, m=m).compress(w)
    np.testing.assert_array_equal(c.values, _naive_nm(w, n, m))
    groups = c.values.reshape(3, -1, m)
    assert np.all(np.count_nonzero(groups, axis=-1) == n)
    assert c.detail.sparsity == pytest.approx(1 - n / m)
    _assert_exact_model(c, channel=True)
    again = MagnitudePruner(1 - n / m, pattern="n:m", n=n, m=m).compress(c.values)
    np.testing.assert_array_equal(again.values, c.values)


@pytest.mark.parametrize("norm_", ["l1", "l2"])
def test_filter_pruning_naive(norm_):
    w = _w((8, 3, 3), seed=5)
    w[3] = w[6]  # a tie between channels
    c = MagnitudePruner(0.4, pattern="filter", norm=norm_).compress(w)
    np.testing.assert_array_equal(c.values, _naive_filter(w, 0.4, norm_))
    zero_rows = np.all(c.values.reshape(8, -1) == 0, axis=1)
    assert zero_rows.sum() == round(0.4 * 8)
    _assert_exact_model(c, channel=True)
    # eq. C4: the whole mean square of a removed channel, 0 for a kept one
    np.testing.assert_allclose(
        c.error_model.second_moment, np.where(zero_rows, np.mean(w.reshape(8, -1) ** 2, 1), 0)
    )
    again = MagnitudePruner(0.4, pattern="filter", norm=norm_).compress(c.values)
    np.testing.assert_array_equal(again.values, c.values)


def test_global_pruning_thresholds_jointly():
    ws = {"a": _w((4, 6), 6), "b": 3.0 * _w((5, 2), 7), "c": 0.1 * _w((3, 3), 8)}
    out = MagnitudePruner(0.5, scope="global").compress_many(ws)
    assert list(out) == list(ws)
    flat = np.concatenate([v.ravel() for v in ws.values()])
    naive = _naive_unstructured(flat, 0.5)
    got = np.concatenate([out[k].values.ravel() for k in ws])
    np.testing.assert_array_equal(got, naive)
    assert out["c"].detail.sparsity > 0.9 > 0.2 > out["b"].detail.sparsity  # not per layer
    for c in out.values():
        _assert_exact_model(c, channel=True)
    # filter, global: channels ranked by per-entry norm over all tensors
    outf = MagnitudePruner(0.5, scope="global", pattern="filter").compress_many(ws)
    norms = np.concatenate([np.mean(np.abs(v.reshape(v.shape[0], -1)), 1) for v in ws.values()])
    kept = np.ones(norms.size, bool)
    kept[sorted(range(norms.size), key=lambda i: norms[i])[: round(0.5 * norms.size)]] = False
    got_kept = np.concatenate([np.any(outf[k].values != 0, axis=1) for k in ws])
    np.testing.assert_array_equal(got_kept, kept)
    # layer scope just maps compress
    lay = MagnitudePruner(0.5).compress_many(ws)
    for k, v in ws.items():
        np.testing.assert_array_equal(lay[k].values, MagnitudePruner(0.5).compress(v).values)


def test_pruning_gaussian_reference_eq_c3():
    # w ~ N(0, s^2), ratio p: E[w^2 1{pruned}] = s^2 (p - 2 t phi(t)), t = Phi^-1((1+p)/2)
    s, p, n = 1.5, 0.6, 200_000
    w = s * np.random.default_rng(11).standard_normal((1, n))
    c = MagnitudePruner(p).compress(w)
    t = norm.ppf((1 + p) / 2)
    truth = s**2 * (p - 2 * t * norm.pdf(t))
    per = w**2 * c.detail.pruned
    se = per.std() / np.sqrt(n)
    assert abs(c.error_model.second_moment[0] - truth) < 4 * se


def test_pruner_validation():
    for bad in [-0.1, 1.0, 1.5, np.nan, True, "0.5"]:
        with pytest.raises(ValueError, match="sparsity"):
            MagnitudePruner(bad)
    with pytest.raises(ValueError, match="sparsity"):
        MagnitudePruner(None)
    with pytest.raises(ValueError, match="1 - n/m"):
        MagnitudePruner(0.3, pattern="n:m")
    with pytest.raises(ValueError, match="m to divide the row length 6"):
        MagnitudePruner(None, pattern="n:m").compress(_w((2, 6)))
    with pytest.raises(ValueError, match="n must be in 1..3"):
        MagnitudePruner(None, pattern="n:m", n=4, m=4)
    with pytest.raises(ValueError, match="scope must be 'layer'"):
        MagnitudePruner(None, pattern="n:m", scope="global")
    with pytest.raises(ValueError, match="pattern must be one of"):
        MagnitudePruner(0.5, pattern="blocks")
    with pytest.raises(ValueError, match="norm must be one of"):
        MagnitudePruner(0.5, pattern="filter", norm="linf")
    with pytest.raises(ValueError, match="at least 2 axes"):
        MagnitudePruner(None, pattern="n:m").compress(np.ones(8))
    with pytest.raises(ValueError, match="non-empty dict"):
        MagnitudePruner(0.5, scope="global").compress_many({})


# ----------------------------------------------------------------------- low rank
@pytest.mark.parametrize("shape", [(6, 9), (9, 4), (5, 3, 2, 2)])
def test_lowrank_naive_rank_and_frobenius_identity(shape):
    w = _w(shape, seed=12)
    mat = w.reshape(shape[0], -1)
    full = min(mat.shape)
    for r in range(1, full + 1):
        c = LowRank(r).compress(w)
        u, s, vt = np.linalg.svd(mat, full_matrices=False)
        naive = np.zeros_like(mat)
        for i in range(r):
            naive += s[i] * np.outer(u[:, i], vt[i])
        np.testing.assert_allclose(c.values.reshape(mat.shape), naive, rtol=0, atol=1e-12)
        assert c.detail.rank == r
        if r < full:
            assert np.linalg.matrix_rank(c.values.reshape(mat.shape), tol=1e-9) == r
        _assert_exact_model(c, channel=True)
        # eq. C5: ||E||_F^2 = sum of the discarded sigma^2 = sum_c n_c sigma_c^2
        frob = np.sum(c.error**2)
        np.testing.assert_allclose(frob, np.sum(s[r:] ** 2), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(c.detail.discarded_energy, frob, rtol=1e-9, atol=1e-12)
        n_c = mat.shape[1]
        np.testing.assert_allclose(n_c * c.error_model.second_moment.sum(), frob, rtol=1e-12)
        again = LowRank(r).compress(c.values)  # idempotent up to rounding
        np.testing.assert_allclose(again.values, c.values, atol=1e-12)


def test_lowrank_energy_picks_the_smallest_rank():
    w = _w((8, 12), seed=13) * np.linspace(3, 0.1, 12)
    s = LowRank(1).compress(w).detail.singular_values  # the same SVD call as the code's
    np.testing.assert_allclose(s, np.linalg.svd(w, compute_uv=False), rtol=1e-12)
    cum = np.cumsum(s**2)
    frac = cum / cum[-1]  # as eq. C6 is computed: the last is exactly 1
    for eta in [0.05, 0.5, 0.9, 0.99, frac[3], 1.0]:
        c = LowRank(energy=eta).compress(w)
        r = c.detail.rank
        assert frac[r - 1] >= eta - 1e-15
        assert r == 1 or frac[r - 2] < eta
        assert c.detail.kept_energy_fraction >= eta - 1e-12
    assert LowRank(energy=1.0).compress(w).detail.rank == 8
    assert LowRank(energy=0.5).compress(np.zeros((3, 4))).detail.rank == 1


def test_lowrank_validation():
    with pytest.raises(ValueError, match="exactly one of rank and energy"):
        LowRank()
    with pytest.raises(ValueError, match="exactly one of rank and energy"):
        LowRank(2, energy=0.9)
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        LowRank(0)
    with pytest.raises(ValueError, match=r"rank must be in 1..min\(4, 6\) = 4"):
        LowRank(5).compress(_w((4, 3, 2)))
    for bad in [0.0, 1.2, -0.5, np.nan, True]:
        with pytest.raises(ValueError, match="energy"):
            LowRank(energy=bad)
    with pytest.raises(ValueError, match="at least 2 axes"):
        LowRank(1).compress(np.ones(5))


# ----------------------------------------------------------------------- k-means
def test_kmeans_lloyd_naive_bit_exact():
    w = _w((3, 20), seed=14)
    w[0, :4] = [0.0, 0.0, 1.0, 1.0]
    for scope in ["layer", "channel"]:
        c = KMeansQuantizer(4, scope=scope).compress(w)
        rows = w.reshape(1, -1) if scope == "layer" else w
        books = np.atleast_2d(c.detail.codebook)
        for g, row in enumerate(rows):
            cb, a = _naive_lloyd(row, 4)
            np.testing.assert_array_equal(books[g], cb)
            np.testing.assert_array_equal(c.detail.codes.reshape(rows.shape)[g], a)
        _assert_exact_model(c, channel=scope == "channel")
        assert np.all(np.abs(c.error_model.mean) < 1e-12)  # a fixed point: zero-mean clusters


def test_kmeans_lloyd_naive_bit_exact_on_ties_and_midpoints():
    rng = np.random.default_rng(41)
    for trial in range(60):
        n, k = int(rng.integers(4, 50)), int(rng.integers(2, 7))
        k = min(k, n)
        kind = trial % 3
        if kind == 0:
            x = rng.standard_normal(n) ** 3
        elif kind == 1:
            x = rng.integers(-3, 4, n).astype(np.float64)  # ties, values on midpoints
        else:
            x = np.round(rng.laplace(size=n), 2) * 1e-3
        if x.min() == x.max():
            continue
        cap = int(rng.integers(1, 30)) if trial % 5 == 0 else 100  # some stop at the cap
        c, a = kmeans_1d(x, k, max_iter=cap)
        cn, an = _naive_lloyd(x, k, max_iter=cap)
        np.testing.assert_array_equal(c, cn)
        np.testing.assert_array_equal(a, an)


def test_kmeanspp_naive_and_seeded():
    w = _w((2, 30), seed=15)
    c = KMeansQuantizer(5, scope="channel", init="kmeans++", seed=3).compress(w)
    for g in range(2):
        start = _naive_kmeanspp(list(w[g]), 5, np.random.SeedSequence([3, g]))
        cb, a = _naive_lloyd(w[g], 5, init=start)
        np.testing.assert_array_equal(c.detail.codebook[g], cb)
        np.testing.assert_array_equal(c.detail.codes[g], a)
    again = KMeansQuantizer(5, scope="channel", init="kmeans++", seed=3).compress(w)
    np.testing.assert_array_equal(again.values, c.values)


def test_kmeans_values_are_centroids_and_codebook_idempotence():
    w = _w((4, 25), seed=16)
    q = KMeansQuantizer(6)
    c = q.compress(w)
    book = c.detail.codebook
    assert set(np.unique(c.values)) <= set(book)
    np.testing.assert_array_equal(c.values, book[c.detail.codes])
    # re-quantizing the values with the same codebook changes nothing
    from distortion.compressors._common import nearest_level

    np.testing.assert_array_equal(book[nearest_level(c.values, book)], c.values)
    # ... and k-means started from that codebook stays there (a fixed point, up to the
    # rounding of the mean of equal values)
    cb, a = _lloyd_from(c.values.ravel(), book)
    np.testing.assert_allclose(cb[a].reshape(w.shape), c.values, rtol=0, atol=1e-15)


def _lloyd_from(x, start):
    from distortion.compressors.codebook import _lloyd

    return _lloyd(x, np.sort(start), 100)


def test_exact_kmeans_against_brute_force():
    rng = np.random.default_rng(17)
    for trial in range(12):
        n, k = int(rng.integers(3, 8)), int(rng.integers(1, 4))
        x = rng.standard_normal(n) if trial % 3 else np.round(rng.standard_normal(n), 1)
        best = math.inf
        for lab in itertools.product(range(k), repeat=n):
            lab = np.array(lab)
            sse = sum(((x[lab == j] - x[lab == j].mean()) ** 2).sum() for j in set(lab))
            best = min(best, sse)
        cb, a = kmeans_1d(x, k, algorithm="exact")
        assert np.sum((cb[a] - x) ** 2) == pytest.approx(best, rel=1e-9, abs=1e-12)
        cl, al = kmeans_1d(x, k)
        assert np.sum((cl[al] - x) ** 2) >= best - 1e-12
    # larger: exact is never worse than Lloyd, and matches the O(k n^2) DP
    x = rng.standard_normal(300)
    cb, a = kmeans_1d(x, 7, algorithm="exact")
    cl, al = kmeans_1d(x, 7)
    assert np.sum((cb[a] - x) ** 2) <= np.sum((cl[al] - x) ** 2) + 1e-12
    assert np.sum((cb[a] - x) ** 2) == pytest.approx(_quadratic_dp(x, 7), rel=1e-10)
    c = KMeansQuantizer(7, algorithm="exact").compress(x[None, :])
    _assert_exact_model(c, channel=False)


def _quadratic_dp(x, k):
    """Naive O(k n^2) dynamic programme of eq. C8 (the optimal SSE)."""
    xs = np.sort(x)
    n = xs.size

    def sse(t, i):
        seg = xs[t : i + 1]
        return float(np.sum((seg - seg.mean()) ** 2))

    d = [sse(0, i) for i in range(n)]
    for j in range(2, k + 1):
        d = [
            min(d[t - 1] + sse(t, i) for t in range(j - 1, i + 1)) if i >= j - 1 else math.inf
            for i in range(n)
        ]
    return d[n - 1]


def _gapped_rows(rng, g, n):
    """Rows of every kind the batched Lloyd must follow: smooth, heavy-tailed, float32
    values, ties on midpoints, and outliers that leave linear-start clusters empty."""
    rows = []
    for i in range(g):
        kind = i % 5
        if kind == 0:
            r = rng.standard_normal(n)
        elif kind == 1:
            r = rng.standard_normal(n) ** 3
        elif kind == 2:
            r = (rng.standard_normal(n) * 0.03).astype(np.float32).astype(np.float64)
        elif kind == 3:
            r = rng.integers(-3, 4, n).astype(np.float64)
        else:
            r = np.concatenate([rng.uniform(-1, 1, n - 2), [9.0, 10.0]])  # empty clusters
        rows.append(rng.permutation(r))
    return np.stack(rows)


@pytest.mark.parametrize(("k", "cap"), [(2, 100), (5, 100), (16, 100), (16, 7), (48, 100)])
def test_kmeans_batched_lloyd_is_the_plain_loop(monkeypatch, k, cap):
    """All groups at once (prefix-sum steps, exact means at the end) equal the O(n)-a-step
    loop group by group, itself checked against the naive loop above; most groups take the
    fast path (the plain loop is counted)."""
    from distortion.compressors import codebook as cb

    rng = np.random.default_rng(50 + k + cap)
    w = _gapped_rows(rng, 20, 600)
    exact = cb._lloyd_exact
    handed = []
    monkeypatch.setattr(cb, "_lloyd_exact", lambda *a: handed.append(1) or exact(*a))
    c = KMeansQuantizer(k, scope="channel", max_iter=cap).compress(w)
    for g, row in enumerate(w):
        cb_ref, a_ref = exact(row, np.linspace(row.min(), row.max(), k), cap)
        np.testing.assert_array_equal(c.detail.codebook[g], cb_ref)
        np.testing.assert_array_equal(c.detail.codes[g], a_ref)
    assert len(handed) <= 8  # integer rows may sit on midpoints: those go to the plain loop
    if k <= 16:  # the naive loop itself, on a few groups
        for g in (0, 2, 4):
            cn, an = _naive_lloyd(w[g], k, max_iter=cap)
            np.testing.assert_array_equal(c.detail.codebook[g], cn)
            np.testing.assert_array_equal(c.detail.codes[g], an)


def test_kmeans_compress_many_is_compress_layer_by_layer():
    rng = np.random.default_rng(61)
    weights = {
        "a": rng.standard_normal((4, 3, 3, 3)),
        "b": np.concatenate([rng.standard_normal(50), [7.0, 8.0]]).reshape(4, 13),
        "c": np.full((3, 5), 0.25),  # one value
    }
    for scope, init in itertools.product(["layer", "channel"], ["linear", "kmeans++"]):
        q = KMeansQuantizer(4, scope=scope, init=init, seed=3)
        many = q.compress_many(weights)
        assert list(many) == list(weights)
        for name, w in weights.items():
            one = q.compress(w)
            np.testing.assert_array_equal(many[name].values, one.values)
            np.testing.assert_array_equal(many[name].detail.codes, one.detail.codes)
            np.testing.assert_array_equal(many[name].detail.codebook, one.detail.codebook)
    with pytest.raises(ValueError, match="non-empty dict"):
        KMeansQuantizer(4).compress_many({})


@pytest.mark.parametrize("bits", [2, 4, 5])
def test_power_exponent_search_many_rows_at_once(bits):
    """The search over all rows together (shared thresholds, per-row histograms) is the
    exhaustive search row by row, zero rows and rows on thresholds included."""
    rng = np.random.default_rng(200 + bits)
    rows = np.stack([
        rng.standard_normal(40) ** 3,
        rng.laplace(size=40) * 1e-3,
        np.round(rng.standard_normal(40), 1),
        np.zeros(40),
        np.resize([1.0, 1 / 6, 0.5, 5 / 6, -0.5, 0.25, 1 / 14, 3 / 14], 40),
        (rng.standard_normal(40) * 0.05).astype(np.float32).astype(np.float64),
    ])  # fmt: skip
    got = NonUniformQuantizer(bits, granularity="channel").exponents(rows)
    np.testing.assert_array_equal(got, _exhaustive_exponents(list(rows), bits))


def test_search_left_is_searchsorted():
    from distortion.compressors._common import _search_left

    rng = np.random.default_rng(71)
    grids = [log2_levels(4), nf4_levels(), log2_levels(16), np.sort(rng.standard_normal(16)),
             np.array([0.0, 0.0, 1.0]), np.array([-1.0, 1e-300, 1.0])]  # fmt: skip
    for levels in grids:
        mids = (levels[:-1] + levels[1:]) / 2
        xs = [
            np.clip(rng.standard_normal(40_000) * 0.3, -1, 1),
            rng.uniform(-2, 2, 20_000),
            np.tile(np.concatenate([levels, mids, np.nextafter(mids, np.inf)]), 2000),
            np.concatenate([np.full(9000, np.nan), np.full(9000, np.inf), -np.full(9000, np.inf)]),
        ]
        for x in xs:
            np.testing.assert_array_equal(_search_left(levels, x),
                                          np.searchsorted(levels, x, side="left"))  # fmt: skip


def test_lowrank_decomposition_is_remembered_read_only():
    from distortion.compressors import lowrank

    w = _w((6, 4, 3, 3), seed=72)
    lowrank._svd_cache.clear()
    a = LowRank(3).compress(w)
    assert len(lowrank._svd_cache) == 1
    b = LowRank(energy=0.7).compress(w)  # another configuration: the same factors
    assert len(lowrank._svd_cache) == 1
    u, s, vt = lowrank._thin_svd(w.reshape(6, -1))
    np.testing.assert_array_equal(a.detail.singular_values, s)
    np.testing.assert_array_equal(a.values, ((u[:, :3] * s[:3]) @ vt[:3]).reshape(w.shape))
    np.testing.assert_array_equal(b.detail.singular_values, s)
    cached = next(iter(lowrank._svd_cache.values()))
    assert not any(f.flags.writeable for f in cached)
    a.detail.right[0, 0] = 123.0  # the result's factors are its own
    a.detail.singular_values[0] = 123.0
    assert cached[2][0, 0] != 123.0 and cached[1][0] != 123.0
    LowRank(3).compress(w + 1e-3)  # other weights: another entry
    assert len(lowrank._svd_cache) == 2


def test_lowrank_on_one_blas_thread_or_many_is_the_same(monkeypatch):
    from distortion.compressors import lowrank

    for w in [_w((8, 30), 73), _w((5, 4, 3, 3), 74)]:
        lowrank._svd_cache.clear()
        small = LowRank(energy=0.9).compress(w)  # one BLAS thread
        lowrank._svd_cache.clear()
        monkeypatch.setattr(lowrank, "SMALL_MATRIX", 0)  # the threads BLAS has
        many = LowRank(energy=0.9).compress(w)
        monkeypatch.undo()
        np.testing.assert_allclose(small.values, many.values, rtol=1e-12, atol=1e-14)
        assert small.detail.rank == many.detail.rank


def test_kmeans_degenerate_and_validation():
    c = KMeansQuantizer(3).compress(np.full((2, 3), 0.7))
    np.testing.assert_array_equal(c.values, np.full((2, 3), 0.7))
    with pytest.raises(ValueError, match="n_clusters must be at most the 6 entries"):
        KMeansQuantizer(7).compress(_w((2, 3)))
    with pytest.raises(ValueError, match="at most the 3 entries of each channel"):
        KMeansQuantizer(4, scope="channel").compress(_w((2, 3)))
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        KMeansQuantizer(0)
    with pytest.raises(ValueError, match="init must be one of"):
        KMeansQuantizer(4, init="random")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        KMeansQuantizer(4, algorithm="elkan")
    with pytest.raises(ValueError, match="scope must be one of"):
        KMeansQuantizer(4, scope="global")


# ----------------------------------------------------------------------- non-uniform grids
def test_nf4_levels_match_the_published_table():
    lv = nf4_levels()
    assert lv.shape == (16,)
    np.testing.assert_allclose(lv, NF4_TABLE, atol=1e-4)
    np.testing.assert_allclose(lv, NF4_TABLE, atol=3e-7)  # the table is float32
    assert lv[0] == -1.0 and lv[-1] == 1.0 and 0.0 in lv and np.all(np.diff(lv) > 0)


def test_log2_levels():
    for b in [2, 3, 5]:
        lv = log2_levels(b)
        assert lv.size == 2**b - 1 and 0.0 in lv and lv[-1] == 1.0
        pos = lv[lv > 0]
        np.testing.assert_array_equal(np.sort(pos), 2.0 ** -np.arange(2 ** (b - 1) - 1)[::-1])


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize(("grid", "bits"), [("log2", 3), ("log2", 5), ("nf4", 4)])
def test_fixed_grids_naive_bit_exact_and_idempotent(grid, bits, granularity):
    w = _w((3, 16), seed=18)
    w[1, :2] = 0.0
    q = NonUniformQuantizer(bits, grid=grid, granularity=granularity)
    c = q.compress(w)
    levels = log2_levels(bits) if grid == "log2" else nf4_levels()
    rows = w.reshape(1, -1) if granularity == "tensor" else w
    naive = np.stack([_naive_grid(r, levels) for r in rows]).reshape(w.shape)
    np.testing.assert_array_equal(c.values, naive)
    assert np.all(c.values[1, :2] == 0)
    _assert_exact_model(c, channel=granularity == "channel")
    np.testing.assert_array_equal(q.compress(c.values).values, c.values)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize(("bits", "a"), [(3, 0.5), (4, 0.75), (6, 1.0), (2, 0.3)])
def test_power_companding_naive_and_idempotent(bits, a, granularity):
    w = _w((3, 16), seed=19)
    q = NonUniformQuantizer(bits, exponent=a, granularity=granularity)
    c = q.compress(w)
    rows = w.reshape(1, -1) if granularity == "tensor" else w
    naive = np.stack([_naive_power(r, bits, a) for r in rows]).reshape(w.shape)
    # numpy's vectorized pow may differ from libm's scalar pow in the last ulp
    np.testing.assert_allclose(c.values, naive, rtol=4e-16, atol=0)
    assert np.max(np.abs(c.values)) == np.max(np.abs(w))  # the outer level is m exactly
    for r in c.values.reshape(rows.shape):
        assert np.unique(r).size <= 2**bits - 1
    _assert_exact_model(c, channel=granularity == "channel")
    np.testing.assert_array_equal(q.compress(c.values).values, c.values)


def test_power_exponent_one_is_uniform_symmetric():
    w = _w((4, 30), seed=20)
    c = NonUniformQuantizer(4, exponent=1.0, granularity="channel").compress(w)
    u = UniformQuantizer(4, granularity="channel").quantize(w)
    np.testing.assert_allclose(c.values, u.values, rtol=0, atol=1e-15)


def test_power_exponent_search_minimizes_the_squared_error():
    w = _w((3, 40), seed=21) ** 3  # heavy tails: a < 1 pays
    q = NonUniformQuantizer(3, granularity="channel")
    a = q.exponents(w)
    c = q.compress(w)
    np.testing.assert_array_equal(c.detail.exponent, a)
    sse = {
        float(e): np.sum(
            NonUniformQuantizer(3, exponent=float(e), granularity="channel").compress(w).error ** 2,
            axis=1,
        )
        for e in POWER_EXPONENTS
    }
    table = np.stack(list(sse.values()))  # (candidates, C)
    best = np.argmin(table, axis=0)  # first minimum: the largest exponent
    np.testing.assert_array_equal(a, POWER_EXPONENTS[best])
    assert np.all(a < 1.0)
    np.testing.assert_array_equal(
        NonUniformQuantizer(3, exponent=None, granularity="channel").compress(c.values).values,
        NonUniformQuantizer(3, granularity="channel").compress(c.values).values,
    )
    fixed = [NonUniformQuantizer(3, exponent=float(ai)).compress(w[i : i + 1]) for i, ai in
             enumerate(a)]  # fmt: skip
    for i, f in enumerate(fixed):
        np.testing.assert_array_equal(f.values[0], c.values[i])
        np.testing.assert_array_equal(
            NonUniformQuantizer(3, exponent=float(a[i])).compress(f.values).values, f.values
        )


def _exhaustive_exponents(rows, bits):
    """Eq. C10 by brute force: quantize with every candidate, keep the first minimum."""
    out = []
    for r in rows:
        sse = [
            np.sum((NonUniformQuantizer(bits, exponent=float(e)).compress(r).values - r) ** 2)
            for e in POWER_EXPONENTS
        ]
        out.append(POWER_EXPONENTS[int(np.argmin(sse))])
    return np.array(out)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_power_exponent_search_is_the_exhaustive_search(bits):
    rng = np.random.default_rng(100 + bits)
    rows = [
        rng.standard_normal(50) ** 3,  # heavy tails
        rng.standard_normal(17),
        rng.laplace(size=64) * 1e-3,
        np.round(rng.standard_normal(40), 1),  # many ties
        np.array([1.0, 1 / 6, 0.5, 5 / 6, -0.5, 0.25, 1 / 14, 3 / 14]),  # on a=1 thresholds
        np.array([2.0, -2.0, 2.0]),  # every exponent exact: the largest
        np.zeros(5),
    ]
    for r in rows:
        got = NonUniformQuantizer(bits, granularity="channel").exponents(r[None, :])
        np.testing.assert_array_equal(got, _exhaustive_exponents([r], bits))


def test_power_high_resolution_second_moment_approaches_the_exact_one():
    # dense, deterministic Gaussian weights (quantiles), so the exact mean square has no
    # sampling noise; eq. C11 vs eq. C1
    n = 100_000
    w = np.random.default_rng(22).permutation(norm.ppf((np.arange(n) + 0.5) / n))
    for a in [0.5, 0.75]:
        dev = []
        for b in [2, 3, 4, 6, 8]:
            q = NonUniformQuantizer(b, exponent=a)
            dev.append(abs(q.high_resolution_second_moment(w) / q.compress(w).second_moment - 1))
        assert dev[-1] < 2e-3 and dev[-2] < 2e-3
        assert dev[0] > 5 * dev[-1]
    # at a = 1 it is E1 with the uniform step
    q = NonUniformQuantizer(6, exponent=1.0)
    assert q.high_resolution_second_moment(w) == pytest.approx(
        uniform_error_variance(np.max(np.abs(w)) / 31)
    )


def test_nonuniform_validation():
    with pytest.raises(ValueError, match="bits must be 4"):
        NonUniformQuantizer(3, grid="nf4")
    with pytest.raises(ValueError, match="bits must be in 2..16"):
        NonUniformQuantizer(1)
    with pytest.raises(ValueError, match="exponent must be in"):
        NonUniformQuantizer(4, exponent=1.5)
    with pytest.raises(ValueError, match="exponent must be in"):
        NonUniformQuantizer(4, exponent=0.0)
    with pytest.raises(ValueError, match="grid='power' only"):
        NonUniformQuantizer(4, grid="log2", exponent=0.5)
    with pytest.raises(ValueError, match="grid must be one of"):
        NonUniformQuantizer(4, grid="fp4")
    with pytest.raises(ValueError, match="grid='power'"):
        NonUniformQuantizer(4, grid="nf4").high_resolution_second_moment(_w((2, 3)))
    c = NonUniformQuantizer(4, grid="nf4").compress(np.zeros((2, 3)))
    np.testing.assert_array_equal(c.values, 0.0)


# ----------------------------------------------------------------------- residual expansion
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize(("bits", "order"), [(2, 1), (2, 3), (4, 2), (3, 4)])
def test_rex_naive_bit_exact(bits, order, granularity):
    w = _w((3, 10), seed=23)
    w[2] = 0.4  # a constant channel
    c = ResidualExpansion(bits, order, granularity=granularity).compress(w)
    naive = _naive_rex(w, bits, order, granularity == "channel")
    np.testing.assert_array_equal(c.values, naive)
    assert c.error_model.random is True and c.error_model.granularity == granularity
    np.testing.assert_array_equal(
        c.error_model.second_moment, uniform_error_variance(c.detail.terms[-1].step)
    )
    steps = c.detail.steps
    L = 2 ** (bits - 1) - 1
    assert np.all(steps[1:] <= steps[:-1] / (2 * L) * (1 + 1e-12))  # eq. C15


def test_rex_order_one_is_uniform_and_error_falls_with_order():
    w = _w((4, 50), seed=24)
    u = UniformQuantizer(3, granularity="channel").compress(w)
    r1 = ResidualExpansion(3, 1, granularity="channel").compress(w)
    np.testing.assert_array_equal(r1.values, u.values)
    np.testing.assert_array_equal(r1.second_moment, u.second_moment)
    ms = [np.mean(ResidualExpansion(3, k).compress(w).error ** 2) for k in range(1, 5)]
    assert all(b < a / 16 for a, b in zip(ms, ms[1:], strict=False))


def test_rex_validation():
    with pytest.raises(ValueError, match="order must be >= 1"):
        ResidualExpansion(4, 0)
    with pytest.raises(ValueError, match="bits must be in 1..16"):
        ResidualExpansion(0, 2)
    with pytest.raises(ValueError, match="granularity must be one of"):
        ResidualExpansion(4, 2, granularity="group")


# ----------------------------------------------------------------------- composition
def test_compose_prune_then_quantize_naive_and_zeros_stay_zero():
    w = _w((4, 12), seed=25)
    c = Compose(MagnitudePruner(0.5), UniformQuantizer(4, granularity="channel")).compress(w)
    pruned = _naive_unstructured(w, 0.5)
    naive = UniformQuantizer(4, granularity="channel").quantize(pruned).values
    naive = np.where(pruned == 0, 0.0, naive)
    np.testing.assert_array_equal(c.values, naive)
    np.testing.assert_array_equal(c.detail.pruned, pruned == 0)
    np.testing.assert_allclose(c.error, sum(c.detail.errors), atol=1e-15)
    # a codebook without 0 and an asymmetric grid cannot revive pruned entries
    for q in [KMeansQuantizer(3), UniformQuantizer(3, scheme="asymmetric")]:
        shifted = _naive_unstructured(w + 5.0, 0.5)
        cc = Compose(MagnitudePruner(0.5), q).compress(w + 5.0)
        assert np.all(cc.values[shifted == 0] == 0)
        assert np.count_nonzero(cc.values == 0) == np.count_nonzero(shifted == 0)
    # several pruning stages: the mask accumulates
    c2 = Compose(MagnitudePruner(0.25), MagnitudePruner(0.5), NonUniformQuantizer(3)).compress(w)
    assert np.count_nonzero(c2.values == 0) >= 24 and np.all(c2.values[c2.detail.pruned] == 0)


def test_compose_deterministic_model_is_exact():
    w = _w((4, 12), seed=26)
    c = Compose(MagnitudePruner(None, pattern="n:m"), KMeansQuantizer(4)).compress(w)
    _assert_exact_model(c, channel=True)


def test_compose_random_model_eq_c17_matches_monte_carlo():
    # prune 50 %, then subtractive dither: E[mean e^2] = (pruned part) + share * Delta^2/12
    w = _w((3, 40), seed=27)
    comp = Compose(MagnitudePruner(0.5), UniformQuantizer(3, rounding="dither"))
    c = comp.compress(w, seed=0)
    assert c.error_model.random is True and c.error_model.granularity == "channel"
    pruned = c.detail.pruned
    share = 1.0 - pruned.mean(axis=1)
    step = c.detail.stages[1].detail.step
    expect = np.mean(w**2 * pruned, axis=1) + share * uniform_error_variance(step)
    np.testing.assert_allclose(c.error_model.second_moment, expect, rtol=1e-12)
    draws = np.stack([np.mean(comp.compress(w, seed=s).error ** 2, axis=1) for s in range(400)])
    mc, se = draws.mean(axis=0), draws.std(axis=0, ddof=1) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(c.error_model.second_moment - mc) < 4 * se)
    again = comp.compress(w, seed=0)
    np.testing.assert_array_equal(again.values, c.values)  # seeded


def test_compose_validation():
    with pytest.raises(ValueError, match="at least one compressor"):
        Compose()
    with pytest.raises(ValueError, match="compressor 1 has no compress method"):
        Compose(MagnitudePruner(0.5), "quantize")
