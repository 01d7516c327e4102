"""Time a 1..16-bit distortion curve of a two-class layer: closed forms vs Monte Carlo.

The closed forms (Taylor eq. B9, moment matching eq. B11, flip eq. B14, spread eq. B12)
share one O(d^2) preparation (Sigma_k v, the gradient, the Hessian trace, M_k) across
bit-widths; each bit-width then costs O(1). The Monte-Carlo reference (eq. B16) draws
``n_draws`` antithetic pairs once and rescales them for every bit-width; it is timed in the
same run and the ratio printed, as is the mixture form (eq. B22: one Gauss-Hermite
quadrature per bit-width).

Usage::

    python benchmarks/bench_binary.py                  # d = 2048, single-threaded BLAS
    python benchmarks/bench_binary.py --d 512 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=2048, help="feature dimension")
    p.add_argument("--repeats", type=int, default=30, help="timed repetitions of the closed forms")
    p.add_argument("--n-draws", type=int, default=2000, help="Monte Carlo antithetic pairs")
    p.add_argument("--mc-repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (set before import)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import numpy as np

    from distortion.theory.binary import distortion_curve
    from distortion.theory.gaussian import GaussianModel

    rng = np.random.default_rng(args.seed)
    d = args.d
    a = rng.standard_normal((2, d, d)) / np.sqrt(d)
    cov = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(d)
    diff = rng.standard_normal(d) * 2 / np.sqrt(d)
    offset = np.abs(rng.standard_normal(d))
    means = np.stack([offset + diff / 2, offset - diff / 2])
    v = np.linalg.solve(cov.mean(axis=0), diff) + 0.1 * rng.standard_normal(d) / np.sqrt(d)
    W = np.stack([v / 2, -v / 2])
    c = -v @ (means[0] + means[1]) / 2
    b = np.array([c / 2, -c / 2])
    models = {
        "class": GaussianModel.from_params(means, cov),
        "pooled": GaussianModel.from_params(means, cov.mean(axis=0)),
    }
    bits = range(1, 17)
    print(f"d = {d}, bits 1..16, BLAS threads = {args.threads}, numpy {np.__version__}")
    print(f"{'covariance':10s} {'what':44s} {'min ms':>9s} {'median ms':>10s}")

    def timed(fn, n):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        return np.array(ts), out

    for name, model in models.items():
        closed = ("taylor", "moment")

        def run_closed(second, model=model, closed=closed):
            return distortion_curve(
                model, W, b, bits=bits, methods=closed, second_order_spread=second
            )

        cold, _ = timed(lambda: run_closed(True), 1)  # includes the per-model caches
        rows = [("closed forms, first call (model caches cold)", cold)]
        for second in (False, True):
            t, curve = timed(lambda second=second: run_closed(second), args.repeats)
            label = f"closed forms, {'2nd' if second else '1st'}-order spread"
            rows.append((label, t))
        t_mix, mix = timed(
            lambda model=model: distortion_curve(model, W, b, bits=bits, methods=("mixture",)),
            args.repeats,
        )
        rows.append(("mixture form (eq. B22, 64 Gauss-Hermite nodes)", t_mix))
        t_mc, mc = timed(
            lambda model=model: distortion_curve(
                model, W, b, bits=bits, methods=("montecarlo",), n_draws=args.n_draws, seed=1
            ),
            args.mc_repeats,
        )
        rows.append((f"Monte Carlo, {args.n_draws} antithetic pairs", t_mc))
        for label, t in rows:
            print(f"{name:10s} {label:44s} {1e3 * t.min():9.2f} {1e3 * np.median(t):10.2f}")
        fast = np.median(rows[1][1])
        print(
            f"{name:10s} ratio Monte Carlo / closed forms (1st-order spread, medians): "
            f"{np.median(t_mc) / fast:.0f}x; "
            f"with 2nd-order spread: {np.median(t_mc) / np.median(rows[2][1]):.0f}x; "
            f"Monte Carlo / mixture form: {np.median(t_mc) / np.median(t_mix):.0f}x"
        )
        f = curve.to_frame()
        ref = mc.to_frame().set_index("bits")
        mx = mix.to_frame().set_index("bits")
        for bb in (4, 8):
            row = f[(f["bits"] == bb) & (f["method"] == "taylor")].iloc[0]
            mo = f[(f["bits"] == bb) & (f["method"] == "moment")].iloc[0]
            print(
                f"{name:10s}   b={bb}: D taylor {row.distortion:.4e}, moment "
                f"{mo.distortion:.4e}, mixture {mx.loc[bb, 'distortion']:.4e}, "
                f"MC {ref.loc[bb, 'distortion']:.4e} "
                f"± {ref.loc[bb, 'stderr']:.1e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
