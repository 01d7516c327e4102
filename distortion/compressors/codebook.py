r"""Codebook quantizers: k-means weight sharing and fixed non-uniform grids.

Each maps every weight to one level of a small codebook (per tensor or per output channel):

* :class:`KMeansQuantizer` — 1-D k-means (Deep Compression's weight sharing): Lloyd
  iterations from a deterministic or seeded start, or the exact optimum by dynamic
  programming (theory/compression.md, eqs. C7–C8);
* :class:`NonUniformQuantizer` — power companding (PowerQuant), powers of two, and the
  NormalFloat-4 levels of QLoRA (eqs. C9–C13).

The codebook is a deterministic function of the weights, so the error model is the actual
mean square and mean of the rounding per tensor or channel (exact, ``random=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from distortion.compressors._common import (
    check_choice,
    check_int,
    exact_error_model,
    finish,
    group_rows,
    nearest_level,
    prepare,
)
from distortion.theory.error_models import uniform_error_variance

__all__ = [
    "NF4_TABLE",
    "POWER_EXPONENTS",
    "CodebookTensor",
    "KMeansQuantizer",
    "NonUniformQuantizer",
    "kmeans_1d",
    "log2_levels",
    "nf4_levels",
]

_GRANULARITIES = ("tensor", "channel")
#: Candidate exponents of the power-companding search, largest first (ties keep the largest).
POWER_EXPONENTS = np.linspace(1.0, 0.01, 100)
#: NF4 levels as published (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes'
#: ``create_normal_map``), float32 — :func:`nf4_levels` recomputes them in float64.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


@dataclass(frozen=True)
class CodebookTensor:
    """Codes and codebook of a codebook-quantized tensor.

    Attributes
    ----------
    codes : ndarray of int64, shape of w
        Index of each entry's level in its group's codebook.
    codebook : ndarray of shape (Q,) or (C, Q)
        The levels in weight units, ascending, per tensor or per output channel; the values
        are ``codebook[codes]`` (row ``c`` for channel ``c``).
    exponent : ndarray of shape () or (C,), or None
        The power-companding exponent (``grid="power"`` only).
    """

    codes: np.ndarray = field(repr=False)  # shape of w
    codebook: np.ndarray  # (Q,) or (C, Q)
    exponent: np.ndarray | None = None  # () or (C,)


# ---------------------------------------------------------------------- k-means
def kmeans_1d(
    x: Any,
    n_clusters: int,
    *,
    algorithm: Literal["lloyd", "exact"] = "lloyd",
    init: Literal["linear", "kmeans++"] = "linear",
    seed: Any = 0,
    max_iter: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    r"""1-D k-means of the entries of ``x``.

    Parameters
    ----------
    x : array_like of real numbers (flattened), at least ``n_clusters`` entries
    n_clusters : int
    algorithm : {"lloyd", "exact"}
        Lloyd iterations (eq. C7) or the exact optimum by dynamic programming (eq. C8).
    init, max_iter
        Lloyd's start and iteration cap (see :class:`KMeansQuantizer`).
    seed : int, SeedSequence or Generator
        Seed of the k-means++ start (``numpy.random.default_rng(seed)``).

    Returns
    -------
    centroids : ndarray of shape (n_clusters,), ascending
    codes : ndarray of int64, shape of ``x`` flattened
    """
    check_choice("algorithm", algorithm, ("lloyd", "exact"))
    check_choice("init", init, ("linear", "kmeans++"))
    check_int("max_iter", max_iter, 1)
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"x must hold finite real numbers, got {x.size} entries, some non-finite")
    k = check_int("n_clusters", n_clusters, 1)
    if k > x.size:
        raise ValueError(f"n_clusters must be at most the {x.size} entries, got {n_clusters!r}")
    if x.min() == x.max():
        return np.full(k, x[0]), np.zeros(x.size, dtype=np.int64)
    if algorithm == "exact":
        return _exact_kmeans(x, k)
    rng = np.random.default_rng(seed)
    c = np.linspace(x.min(), x.max(), k) if init == "linear" else _kmeanspp(x, k, rng)
    return _lloyd(x, np.sort(c), max_iter)


def _lloyd(x: np.ndarray, c: np.ndarray, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations of one group: :func:`_lloyd_rows` on one row."""
    books, codes = _lloyd_rows([x.reshape(1, -1)], [np.asarray(c, dtype=np.float64)[None]],
                               max_iter)  # fmt: skip
    return books[0][0], codes[0][0]


