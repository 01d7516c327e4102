"""A small synthetic comparison table with the schema of ``Comparison.table``.

Used by ``test_plotting.py`` and ``test_paper.py`` to draw every figure and table without
running the experiment. The numbers follow the shapes the theory predicts (flip rate halving
per extra bit, accuracy loss quartering) with seeded noise; they are NOT results.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["synthetic_simulation_table", "synthetic_table"]


def synthetic_table(
    *,
    models: tuple[str, ...] = ("resnet20", "resnet56"),
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8),
    granularity: tuple[str, ...] = ("tensor", "channel"),
    n_eval: int = 500,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per model x problem x layer set x granularity x bit-width.

    Problems: ``10-class`` and ``cat-vs-dog`` for the last layer, ``10-class`` for all
    layers (whose level-1 columns are NaN, as in the real table). Some measured flip
    rates are exactly 0 (no flip among ``n_eval`` images), as happens at 8 bits.
    """
    from scipy import stats

    rng = np.random.default_rng(seed)
    cells = [("10-class", "last", 10), ("cat-vs-dog", "last", 2), ("10-class", "all", 10)]
    rows = []
    for mi, model in enumerate(models):
        for problem, layers, k in cells:
            for g in granularity:
                scale = (0.9 if layers == "last" else 3.0) * (1.3 if g == "tensor" else 1.0)
                scale *= 1.0 + 0.2 * mi
                for b in bits:
                    flip = min(0.9, scale * 2.0 ** (-b + 1))
                    loss = 0.5 * flip**2 + 0.02 * flip
                    n_flip = rng.binomial(n_eval, flip)
                    if b == max(bits):
                        n_flip = 0
                    mf = n_flip / n_eval
                    lo = stats.beta.ppf(0.025, n_flip, n_eval - n_flip + 1) if n_flip else 0.0
                    hi = stats.beta.ppf(0.975, n_flip + 1, n_eval - n_flip)
                    ml = loss + rng.normal(0, np.sqrt(mf / n_eval) + 1e-4)
                    half = 1.96 * np.sqrt(mf / n_eval) + 1.0 / n_eval
                    row = {
                        "model": model, "problem": problem, "layers": layers, "n_classes": k,
                        "bits": b, "scheme": "symmetric", "granularity": g, "clipping": "max",
                        "rounding": "nearest", "n_eval": n_eval,
                        "measured_flip": mf, "measured_flip_lo": lo, "measured_flip_hi": hi,
                        "measured_loss": ml, "measured_loss_lo": ml - half,
                        "measured_loss_hi": ml + half,
                    }  # fmt: skip
                    for lv, bias in ((1, 1.4), (2, 1.2), (3, 1.05)):
                        if layers == "all" and lv == 1:
                            row[f"L{lv}_flip"] = np.nan
                            row[f"L{lv}_loss"] = np.nan
                            continue
                        row[f"L{lv}_flip"] = flip * bias * np.exp(rng.normal(0, 0.1))
                        row[f"L{lv}_loss"] = loss * bias * np.exp(rng.normal(0, 0.1))
                    sd = np.sqrt(flip * (1 - flip) / n_eval) * 2.0
                    row["L3_flip_lo"] = max(0.0, row["L3_flip"] - 2 * sd)
                    row["L3_flip_hi"] = row["L3_flip"] + 2 * sd
                    row["L3_loss_lo"] = row["L3_loss"] - 2 * sd
                    row["L3_loss_hi"] = row["L3_loss"] + 2 * sd
                    row["L3_flip_in_band"] = bool(row["L3_flip_lo"] <= mf <= row["L3_flip_hi"])
                    row["L3_loss_in_band"] = bool(row["L3_loss_lo"] <= ml <= row["L3_loss_hi"])
                    row["sakr_flip_bound"] = 8.0 * flip**2 * 2.0**b
                    row["hawq_v2"] = 3.0 * loss
                    for lv in (1, 2, 3):
                        row[f"L{lv}_flip_abs_error"] = abs(row[f"L{lv}_flip"] - mf)
                        row[f"L{lv}_loss_abs_error"] = abs(row[f"L{lv}_loss"] - ml)
                    row["sakr_flip_abs_error"] = abs(min(row["sakr_flip_bound"], 1.0) - mf)
                    rows.append(row)
    return pd.DataFrame(rows)


def synthetic_simulation_table(*, seed: int = 0) -> pd.DataFrame:
    """Rows shaped like ``experiments/results/simulation_binary/table.csv`` (random numbers)."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in (16, 128):
        for cov in ("isotropic", "spiked"):
            for sep in (1.0, 2.0):
                for w in ("lda", "heavy"):
                    for b in range(1, 9):
                        rt = rng.normal(0, 2.0 ** (3 - b))
                        rm = rng.normal(0, 0.02)
                        rows.append({
                            "d": d, "covariance": cov, "separation": sep, "weights": w,
                            "bits": b, "rel_taylor": rt, "rel_moment": rm,
                            "rel_flip": rng.normal(0, 0.02),
                            "ok_taylor": abs(rt) <= 0.05, "ok_moment": abs(rm) <= 0.05,
                        })  # fmt: skip
    return pd.DataFrame(rows)
