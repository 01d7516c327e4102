"""Time level 3 (semiparametric_distortion) for N = 10 000, K = 10, d = 64, R = 400.

The per-sample Gauss--Hermite quadrature (theory/multiclass.md, eq. M13) and the 400
simulated realizations of the band (eq. M16) are timed separately (``n_realizations=0``
gives the quadrature alone). This replaces the wall-clock assert that used to live in
``tests/test_multiclass.py``; the target is a few seconds on one CPU thread.

Usage::

    python benchmarks/bench_semiparametric.py
    python benchmarks/bench_semiparametric.py --n 50000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="samples")
    p.add_argument("--k", type=int, default=10, help="classes")
    p.add_argument("--d", type=int, default=64, help="feature dimension")
    p.add_argument("--realizations", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (set before import)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np

    from distortion.theory.semiparametric import semiparametric_distortion

    rng = np.random.default_rng(6)
    means = rng.normal(size=(args.k, args.d))
    W = rng.normal(size=(args.k, args.d)) / np.sqrt(args.d)
    y = rng.integers(0, args.k, args.n)
    X = np.abs(means[y] + rng.normal(size=(args.n, args.d)))
    b = rng.normal(size=args.k) * 0.1
    step = float(np.abs(W).max() / 7)  # 4 bits, symmetric per tensor
    for label, r in (("quadrature only", 0), (f"with {args.realizations} realizations", None)):
        r = args.realizations if r is None else r
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = semiparametric_distortion(X, W, b, step=step, labels=y, n_realizations=r, seed=0)
            times.append(time.perf_counter() - t0)
        print(f"{label:>28}: best {min(times):.3f} s  (flip rate {res.flip_rate:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
