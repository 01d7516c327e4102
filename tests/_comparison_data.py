"""A small synthetic comparison table with the schema of ``Comparison.table``.

Used by ``test_plotting.py`` and ``test_paper.py`` to draw every figure and table without
running the experiment. The numbers follow the shapes the theory predicts (flip rate halving
per extra bit, accuracy loss quartering) with seeded noise; they are NOT results.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["synthetic_simulation_table", "synthetic_table"]

#: Level prefixes of the last-layer rows and of the all-layer rows (``layers`` = "all").
LAST_PREFIXES = ("L1", "L2", "L3")
ALL_LAYER_PREFIXES = ("L2L", "L3L")
ALL_PREFIXES = LAST_PREFIXES + ALL_LAYER_PREFIXES
BAND = ("L3", "L3L")  # prefixes with a band of one realization
BIAS = {"L1": 1.4, "L2": 1.2, "L3": 1.05, "L2L": 1.2, "L3L": 1.05}


def synthetic_table(
    *,
    models: tuple[str, ...] = ("resnet20", "resnet56"),
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8),
    granularity: tuple[str, ...] = ("tensor", "channel"),
    n_eval: int = 500,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per model x problem x layer set x granularity x bit-width.

    Problems: ``10-class`` and ``cat-vs-dog`` for the last layer (columns ``L1_*``,
    ``L2_*``, ``L3_*``), ``10-class`` for all layers (columns ``L2L_*``, ``L3L_*``); the
    other set's columns are NaN, as in the real table. Some measured flip
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
                        "accuracy_float": 0.92, "measured_accuracy": 0.92 - ml,
                        "measured_flip_rate": mf, "measured_flip_rate_low": lo,
                        "measured_flip_rate_high": hi,
                        "measured_flip_rate_stderr": np.sqrt(mf * (1 - mf) / n_eval),
                        "measured_accuracy_loss": ml, "measured_accuracy_loss_low": ml - half,
                        "measured_accuracy_loss_high": ml + half,
                    }  # fmt: skip
                    # last layer: levels L1-L3; all layers: L2L, L3L (the linearized model);
                    # the other set's columns are NaN, as in the real table
                    for prefix in ALL_PREFIXES:
                        for q in ("flip_rate", "accuracy_loss"):
                            for suffix in ("", "_stderr", "_abs_error"):
                                row[f"{prefix}_{q}{suffix}"] = np.nan
                        for q in ("flip_rate", "accuracy_loss") if prefix in BAND else ():
                            for suffix in ("_low", "_high", "_in_band"):
                                row[f"{prefix}_{q}{suffix}"] = np.nan
                    prefixes = LAST_PREFIXES if layers == "last" else ALL_LAYER_PREFIXES
                    for prefix in prefixes:
                        bias = BIAS[prefix]
                        f_ = flip * bias * np.exp(rng.normal(0, 0.1))
                        l_ = loss * bias * np.exp(rng.normal(0, 0.1))
                        row[f"{prefix}_flip_rate"], row[f"{prefix}_accuracy_loss"] = f_, l_
                        row[f"{prefix}_flip_rate_stderr"] = 0.01 * f_
                        row[f"{prefix}_accuracy_loss_stderr"] = 0.01 * abs(l_)
                        row[f"{prefix}_flip_rate_abs_error"] = abs(f_ - mf)
                        row[f"{prefix}_accuracy_loss_abs_error"] = abs(l_ - ml)
                    band = prefixes[-1]  # L3 or L3L
                    sd = np.sqrt(flip * (1 - flip) / n_eval) * 2.0
                    f3, l3 = row[f"{band}_flip_rate"], row[f"{band}_accuracy_loss"]
                    row[f"{band}_flip_rate_low"] = max(0.0, f3 - 2 * sd)
                    row[f"{band}_flip_rate_high"] = f3 + 2 * sd
                    row[f"{band}_accuracy_loss_low"] = l3 - 2 * sd
                    row[f"{band}_accuracy_loss_high"] = l3 + 2 * sd
                    row[f"{band}_flip_rate_in_band"] = bool(f3 - 2 * sd <= mf <= f3 + 2 * sd)
                    row[f"{band}_accuracy_loss_in_band"] = bool(l3 - 2 * sd <= ml <= l3 + 2 * sd)
                    raw = 8.0 * flip**2 * 2.0**b
                    row["sakr_flip_rate_bound_raw"] = raw
                    row["sakr_flip_rate_bound"] = min(raw, 1.0)
                    row["sakr_vacuous"] = bool(raw >= 1.0)
                    row["sakr_flip_rate_abs_error"] = abs(min(raw, 1.0) - mf)
                    row["hawq_v2"] = 3.0 * loss
                    rows.append(row)
    t = pd.DataFrame(rows)
    t["bits"] = t["bits"].astype(int)
    return t


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
