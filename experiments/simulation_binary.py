"""Simulation study: closed-form distortion of a quantized two-class layer vs Monte Carlo.

Synthetic Gaussian classes (H_G) over a grid of feature dimension, class separation,
covariance shape and weight distribution; for each, the layer is quantized with a
symmetric per-tensor (or per-channel) max-range quantizer at 1..8 bits and the distortion
``D = E_E[R(W+E)] - R(W)`` is computed by the Taylor (eq. B9) and moment-matching (eq. B11)
closed forms and by the Monte Carlo that is exact under H_G and H_U (eq. B16). Also
reported: the actual quantized weights' distortion (level 2), the spread of one realization
(eq. B12), and the flip probability (closed eq. B14 vs Monte Carlo eq. B17).

Usage::

    OMP_NUM_THREADS=1 python experiments/simulation_binary.py            # full grid
    OMP_NUM_THREADS=1 python experiments/simulation_binary.py --quick    # d in {16, 128}

Writes ``experiments/results/simulation_binary/table.csv`` (one row per case and bit-width)
and prints the summary tables. A case agrees when ``|rel| <= 5 %`` or, when D is tiny,
``|closed - MC| <= 3`` Monte Carlo standard errors.
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from distortion.theory.binary import distortion_curve, prepare_layer  # noqa: E402
from distortion.theory.gaussian import GaussianModel  # noqa: E402

OUT_DIR = ROOT / "experiments" / "results" / "simulation_binary"

DIMS = (16, 128, 512, 2048)
QUICK_DIMS = (16, 128)
SEPARATIONS = (1.0, 2.0, 4.0)  # Mahalanobis distance between the class means
COVARIANCES = ("isotropic", "spiked")
WEIGHTS = ("lda", "heavy")
METHODS = ("taylor", "moment", "mixture")
REL_TOL = 0.05
Z_TOL = 3.0


def make_covariances(d: int, shape: str, rng: np.random.Generator):
    """Class covariances ``(2, d, d)`` with eigenvectors ``Q`` and pooled eigenvalues.

    ``isotropic``: both classes ``I`` (pooled; Fisher LDA is then Bayes-optimal).
    ``spiked``: a random rotation of the eigenvalues ``10^(-3 i/d)`` with four spikes of 50
    (condition number about 5e4), each class scaling them by ``1 + U(-0.5, 0.5)``.
    """
    if shape == "isotropic":
        return np.broadcast_to(np.eye(d), (2, d, d)), np.eye(d), np.ones(d)
    lam = 10.0 ** (-3.0 * np.arange(d) / d)
    lam[:4] = 50.0
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam_k = lam * (1.0 + rng.uniform(-0.5, 0.5, size=(2, d)))
    cov = np.stack([(q * lk) @ q.T for lk in lam_k])
    return cov, q, lam_k.mean(axis=0)


def make_case(cov, q, lam_p, separation: float, weights: str, rng: np.random.Generator):
    """Gaussian model, weights ``W`` (2, d) and bias ``b`` (2,) of one case."""
    d = q.shape[0]
    r = rng.standard_normal(d)
    r /= np.linalg.norm(r)
    sqrt_p = (q * np.sqrt(lam_p)) @ q.T
    diff = separation * sqrt_p @ r  # Mahalanobis distance `separation` under the pooled Sigma
    offset = np.abs(rng.standard_normal(d))  # ReLU-like common mean
    offset *= np.sqrt(lam_p.sum()) / np.linalg.norm(offset)
    means = np.stack([offset + diff / 2, offset - diff / 2])
    v = (q / lam_p) @ (q.T @ diff)  # Fisher LDA direction Sigma_p^{-1} (mu_1 - mu_2)
    W = np.stack([v / 2, -v / 2])
    if weights == "heavy":  # LDA plus Student-t (2 d.o.f.) perturbation: a few huge weights
        W = W + 0.25 * np.sqrt(np.mean(v**2)) * rng.standard_t(2.0, size=W.shape)
    vv = W[0] - W[1]
    c = -vv @ (means[0] + means[1]) / 2  # threshold half-way between the projected means
    b = np.array([c / 2, -c / 2])
    model = GaussianModel.from_params(means, cov)
    return model, W, b


def run(args: argparse.Namespace) -> pd.DataFrame:
    from tqdm.auto import tqdm

    dims = QUICK_DIMS if args.quick else tuple(args.dims)
    n_draws = args.n_draws if args.n_draws else (500 if args.quick else 2000)
    bits = list(range(1, args.max_bits + 1))
    rows = []
    grid = list(product(dims, COVARIANCES))
    bar = tqdm(total=len(grid) * len(SEPARATIONS) * len(WEIGHTS), desc="cases", disable=None)
    for case_id, (d, shape) in enumerate(grid):
        rng = np.random.default_rng([args.seed, case_id])
        cov, q, lam_p = make_covariances(d, shape, rng)
        for sep, wt in product(SEPARATIONS, WEIGHTS):
            model, W, b = make_case(cov, q, lam_p, sep, wt, rng)
            t0 = time.perf_counter()
            curve = distortion_curve(
                model,
                W,
                b,
                bits=bits,
                quantizer_options={"granularity": args.granularity},
                methods=("taylor", "moment", "mixture", "montecarlo", "actual"),
                n_draws=n_draws,
                seed=rng,
            )
            elapsed = time.perf_counter() - t0
            stats = prepare_layer(model, W, b)
            f = curve.to_frame().pivot(index="bits", columns="method")
            for bb in bits:
                r = f.loc[bb]
                mc, se = r[("distortion", "montecarlo")], r[("stderr", "montecarlo")]
                row = {
                    "d": d,
                    "covariance": shape,
                    "separation": sep,
                    "weights": wt,
                    "bits": bb,
                    "risk": curve.risk,
                    "step": r[("step_1", "taylor")],
                    "d_mc": mc,
                    "se_mc": se,
                    "d_taylor": r[("distortion", "taylor")],
                    "d_moment": r[("distortion", "moment")],
                    "d_mixture": r[("distortion", "mixture")],
                    "d_actual": r[("distortion", "actual")],
                    "spread_mc": r[("spread", "montecarlo")],
                    "spread_closed": r[("spread", "taylor")],
                    "flip_mc": r[("flip_probability", "montecarlo")],
                    "flip_se": r[("flip_stderr", "montecarlo")],
                    "flip_closed": r[("flip_probability", "taylor")],
                    "flip_actual": r[("flip_probability", "actual")],
                    "seconds": elapsed,
                    # eq. B19: high-bit limit of rel_moment; eq. B20: predicted rel_taylor
                    # (ratios minus 1, signed like rel_* = (closed - MC) / |MC|)
                    "moment_limit_rel": (stats.moment_limit_ratio() - 1) * np.sign(mc),
                    "taylor_rel_pred": stats.taylor_relative_error(
                        (r[("step_1", "taylor")], r[("step_2", "taylor")])
                    )
                    * np.sign(mc),
                    "noise_to_signal": float(
                        stats.noise_to_signal(
                            (r[("step_1", "taylor")], r[("step_2", "taylor")])
                        ).max()
                    ),
                }
                for m in METHODS:
                    row[f"rel_{m}"] = (row[f"d_{m}"] - mc) / abs(mc)
                    row[f"z_{m}"] = (row[f"d_{m}"] - mc) / se
                    row[f"ok_{m}"] = bool(
                        abs(row[f"rel_{m}"]) <= REL_TOL or abs(row[f"z_{m}"]) <= Z_TOL
                    )
                row["rel_flip"] = (row["flip_closed"] - row["flip_mc"]) / row["flip_mc"]
                row["rel_spread"] = (row["spread_closed"] - row["spread_mc"]) / row["spread_mc"]
                row["z_actual"] = (row["d_actual"] - mc) / row["spread_mc"]
                rows.append(row)
            bar.update()
    bar.close()
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, min_bits: int = 4) -> str:
    """Text of the summary tables."""
    out = []
    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", 30)
    hi = table[table["bits"] >= min_bits]
    out.append(
        f"== agreement with Monte Carlo for bits >= {min_bits} "
        f"(|rel| <= {REL_TOL:.0%} or |z| <= {Z_TOL:g}) =="
    )
    for m in METHODS:
        ok = hi[f"ok_{m}"]
        worst = hi.loc[hi[f"rel_{m}"].abs().idxmax()]
        out.append(
            f"{m:7s}: {ok.sum()}/{ok.size} agree; max |rel| = {hi[f'rel_{m}'].abs().max():.3%} "
            f"(d={worst.d}, {worst.covariance}, sep={worst.separation}, {worst.weights}, "
            f"b={worst.bits}, z={worst[f'z_{m}']:.2f})"
        )
    counts = table.groupby("bits")[[f"ok_{m}" for m in METHODS]].sum().astype(int)
    counts["cases"] = table.groupby("bits").size()
    out.append("agreeing cases by bits:\n" + counts.T.to_string())
    out.append("")
    out.append("== max |relative error| vs Monte Carlo, by bits (over the grid) ==")
    by_bits = table.groupby("bits").agg(
        taylor=("rel_taylor", lambda s: s.abs().max()),
        moment=("rel_moment", lambda s: s.abs().max()),
        mixture=("rel_mixture", lambda s: s.abs().max()),
        taylor_median=("rel_taylor", lambda s: s.abs().median()),
        moment_median=("rel_moment", lambda s: s.abs().median()),
        mixture_median=("rel_mixture", lambda s: s.abs().median()),
        flip_closed=("rel_flip", lambda s: s.abs().max()),
        spread=("rel_spread", lambda s: s.abs().max()),
        mc_rel_se=("se_mc", "size"),
    )
    by_bits["mc_rel_se"] = table.groupby("bits").apply(
        lambda g: (g["se_mc"] / g["d_mc"].abs()).median(), include_groups=False
    )
    out.append(by_bits.to_string(float_format=lambda x: f"{x:.3%}"))
    out.append("")
    out.append("== max |relative error| by case, bits >= 4 and at 2-3 bits ==")
    keys = ["d", "covariance", "weights", "separation"]
    lo = table[table["bits"].isin([2, 3])]
    case = hi.groupby(keys).agg(
        taylor_b4=("rel_taylor", lambda s: s.abs().max()),
        moment_b4=("rel_moment", lambda s: s.abs().max()),
        mixture_b4=("rel_mixture", lambda s: s.abs().max()),
        flip_b4=("rel_flip", lambda s: s.abs().max()),
    )
    case = case.join(
        lo.groupby(keys).agg(
            taylor_b23=("rel_taylor", lambda s: s.abs().max()),
            moment_b23=("rel_moment", lambda s: s.abs().max()),
            mixture_b23=("rel_mixture", lambda s: s.abs().max()),
        )
    )
    case["risk"] = table.groupby(keys)["risk"].first()
    case["moment_limit_B19"] = table.groupby(keys)["moment_limit_rel"].first()

    def first_ok(g, col):  # smallest b such that every b' >= b agrees (NaN: not even the top)
        ok = g.sort_values("bits")[col].to_numpy()[::-1]
        bits = g.sort_values("bits")["bits"].to_numpy()[::-1]
        n_ok = np.argmin(ok) if not ok.all() else ok.size
        return bits[n_ok - 1] if n_ok else np.nan

    for m in METHODS:
        case[f"{m}_ok_from"] = table.groupby(keys).apply(
            lambda g, m=m: first_ok(g, f"ok_{m}"), include_groups=False
        )
    out.append(case.to_string(float_format=lambda x: f"{x:.3g}"))
    out.append("")
    for bb in (4, 5):
        pred = table[(table["bits"] == bb) & (np.abs(table["moment_limit_rel"]) < 0.05)]
        out.append(
            f"eq. B20 check at b={bb} ({len(pred)} cases with |B19 ratio - 1| < 5 %): Taylor "
            f"relative error measured median {pred.rel_taylor.abs().median():.2%} (max "
            f"{pred.rel_taylor.abs().max():.1%}); |predicted - measured| median "
            f"{np.median(np.abs(pred.taylor_rel_pred - pred.rel_taylor)):.2%} (max "
            f"{np.max(np.abs(pred.taylor_rel_pred - pred.rel_taylor)):.1%})"
        )
    top = table[table["bits"] == table["bits"].max()]
    out.append(
        "eq. B19 check at the top bit-width: max |rel_moment - (B19 ratio - 1)| = "
        f"{np.max(np.abs(top.rel_moment - top.moment_limit_rel)):.2%}"
    )
    within = (np.abs(hi["d_actual"] - hi["d_mc"]) <= 2 * hi["spread_mc"]).mean()
    out.append(
        f"level 2 (actual rounding) within MC mean +- 2 spreads, bits >= 4: {within:.1%} of rows"
    )
    flip = table.groupby("d")["rel_flip"].agg(lambda s: s.abs().max())
    out.append(
        "max |rel| of the closed flip probability (eq. B14) vs MC, by d: "
        + ", ".join(f"d={k}: {v:.2%}" for k, v in flip.items())
    )
    out.append("")
    out.append("== signed relative error (closed - MC) / |MC| by bits, each case ==")
    piv = table.pivot_table(index=keys, columns="bits", values=[f"rel_{m}" for m in METHODS])
    out.append(piv.to_string(float_format=lambda x: f"{x:+.2f}"))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="d in {16, 128} and 500 draws")
    p.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    p.add_argument("--max-bits", type=int, default=8)
    p.add_argument("--n-draws", type=int, default=0, help="antithetic pairs (default 2000)")
    p.add_argument("--granularity", choices=("tensor", "channel"), default="tensor")
    p.add_argument("--seed", type=int, default=20210611)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    if not 1 <= args.max_bits <= 16:
        p.error(f"--max-bits must be in 1..16, got {args.max_bits}")
    table = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "table_quick.csv" if args.quick else "table.csv"
    table.to_csv(args.out / name, index=False)
    print(summarize(table))
    print(f"\nwrote {args.out / name} ({len(table)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