def _lloyd_exact(x: np.ndarray, c: np.ndarray, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations with the cluster sums of every step in the input's order (eq. C7).

    Assign each value to its nearest centroid (:func:`nearest_level`, found on the sorted
    values: the codes are non-decreasing in the value, so a cluster is a run of the sorted
    values between two midpoints, O(k log n), the few values within rounding error of a
    midpoint assigned by :func:`nearest_level` itself), move each centroid to its cluster's
    mean, the sums accumulated in the input's order (``bincount``) as the plain loop does,
    sort, repeat: bit for bit the plain loop, at O(n) a step.
    """
    k = c.size
    order = np.argsort(x)
    xs = x[order]
    for _ in range(max_iter):
        a, counts = _sorted_assignment(x, xs, order, c)
        sums = np.bincount(a, weights=x, minlength=k)
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), c))  # empty: stays
        if np.array_equal(new, c):
            break
        c = new
    return c, _sorted_assignment(x, xs, order, c)[0]


def _lloyd_rows(
    blocks: list[np.ndarray], starts: list[np.ndarray], max_iter: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    r"""Lloyd iterations (eq. C7) of every row of every block at once, bit for bit
    :func:`_lloyd_exact` row by row.

    ``blocks[b]`` is (G_b, n_b), one group per row, at least two distinct values each;
    ``starts[b]`` (G_b, k) the sorted starting centroids, the same k for all. Returns the
    centroids (G_b, k) and codes (G_b, n_b) per block.

    The steps between the start and the fixed point only matter through the assignments
    they produce, so they are taken at O(k log n) each: a cluster is a run of the sorted
    values, its sum a difference of prefix sums of the centred sorted values (all groups'
    midpoints located at once by :class:`_GroupIndex`). Those centroids differ from the
    plain loop's, whose sums run in the input's order, by rounding only; each step bounds
    that difference (``delta``, eq. C7a: the prefix sums' and the plain sums' rounding
    bounds, :math:`\gamma_n = nu/(1-nu)`, with a factor 2), and a group with a
    value within that bound (plus the nearest rule's own rounding window) of a midpoint is
    handed to :func:`_lloyd_exact`. Elsewhere every assignment is the plain loop's, and the
    returned centroids are the exact means, sums in the input's order, of the last
    assignment — or, for a cluster left empty, of the run it last held (its start when it
    never held one): the plain loop's result. One O(n) pass at the end, instead of one a
    step.
    """
    k = starts[0].shape[1]
    sizes = [b.shape[0] for b in blocks]
    out_books = [s.copy() for s in starts]
    out_codes = [np.zeros(b.shape, dtype=np.int64) for b in blocks]
    if k == 1:
        for bi, (blk, st) in enumerate(zip(blocks, starts, strict=True)):
            for r in range(blk.shape[0]):
                out_books[bi][r], out_codes[bi][r] = _lloyd_exact(blk[r], st[r], max_iter)
        return out_books, out_codes
    eps = np.finfo(np.float64).eps
    unit = eps / 2

    def gamma(m):
        return m * unit / (1.0 - m * unit)

    n = np.concatenate([np.full(b.shape[0], b.shape[1], dtype=np.int64) for b in blocks])
    G = n.size
    off = np.concatenate([[0], np.cumsum(n)[:-1]])  # start of each group in the sorted values
    off_p = off + np.arange(G)  # ... and in the prefix sums (n + 1 entries a group)
    xsort = np.empty(int(n.sum()))
    psum, pabs = np.zeros(xsort.size + G), np.zeros(xsort.size + G)
    orders, mus = [], []
    for bi, blk in enumerate(blocks):
        g0, (gb, nb) = sum(sizes[:bi]), blk.shape
        order = np.argsort(blk, axis=1)
        xs = np.take_along_axis(blk, order, axis=1)
        mu = np.mean(blk, axis=1)
        z = xs - mu[:, None]
        a0, p0 = int(off[g0]), int(off_p[g0])
        xsort[a0 : a0 + gb * nb] = xs.ravel()
        p = psum[p0 : p0 + gb * (nb + 1)].reshape(gb, nb + 1)
        np.cumsum(z, axis=1, out=p[:, 1:])
        p = pabs[p0 : p0 + gb * (nb + 1)].reshape(gb, nb + 1)
        np.cumsum(np.abs(z, out=z), axis=1, out=p[:, 1:])
        orders.append(order)
        mus.append(mu)
    mu = np.concatenate(mus)
    index = _GroupIndex(xsort, n, off)
    c = np.concatenate(starts).astype(np.float64)
    delta = np.zeros((G, k))  # bound on |c - the plain loop's c| (the start: identical)
    run_lo = np.full((G, k), -1, dtype=np.int64)  # the run each centroid last came from
    run_hi = np.full((G, k), -1, dtype=np.int64)  # (-1: still its start value)
    start = c.copy()  # the start value of each centroid, carried through the sorts
    keep = np.zeros((3, G, k))  # run_lo, run_hi, start as the means' assignment indexes them
    status = np.zeros(G, dtype=np.int8)  # 0 running, 1 done, 2 handed to the exact loop
    prev = np.full((G, k - 1), -1, dtype=np.int64)
    edges_means = np.zeros((G, k - 1), dtype=np.int64)  # the assignment the means come from
    edges_codes = np.zeros((G, k - 1), dtype=np.int64)  # the assignment returned
    for it in range(max_iter + 1):
        run = np.flatnonzero(status == 0)
        if run.size == 0:
            break
        cr, dr = c[run], delta[run]
        lo_c, hi_c = cr[:, :-1], cr[:, 1:]
        mids = 0.5 * (lo_c + hi_c)
        width = 2.0 * (8.0 * eps * (np.abs(lo_c) + np.abs(hi_c))
                       + np.maximum(dr[:, :-1], dr[:, 1:])) + 1e-300  # fmt: skip
        lo = index.count_below(run, mids - width)
        # a value within the window: the first one at or above its lower end is not above it
        first = xsort[off[run, None] + np.minimum(lo, n[run, None] - 1)]
        near = np.any((lo < n[run, None]) & (first <= mids + width), axis=1)
        status[run[near]] = 2
        edges = lo
        same = ~near & np.all(edges == prev[run], axis=1)
        cap = ~near & ~same & (it == max_iter)
        done = run[same]
        edges_means[done] = edges[same]
        edges_codes[done] = edges[same]
        keep[:, done] = run_lo[done], run_hi[done], start[done]
        edges_codes[run[cap]] = edges[cap]  # the means stay those of the step before
        status[run[same | cap]] = 1
        go = ~near & ~same & ~cap
        rg, eg = run[go], edges[go]
        if rg.size == 0:
            continue
        e = np.concatenate([np.zeros((rg.size, 1), dtype=np.int64), eg, n[rg, None]], axis=1)
        counts = np.diff(e, axis=1)
        held = counts > 0
        cnt = np.maximum(counts, 1)
        base = off_p[rg, None]
        sums = psum[base + e[:, 1:]] - psum[base + e[:, :-1]]
        abs_sums = pabs[base + e[:, 1:]] - pabs[base + e[:, :-1]]
        new = np.where(held, mu[rg, None] + sums / cnt, c[rg])  # empty: stays
        bound = (
            gamma(n[rg, None] + 2.0) * (pabs[base + e[:, 1:]] + pabs[base + e[:, :-1]])
            + gamma(cnt + 2.0) * (abs_sums + cnt * np.abs(mu[rg, None]))
        ) / cnt
        d = np.where(held, 2.0 * (bound + 4.0 * unit * np.abs(new)), delta[rg])
        keep[:, rg] = run_lo[rg], run_hi[rg], start[rg]  # the cap: before this step
        r_lo = np.where(held, e[:, :-1], run_lo[rg])
        r_hi = np.where(held, e[:, 1:], run_hi[rg])
        perm = np.argsort(new, axis=1, kind="stable")  # the plain loop sorts (stable)
        c[rg] = np.take_along_axis(new, perm, axis=1)
        delta[rg] = np.take_along_axis(d, perm, axis=1)
        run_lo[rg] = np.take_along_axis(r_lo, perm, axis=1)
        run_hi[rg] = np.take_along_axis(r_hi, perm, axis=1)
        start[rg] = np.take_along_axis(start[rg], perm, axis=1)
        prev[rg] = eg
        edges_means[rg] = eg  # the cap: the means of this step's assignment
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for bi, blk in enumerate(blocks):
        g0, g1 = bounds[bi], bounds[bi + 1]
        ok = status[g0:g1] == 1
        nb = blk.shape[1]
        for r in np.flatnonzero(~ok):  # near a midpoint or an empty cluster: the plain loop
            out_books[bi][r], out_codes[bi][r] = _lloyd_exact(blk[r], starts[bi][r], max_iter)
        rows = np.flatnonzero(ok)
        if rows.size == 0:
            continue
        sub = blk[rows]
        codes_m = _codes_from_edges(edges_means[g0:g1][rows], orders[bi][rows], nb, k)
        flat = (np.arange(rows.size)[:, None] * k + codes_m).ravel()
        sums = np.bincount(flat, weights=sub.ravel(), minlength=rows.size * k)
        counts = np.bincount(flat, minlength=rows.size * k)
        book = (sums / np.maximum(counts, 1)).reshape(rows.size, k)
        for i, j in zip(*np.nonzero(counts.reshape(rows.size, k) == 0), strict=True):
            g = g0 + rows[i]  # empty: the value it kept, exact
            lo_j, hi_j = int(keep[0, g, j]), int(keep[1, g, j])
            if lo_j < 0:
                book[i, j] = keep[2, g, j]
            else:
                idx = np.sort(orders[bi][rows[i], lo_j:hi_j])
                book[i, j] = np.cumsum(blk[rows[i], idx])[-1] / idx.size  # input order
        out_books[bi][rows] = np.sort(book, axis=1)
        same = np.all(edges_codes[g0:g1][rows] == edges_means[g0:g1][rows], axis=1)
        codes = codes_m
        if not np.all(same):
            codes = codes_m.copy()
            codes[~same] = _codes_from_edges(
                edges_codes[g0:g1][rows][~same], orders[bi][rows][~same], nb, k
            )
        out_codes[bi][rows] = codes
    return out_books, out_codes


class _GroupIndex:
    """How many of a group's sorted values lie below given points, for many groups at once.

    One ``searchsorted`` over every ``block``-th value of every group, as (group, value)
    keys (complex numbers sort by real part, then imaginary part) small enough to stay in
    cache, brackets each answer within ``block`` positions; counting the values of that
    bracket (each group padded with ``block`` times +inf) gives it exactly.
    """

    def __init__(self, xsort: np.ndarray, n: np.ndarray, off: np.ndarray, block: int = 16):
        G = n.size
        m = -(-n // block)  # samples a group: positions 0, block, 2 block, ...
        self._coff = np.concatenate([[0], np.cumsum(m)[:-1]])
        gid = np.repeat(np.arange(G), m)
        pos = (np.arange(int(m.sum())) - self._coff[gid]) * block
        self._keys = np.empty(pos.size, dtype=np.complex128)
        self._keys.real = gid
        self._keys.imag = xsort[off[gid] + pos]
        self._off = off + np.arange(G) * block  # group starts in the padded values
        self._x = np.full(xsort.size + G * block, np.inf)
        self._x[np.repeat(self._off - off, n) + np.arange(xsort.size)] = xsort
        self._b = block
        self._d = np.arange(1, block)

    def count_below(self, groups: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(G', q) counts of values ``< t[i, j]`` in group ``groups[i]``."""
        q = groups[:, None] + 1j * t
        j = np.searchsorted(self._keys, q.ravel(), side="left").reshape(t.shape)
        j -= self._coff[groups][:, None]  # samples below t: the answer is in ((j-1)B, jB]
        first = np.maximum(j - 1, 0) * self._b  # the last sample below t (j >= 1)
        vals = self._x[(self._off[groups][:, None] + first)[:, :, None] + self._d]
        inside = np.count_nonzero(vals < t[:, :, None], axis=2)
        return np.where(j > 0, first + 1 + inside, 0)


def _codes_from_edges(edges: np.ndarray, order: np.ndarray, n: int, k: int) -> np.ndarray:
    """Codes in the input's order from the cluster edges in the sorted order, (G, n)."""
    g = edges.shape[0]
    e = np.concatenate([np.zeros((g, 1), dtype=np.int64), edges, np.full((g, 1), n)], axis=1)
    sorted_codes = np.repeat(np.tile(np.arange(k), g), np.diff(e, axis=1).ravel())
    codes = np.empty(order.shape, dtype=np.int64)
    np.put_along_axis(codes, order, sorted_codes.reshape(g, n), axis=1)
    return codes


def _sorted_assignment(
    x: np.ndarray, xs: np.ndarray, order: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``nearest_level(x, c)`` and the cluster sizes, from ``xs = x[order]`` sorted."""
    n, k = xs.size, c.size
    if k == 1:
        return np.zeros(n, dtype=np.int64), np.array([n])
    lo_c, hi_c = c[:-1], c[1:]
    mids = 0.5 * (lo_c + hi_c)
    width = 8.0 * np.finfo(np.float64).eps * (np.abs(lo_c) + np.abs(hi_c)) + 1e-300
    lo = np.searchsorted(xs, mids - width, side="left")
    hi = np.searchsorted(xs, mids + width, side="right")
    edges = lo.copy()  # edges[j-1]: how many values have a code below j
    for j in np.flatnonzero(hi > lo):  # within rounding error of a midpoint: ask the rule
        edges[j] += int(np.count_nonzero(nearest_level(xs[lo[j] : hi[j]], c) <= j))
    counts = np.diff(np.concatenate([[0], edges, [n]]))
    a = np.empty(n, dtype=np.int64)
    a[order] = np.repeat(np.arange(k), counts)
    return a, counts


def _kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): D²-weighted draws from ``rng``."""
    chosen = [x[rng.integers(x.size)]]
    d2 = (x - chosen[0]) ** 2
    while len(chosen) < k:
        cum = np.cumsum(d2)
        if cum[-1] == 0:  # fewer distinct values than clusters: repeat the last
            chosen.append(chosen[-1])
            continue
        i = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), x.size - 1)
        chosen.append(x[i])
        d2 = np.minimum(d2, (x - x[i]) ** 2)
    return np.asarray(chosen)


def _exact_kmeans(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Optimal 1-D k-means by dynamic programming over the sorted values (eq. C8).

    :math:`D_j(i) = \min_{t} D_{j-1}(t-1) + \mathrm{SSE}(x_{(t)}..x_{(i)})`; the optimal
    split is monotone in ``i``, so each layer is solved by divide and conquer, vectorized
    over the segments of one recursion depth: O(k n log n) time, O(k n) memory.
    """
    order = np.argsort(x, kind="stable")
    xs = x[order]
    n = xs.size
    z = xs - xs.mean()  # centred sums: less cancellation in the SSE
    s1 = np.concatenate([[0.0], np.cumsum(z)])
    s2 = np.concatenate([[0.0], np.cumsum(z * z)])

    def sse(t: np.ndarray, i: np.ndarray) -> np.ndarray:
        s = s1[i + 1] - s1[t]
        return np.maximum(s2[i + 1] - s2[t] - s * s / (i - t + 1), 0.0)

    d = sse(np.zeros(n, dtype=np.int64), np.arange(n))
    splits = [np.zeros(n, dtype=np.int64)]
    for j in range(2, k + 1):
        d, split = _dc_layer(d, sse, n, j)
        splits.append(split)
    labels = np.empty(n, dtype=np.int64)
    i = n - 1
    for j in range(k, 0, -1):
        t = int(splits[j - 1][i])
        labels[t : i + 1] = j - 1
        i = t - 1
    counts = np.bincount(labels, minlength=k)
    centroids = np.bincount(labels, weights=xs, minlength=k) / counts
    codes = np.empty(n, dtype=np.int64)
    codes[order] = labels
    return centroids, codes


def _dc_layer(prev: np.ndarray, sse, n: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """One DP layer: cur(i) = min over t in [j-1, i] of prev(t-1) + sse(t, i), i >= j-1."""
    cur = np.full(n, np.inf)
    split = np.zeros(n, dtype=np.int64)
    lo, hi = np.array([j - 1]), np.array([n - 1])  # the points i of each segment
    olo, ohi = np.array([j - 1]), np.array([n - 1])  # the range of their optimal split
    while lo.size:
        mid = (lo + hi) // 2
        b = np.minimum(mid, ohi)
        lengths = b - olo + 1
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        seg = np.repeat(np.arange(lo.size), lengths)
        t = olo[seg] + np.arange(seg.size) - offsets[seg]
        v = prev[t - 1] + sse(t, mid[seg])
        mins = np.minimum.reduceat(v, offsets)
        hit = np.flatnonzero(v == mins[seg])
        _, first = np.unique(seg[hit], return_index=True)  # first minimum of each segment
        best = t[hit[first]]
        cur[mid], split[mid] = mins, best
        left = lo <= mid - 1
        right = mid + 1 <= hi
        lo, hi, olo, ohi = (
            np.concatenate([lo[left], mid[right] + 1]),
            np.concatenate([mid[left] - 1, hi[right]]),
            np.concatenate([olo[left], best[right]]),
            np.concatenate([best[left], ohi[right]]),
        )
    return cur, split


@dataclass(frozen=True)
class KMeansQuantizer:
    r"""Weight sharing by 1-D k-means: every weight becomes its cluster's centroid.

    Parameters
    ----------
    n_clusters : int
        Codebook size K (e.g. 16 for 4 bits), at most the entries of a tensor or channel.
    scope : {"layer", "channel"}
        One codebook per tensor, or one per output channel (axis 0).
    init : {"linear", "kmeans++"}
        Lloyd's start: K centroids evenly spaced over [min, max] (deterministic, Deep
        Compression's "linear" initialization), or k-means++ seeding; group ``g`` (the
        tensor, or channel ``g``) draws from ``default_rng(SeedSequence([seed, g]))``.
    seed : int
        Seed of the k-means++ start; the compression is a deterministic function of the
        weights and this configuration (the ``seed`` of :meth:`compress` is ignored).
    max_iter : int
        Cap on Lloyd iterations; they stop earlier at a fixed point.
    algorithm : {"lloyd", "exact"}
        Lloyd iterations (a local optimum), or the global optimum of the 1-D problem by
        dynamic programming (``init``, ``seed``, ``max_iter`` unused).

    Notes
    -----
    Lloyd (eq. C7): assign each weight to its nearest centroid (halfway: the one of smaller
    magnitude), move each centroid to the mean of its cluster (an empty cluster keeps its
    centroid), sort, repeat until the centroids no longer change. At that fixed point each
    cluster's error has zero mean. The error model is the actual within-cluster mean square
    per tensor or channel (exact, deterministic), and its mean.
    """

    n_clusters: int
    scope: Literal["layer", "channel"] = "layer"
    init: Literal["linear", "kmeans++"] = "linear"
    seed: int = 0
    max_iter: int = 100
    algorithm: Literal["lloyd", "exact"] = "lloyd"

    def __post_init__(self) -> None:
        check_int("n_clusters", self.n_clusters, 1)
        check_choice("scope", self.scope, ("layer", "channel"))
        check_choice("init", self.init, ("linear", "kmeans++"))
        check_int("seed", self.seed, 0)
        check_int("max_iter", self.max_iter, 1)
        check_choice("algorithm", self.algorithm, ("lloyd", "exact"))

    @property
    def granularity(self) -> str:
        return "tensor" if self.scope == "layer" else "channel"

    def compress(self, w: Any, *, seed: int | None = None):
        """Cluster ``w`` (numpy array or torch tensor; channels on axis 0).

        Returns
        -------
        Compressed
            ``detail`` is a :class:`CodebookTensor`.
        """
        return self._finish(*self._cluster([self._rows(w)])[0])

    def compress_many(self, weights: dict[str, Any], *, seed: int | None = None) -> dict:
        """Cluster several tensors, each as :meth:`compress` does, the Lloyd iterations of
        all their groups taken together (the same result, one pass a step for all).

        Parameters
        ----------
        weights : dict of str to array_like or torch.Tensor
        seed : ignored (k-means++ draws from ``self.seed`` and the group's index)

        Returns
        -------
        dict of str to Compressed, in the order of ``weights``
        """
        if not isinstance(weights, dict) or not weights:
            raise ValueError(f"weights must be a non-empty dict of tensors, got {weights!r}")
        done = self._cluster([self._rows(v) for v in weights.values()])
        return {k: self._finish(*d) for k, d in zip(weights, done, strict=True)}

    def _rows(self, w: Any) -> tuple[np.ndarray, Any, np.ndarray]:
        gran = self.granularity
        w64, like = prepare(w, min_ndim=1 if gran == "channel" else 0, what="quantize")
        rows = group_rows(w64, gran)
        if self.n_clusters > rows.shape[1]:
            per = "channel" if gran == "channel" else "tensor"
            raise ValueError(
                f"n_clusters must be at most the {rows.shape[1]} entries of each {per}, "
                f"got {self.n_clusters!r}"
            )
        return w64, like, rows

    def _cluster(self, prepared: list) -> list:
        """(w64, like, books, codes) per tensor: :func:`kmeans_1d` on every group."""
        k = self.n_clusters
        books = [np.empty((rows.shape[0], k)) for _, _, rows in prepared]
        codes = [np.zeros(rows.shape, dtype=np.int64) for _, _, rows in prepared]
        blocks, starts, where = [], [], []
        for t, (_, _, rows) in enumerate(prepared):
            lo, hi = rows.min(axis=1), rows.max(axis=1)
            flat = lo == hi  # one value: every centroid is it (as kmeans_1d)
            books[t][flat] = rows[flat, :1]
            live = np.flatnonzero(~flat)
            if self.algorithm == "exact" or live.size == 0:
                for g in live:
                    books[t][g], codes[t][g] = kmeans_1d(rows[g], k, algorithm=self.algorithm)
                continue
            if self.init == "linear":
                c0 = np.linspace(lo[live], hi[live], k, axis=1)
            else:
                c0 = np.stack([np.sort(_kmeanspp(rows[g], k, np.random.default_rng(
                    np.random.SeedSequence([self.seed, int(g)])))) for g in live])  # fmt: skip
            blocks.append(rows[live])
            starts.append(c0)
            where.append((t, live))
        if blocks:
            got_books, got_codes = _lloyd_rows(blocks, starts, self.max_iter)
            for (t, live), b, a in zip(where, got_books, got_codes, strict=True):
                books[t][live], codes[t][live] = b, a
        return [(w64, like, books[t], codes[t]) for t, (w64, like, _) in enumerate(prepared)]

    def _finish(self, w64, like, books, codes):
        return _codebook_result(self, w64, like, books, codes, "kmeans")


def _codebook_result(cfg, w64, like, books, codes, rule, exponent=None):
    from distortion.compression import Compressed

    gran = cfg.granularity
    values64 = np.take_along_axis(books, codes, axis=1).reshape(w64.shape)
    values, error = finish(values64, w64, like)
    model = exact_error_model(error, gran, rule)
    book = books[0] if gran == "tensor" else books
    if exponent is not None and gran == "tensor":
        exponent = exponent.reshape(())
    detail = CodebookTensor(codes.reshape(w64.shape), book, exponent)
    return Compressed(values, error, model, cfg, detail)


# ---------------------------------------------------------------------- fixed grids
def log2_levels(bits: int) -> np.ndarray:
    r"""Normalized power-of-two levels :math:`0, \pm 2^{-k}`, :math:`k = 0..2^{b-1}-2` (C12)."""
    bits = check_int("bits", bits, 2, 16)
    pos = 2.0 ** -np.arange(2 ** (bits - 1) - 1, dtype=np.float64)
    return np.unique(np.concatenate([-pos, [0.0], pos]))


def nf4_levels() -> np.ndarray:
    r"""The 16 NormalFloat-4 levels of QLoRA, computed from the normal quantile (eq. C13).

    Dettmers et al. (2023) estimate :math:`2^{k-1}` quantiles of N(0, 1) for the negative
    half and :math:`2^{k-1}+1` for the positive half, join them and drop one of the two
    zeros, then normalize to [−1, 1]. As in their ``create_normal_map``: positive levels
    :math:`\Phi^{-1}(p)` for 9 probabilities evenly spaced from :math:`\delta` down to 1/2
    (the last, 0, dropped), negative levels :math:`-\Phi^{-1}(p)` for 8 probabilities from
    :math:`\delta` to 1/2 (the last dropped), plus 0, all divided by the largest, with
    :math:`\delta = \tfrac12\bigl[(1 - \tfrac1{2\cdot 15}) + (1 - \tfrac1{2\cdot 16})\bigr]`
    (the mean of the outermost quantile offsets of the two halves; 0.9677083).

    Returns
    -------
    ndarray of shape (16,), ascending, with -1, 0 and 1 exactly
    """
    from scipy.stats import norm

    delta = 0.5 * ((1.0 - 1.0 / 30.0) + (1.0 - 1.0 / 32.0))
    pos = norm.ppf(np.linspace(delta, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(delta, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return v / np.max(np.abs(v))


@dataclass(frozen=True)
class NonUniformQuantizer:
    r"""A b-bit quantizer on a non-uniform grid, scaled by max|w| per tensor or channel.

    Parameters
    ----------
    bits : int
        2..16 for ``"power"`` and ``"log2"`` (:math:`2^b - 1` levels, 0 included); exactly 4
        for ``"nf4"``.
    grid : {"power", "log2", "nf4"}
        ``"power"``: power companding (PowerQuant): the symmetric uniform grid of
        :math:`L = 2^{b-1}-1` steps a side on :math:`y = \operatorname{sign}(w)(|w|/m)^a`,
        mapped back, :math:`\hat w = m\operatorname{sign}(\hat y)|\hat y|^{1/a}` (eq. C9).
        ``"log2"``: the nearest of :math:`0, \pm m 2^{-k}`, :math:`k = 0..2^{b-1}-2`
        (eq. C12). ``"nf4"``: the nearest of :math:`m\,q_i` for the 16 NF4 levels
        :math:`q_i` (eq. C13). :math:`m = \max|w|` per tensor or channel.
    exponent : float in (0, 1], optional
        The companding exponent :math:`a` of ``"power"``; None searches
        :data:`POWER_EXPONENTS` (1.00, 0.99, …, 0.01) for the least squared reconstruction
        error per tensor or channel, ties going to the largest (eq. C10).
    granularity : {"tensor", "channel"}

    Notes
    -----
    Rounding is to the nearest level in the normalized domain :math:`w/m` (halfway: the
    level of smaller magnitude), except for ``"power"``, which rounds :math:`y` half to
    even. A tensor or channel of zeros is returned unchanged. The error model is the actual
    mean square and mean per tensor or channel (exact, deterministic);
    :meth:`high_resolution_second_moment` gives the Bennett approximation of eq. C11.

    References
    ----------
    .. [1] E. Yvinec, A. Dapogny, M. Cord, K. Bailly, "PowerQuant: Automorphism Search for
       Non-Uniform Quantization", ICLR 2023.
    .. [2] T. Dettmers, A. Pagnoni, A. Holtzman, L. Zettlemoyer, "QLoRA: Efficient
       Finetuning of Quantized LLMs", NeurIPS 2023.
    """

    bits: int
    grid: Literal["power", "log2", "nf4"] = "power"
    exponent: float | None = None
    granularity: Literal["tensor", "channel"] = "tensor"

    def __post_init__(self) -> None:
        check_choice("grid", self.grid, ("power", "log2", "nf4"))
        check_choice("granularity", self.granularity, _GRANULARITIES)
        if self.grid == "nf4":
            if isinstance(self.bits, bool) or self.bits != 4:
                raise ValueError(f"grid='nf4' has 16 levels: bits must be 4, got {self.bits!r}")
        else:
            check_int("bits", self.bits, 2, 16)
        if self.exponent is not None:
            a = self.exponent
            if self.grid != "power":
                raise ValueError(f"exponent applies to grid='power' only, got grid={self.grid!r}")
            if (
                isinstance(a, bool)
                or not isinstance(a, int | float | np.integer | np.floating)
                or not 0.0 < float(a) <= 1.0
            ):
                raise ValueError(f"exponent must be in (0, 1], got {a!r}")

    def compress(self, w: Any, *, seed: int | None = None):
        """Quantize ``w`` (numpy array or torch tensor; channels on axis 0).

        Returns
        -------
        Compressed
            ``detail`` is a :class:`CodebookTensor` (with the exponent for ``"power"``).
        """
        w64, like = prepare(w, min_ndim=1 if self.granularity == "channel" else 0,
                            what="quantize")  # fmt: skip
        rows = group_rows(w64, self.granularity)
        m = np.max(np.abs(rows), axis=1)
        if self.grid == "power":
            a = self._exponents(rows, m)
            books = _power_codebooks(m, a, self.bits)
            codes = _power_codes_rows(rows, m, a, self.bits)
            return _codebook_result(self, w64, like, books, codes, "power", exponent=a)
        levels = log2_levels(self.bits) if self.grid == "log2" else nf4_levels()
        safe = np.where(m > 0, m, 1.0)[:, None]
        codes = nearest_level(rows / safe, levels)
        codes = np.where(m[:, None] > 0, codes, int(np.flatnonzero(levels == 0.0)[0]))
        books = levels[None, :] * m[:, None]
        return _codebook_result(self, w64, like, books, codes, self.grid)

    def exponents(self, w: Any) -> np.ndarray:
        """The companding exponent used for ``w``, () or (C,) (``grid="power"``)."""
        if self.grid != "power":
            raise ValueError(f"exponents apply to grid='power' only, got grid={self.grid!r}")
        w64, _ = prepare(w, what="quantize")
        rows = group_rows(w64, self.granularity)
        a = self._exponents(rows, np.max(np.abs(rows), axis=1))
        return a.reshape(()) if self.granularity == "tensor" else a

    def high_resolution_second_moment(self, w: Any) -> np.ndarray:
        r"""Bennett's high-resolution :math:`E[e^2]` of power companding, () or (C,).

        .. math:: \sigma^2 \approx \frac{\Delta_y^2}{12\,a^2}\,
                  \overline{|w|^{2(1-a)}}, \qquad \Delta_y = m^a / L,

        the local step :math:`\Delta_y/|dy/dw|` squared over 12, averaged over the weights
        (eq. C11); it approaches the exact mean square as ``bits`` grow.
        """
        if self.grid != "power":
            raise ValueError(
                f"the high-resolution formula is that of grid='power', got grid={self.grid!r}"
            )
        w64, _ = prepare(w, what="quantize")
        rows = group_rows(w64, self.granularity)
        m = np.max(np.abs(rows), axis=1)
        a = self._exponents(rows, m)
        levels = 2 ** (self.bits - 1) - 1
        step_y = m**a / levels
        moment = np.mean(np.abs(rows) ** (2.0 * (1.0 - a[:, None])), axis=1)
        m2 = uniform_error_variance(step_y) * moment / a**2  # (eq. C11)
        return m2.reshape(()) if self.granularity == "tensor" else m2

    def _exponents(self, rows: np.ndarray, m: np.ndarray) -> np.ndarray:
        if self.exponent is not None:
            return np.full(rows.shape[0], float(self.exponent))
        return _search_exponents(rows, m, self.bits)


def _search_exponents(rows: np.ndarray, m: np.ndarray, bits: int) -> np.ndarray:
    r"""The exponent of eq. C10 per group (row): the least squared error over
    :data:`POWER_EXPONENTS`, ties to the largest.

    The squared error of every candidate is read from sums over the magnitudes without
    quantizing (eq. C10a): for exponent :math:`a` the entries of code :math:`k` are those with
    :math:`\tau_{k-1} \le |w|/m < \tau_k`, :math:`\tau_k = ((k+\frac12)/L)^{1/a}`, and
    their error is :math:`S_2 - 2c_kS_1 + n_kc_k^2`, :math:`c_k = m(k/L)^{1/a}`. The
    thresholds do not depend on the group, so one sorted list of all candidates' thresholds
    serves every group: each entry falls in one interval of it, and per-group histograms of
    the entries (count, :math:`\sum|w|`, :math:`\sum w^2`) over those intervals, summed
    cumulatively, give every candidate's cells at once — O(n log(AL) + G A L) for all
    groups, instead of a pass per candidate. An entry within rounding error of a threshold
    is coded as eq. C9 codes it (its cell read from the rounding itself), so the cells are
    exact; the candidates whose error lies within the sums' rounding error of the smallest
    are then re-evaluated as :math:`\sum_i(\hat w_i - w_i)^2` (eq. C10 itself), and the
    first of those minima is kept: the result is the exhaustive search's.
    """
    L = 2 ** (bits - 1) - 1
    a_all = POWER_EXPONENTS
    n_cand = a_all.size
    G, n = rows.shape
    best = np.full(G, a_all[0])  # an all-zero group: every exponent is exact, the largest kept
    live = np.flatnonzero(m > 0)
    if live.size == 0:
        return best
    levels = _power_codebooks(np.ones(n_cand), a_all, bits)[:, L:]  # (A, L+1), k >= 0
    half = (np.arange(L, dtype=np.float64) + 0.5) / L
    tau = (half[None, :] ** (1.0 / a_all[:, None])).ravel()  # (A L,), candidate-major
    by = np.argsort(tau, kind="stable")
    tau_sorted = tau[by]
    rank = np.empty_like(by)
    rank[by] = np.arange(by.size)  # position of threshold (a, k) in tau_sorted
    T = tau.size
    mags = np.sort(np.abs(rows[live]), axis=1)  # sorted: the lookups below stay in cache
    mg = m[live]
    u = mags / mg[:, None]
    gl = live.size
    b = np.searchsorted(tau_sorted, u.ravel(), side="right").reshape(u.shape)  # taus <= u
    flat = (np.arange(gl)[:, None] * (T + 1) + b).ravel()
    # below threshold r: the entries with b <= r (count and sum of |w|)
    cnt, s1 = (np.cumsum(np.bincount(flat, weights=w, minlength=gl * (T + 1)).reshape(
        gl, T + 1)[:, :T], axis=1) for w in (None, mags.ravel()))  # fmt: skip
    # entries within rounding error of a threshold: their cell as eq. C9 rounds them
    window = 16.0 * np.finfo(np.float64).eps / a_all  # relative, per candidate
    wide = float(window.max()) + 4.0 * np.finfo(np.float64).eps
    lo_t = tau_sorted[np.maximum(b - 1, 0)]
    hi_t = tau_sorted[np.minimum(b, T - 1)]
    close = ((b > 0) & (u - lo_t <= wide * lo_t)) | ((b < T) & (hi_t - u <= wide * hi_t))
    for gi, i in zip(*np.nonzero(close), strict=True):
        x, mag = u[gi, i], mags[gi, i]
        near = np.flatnonzero(np.abs(tau - x) <= (np.repeat(window, L) + 4e-16) * tau)
        for r in near:  # threshold (a, k): below it iff the code of eq. C9 is at most k
            ai, k = divmod(int(r), L)
            c9 = np.round(L * (mag / mg[gi]) ** a_all[ai]) <= k
            d = int(c9) - int(x < tau[r])
            if d:
                j = rank[r]
                cnt[gi, j] += d
                s1[gi, j] += d * mag
    cols = rank.reshape(n_cand, L)
    # (C10a) summed by parts over the cells: with N_k, S_k the count and sum of |w| below
    # threshold k, sum_k (S2_k - 2 c_k S1_k + n_k c_k^2) = sum w^2
    #   - 2 m [sum_k S_k (l_k - l_{k+1}) + l_L S] + m^2 [sum_k N_k (l_k^2 - l_{k+1}^2) + l_L^2 n]
    dl = levels[:, :-1] - levels[:, 1:]
    dl2 = levels[:, :-1] ** 2 - levels[:, 1:] ** 2
    top = levels[:, L]
    p2 = np.sum(mags * mags, axis=1)
    lin = np.einsum("gak,ak->ga", s1[:, cols], dl) + top * mags.sum(axis=1)[:, None]
    quad = np.einsum("gak,ak->ga", cnt[:, cols], dl2) + top**2 * n
    sse = p2[:, None] - 2.0 * mg[:, None] * lin + (mg * mg)[:, None] * quad  # (G, A)
    lowest = sse.min(axis=1)
    tol = 1e-9 * np.maximum(lowest, 0.0) + 1e-12 * p2
    near = sse <= (lowest + tol)[:, None]
    first = np.argmax(near, axis=1)
    best[live] = a_all[first]
    for gi in np.flatnonzero(np.count_nonzero(near, axis=1) > 1):  # re-evaluate: eq. C10
        g = live[gi]
        cand = np.flatnonzero(near[gi])
        exact = [_power_sse(rows[g], float(m[g]), a_all[i], bits) for i in cand]
        best[g] = a_all[cand[int(np.argmin(exact))]]  # first minimum: the largest a
    return best


def _power_sse(row: np.ndarray, m: float, a: float, bits: int) -> float:
    """The squared reconstruction error of eq. C10 for one exponent, as quantization gives it."""
    book = _power_codebooks(np.array([m]), np.array([a]), bits)[0]
    return float(np.sum((book[_power_codes(row, m, a, bits)] - row) ** 2))


def _power_codebooks(m: np.ndarray, a: np.ndarray, bits: int) -> np.ndarray:
    r"""Levels :math:`m\,\operatorname{sign}(k)(|k|/L)^{1/a}`, k = -L..L, per group (G, 2L+1)."""
    L = 2 ** (bits - 1) - 1
    k = np.arange(-L, L + 1, dtype=np.float64)
    mag = (np.abs(k)[None, :] / L) ** (1.0 / a[:, None])
    return np.sign(k)[None, :] * mag * m[:, None]  # the outer levels are ±m exactly


def _power_codes_rows(rows: np.ndarray, m: np.ndarray, a: np.ndarray, bits: int) -> np.ndarray:
    """:func:`_power_codes` of every row (G, n), row ``g`` with ``m[g]`` and ``a[g]``."""
    L = 2 ** (bits - 1) - 1
    safe = np.where(m > 0, m, 1.0)[:, None]
    y = np.sign(rows) * (np.abs(rows) / safe) ** a[:, None]
    codes = (np.round(y * L) + L).astype(np.int64)
    codes[m == 0] = L  # all zeros: the level 0
    return codes


def _power_codes(row: np.ndarray, m: float, a: float, bits: int) -> np.ndarray:
    """Code k + L of the companded rounding k = round(L sign(w)(|w|/m)^a) (eq. C9)."""
    L = 2 ** (bits - 1) - 1
    if m == 0:
        return np.full(row.shape, L, dtype=np.int64)  # all zeros: the level 0
    y = np.sign(row) * (np.abs(row) / m) ** a
    return (np.round(y * L) + L).astype(np.int64)
