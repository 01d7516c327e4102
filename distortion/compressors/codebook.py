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
    """Lloyd iterations: assign to the nearest centroid, move each to its cluster's mean.

    Each assignment is that of :func:`nearest_level`, found on the sorted values: the codes
    are non-decreasing in the value, so a cluster is a run of the sorted values between two
    midpoints (O(k log n)); the few values within rounding error of a midpoint are assigned
    by :func:`nearest_level` itself. The cluster sums are accumulated in the input's order
    (``bincount``), as the plain loop does, so the centroids are bit for bit the same.
    """
    k = c.size
    order = np.argsort(x, kind="stable")
    xs = x[order]
    for _ in range(max_iter):
        a, counts = _sorted_assignment(x, xs, order, c)
        sums = np.bincount(a, weights=x, minlength=k)
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), c))  # empty: stays
        if np.array_equal(new, c):
            break
        c = new
    return c, _sorted_assignment(x, xs, order, c)[0]


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
        gran = self.granularity
        w64, like = prepare(w, min_ndim=1 if gran == "channel" else 0, what="quantize")
        rows = group_rows(w64, gran)
        if self.n_clusters > rows.shape[1]:
            per = "channel" if gran == "channel" else "tensor"
            raise ValueError(
                f"n_clusters must be at most the {rows.shape[1]} entries of each {per}, "
                f"got {self.n_clusters!r}"
            )
        books, codes = [], []
        for g, row in enumerate(rows):
            c, a = kmeans_1d(
                row, self.n_clusters, algorithm=self.algorithm, init=self.init,
                seed=np.random.SeedSequence([self.seed, g]),
                max_iter=self.max_iter,
            )  # fmt: skip
            books.append(c)
            codes.append(a)
        return _codebook_result(self, w64, like, np.stack(books), np.stack(codes), "kmeans")


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
            codes = np.stack([_power_codes(r, mi, ai, self.bits) for r, mi, ai in zip(
                rows, m, a, strict=True)])  # fmt: skip
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

    The squared error of every candidate is read from the sorted magnitudes without
    quantizing (eq. C10a): for exponent :math:`a` the entries of code :math:`k` are those with
    :math:`t_{k-1} \le |w| < t_k`, :math:`t_k = m((k+	frac12)/L)^{1/a}`, and their error is
    :math:`S_2 - 2c_kS_1 + n_kc_k^2` from prefix sums, :math:`c_k = m(k/L)^{1/a}` — O(L log n)
    per candidate instead of O(n). An entry within rounding error of a threshold is coded as
    eq. C9 codes it (its cell read from the rounding itself), so the cells are exact; the
    candidates whose prefix-sum error lies within the sums' rounding error of the smallest
    are then re-evaluated as :math:`\sum_i(\hat w_i - w_i)^2` (eq. C10 itself), and the
    first of those minima is kept: the result is the exhaustive search's.
    """
    L = 2 ** (bits - 1) - 1
    n_cand = POWER_EXPONENTS.size
    levels = _power_codebooks(np.ones(n_cand), POWER_EXPONENTS, bits)[:, L:]  # (A, L+1), k>=0
    half = (np.arange(L, dtype=np.float64) + 0.5) / L
    thresholds = half[None, :] ** (1.0 / POWER_EXPONENTS[:, None])  # (A, L), times m
    # relative width around a threshold inside which the rounding of eq. C9 decides
    window = 16.0 * np.finfo(np.float64).eps / POWER_EXPONENTS[:, None]
    mags = np.sort(np.abs(rows), axis=1)
    zero = np.zeros((rows.shape[0], 1))
    p1 = np.concatenate([zero, np.cumsum(mags, axis=1)], axis=1)
    p2 = np.concatenate([zero, np.cumsum(mags**2, axis=1)], axis=1)
    n = rows.shape[1]
    best = np.full(rows.shape[0], POWER_EXPONENTS[0])
    for g in range(rows.shape[0]):
        mg, sg = float(m[g]), mags[g]
        if mg == 0.0:
            continue  # all zeros: every exponent is exact, the largest is kept
        t = mg * thresholds
        lo = np.searchsorted(sg, t * (1.0 - window), side="left")
        hi = np.searchsorted(sg, t * (1.0 + window), side="right")
        edges = lo.copy()
        for a_i, k in zip(*np.nonzero(hi > lo), strict=True):  # rare: decide by eq. C9
            ys = np.round(L * (sg[lo[a_i, k] : hi[a_i, k]] / mg) ** POWER_EXPONENTS[a_i])
            edges[a_i, k] += int(np.count_nonzero(ys <= k))
        edges = np.concatenate(
            [np.zeros((n_cand, 1), dtype=np.int64), edges, np.full((n_cand, 1), n)], axis=1
        )
        s1 = p1[g][edges[:, 1:]] - p1[g][edges[:, :-1]]
        s2 = p2[g][edges[:, 1:]] - p2[g][edges[:, :-1]]
        c = mg * levels
        sse = np.sum(s2 - 2.0 * c * s1 + np.diff(edges, axis=1) * c * c, axis=1)  # (C10a)
        tol = 1e-9 * max(float(sse.min()), 0.0) + 1e-12 * float(p2[g][-1])
        near = np.flatnonzero(sse <= sse.min() + tol)
        if near.size > 1:
            exact = [_power_sse(rows[g], mg, POWER_EXPONENTS[i], bits) for i in near]
            best[g] = POWER_EXPONENTS[near[int(np.argmin(exact))]]  # first minimum: largest a
        else:
            best[g] = POWER_EXPONENTS[near[0]]
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


def _power_codes(row: np.ndarray, m: float, a: float, bits: int) -> np.ndarray:
    """Code k + L of the companded rounding k = round(L sign(w)(|w|/m)^a) (eq. C9)."""
    L = 2 ** (bits - 1) - 1
    if m == 0:
        return np.full(row.shape, L, dtype=np.int64)  # all zeros: the level 0
    y = np.sign(row) * (np.abs(row) / m) ** a
    return (np.round(y * L) + L).astype(np.int64)
