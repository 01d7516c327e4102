r"""Clipping variants of a weight quantizer: measured flips against three error models.

A clipping bound below the largest weights lowers the mean squared error of a quantizer (a
smaller step for every other entry) and can still raise its flip rate: the clipped entries'
error is signed, concentrated on the largest weights and *known*, and what it does to the
decisions depends on their Jacobian weight, not on their share of the MSE
(``theory/error_models.md``, section 3). For a list of weight quantizers (*variants*: clip
ratios of the max-based step, PyTorch's full range, the ``"mse"`` range) every layer is
quantized with each, and four quantities stand side by side:

- level 4 — the quantized network, measured
  (:func:`~distortion.experiments.compare_compression.measure_compressed`);
- level 2L — the linearized network moved by the actual error (one JVP pass);
- level 3L — the first-order model with today's error model, noise of second moment
  :math:`\Delta^2/12` per entry (eq. E1), with the band of one realization (eq. L12);
- level 3C — the clipping-aware model (eq. E5–E7): the clipped entries' exact error
  :math:`D = \operatorname{clip}(w) - w` propagated through the Jacobian as a known shift of
  the logits (one JVP pass, like 2L), rounding noise :math:`(1 - \pi_c)\Delta_c^2/12` on the
  other entries through the cached Grams (:func:`shifted_distortion`), its band the same
  shift added to every cached noise realization.

Everything but the 3C columns is :func:`~distortion.experiments.compare_compression.
compare_compression` (one cell per variant, its cache of measured decisions and Grams); nothing
is fitted on the evaluation images.

numpy at import; torch where models run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from distortion.experiments.compare import Comparison
from distortion.experiments.compare_compression import CompressionCell
from distortion.results import Prediction, resolution_tolerance

__all__ = [
    "CLIPPING_COLUMNS",
    "CLIPPING_LEVEL",
    "ClippingCell",
    "ClippingComparison",
    "clipping_error_models",
    "clipping_variants",
    "compare_clipping",
    "shifted_distortion",
]

#: The clipping-aware level: its column prefix and what it is.
CLIPPING_LEVEL = {
    "L3C": "level 3C: the clipped entries' exact error as a known logit shift through the "
    "Jacobian (eq. E5, E7) plus rounding noise (1 - pi) Delta^2/12 on the other entries (E6)"
}

#: The columns a clipping comparison has beyond those of a compression comparison.
CLIPPING_COLUMNS: dict[str, str] = {
    "variant": "name of the quantizer variant (e.g. 'max x0.97', 'full', 'mse')",
    "clip_ratio": "the quantizer's clip_ratio (NaN for the 'mse' range)",
    "symmetric_range": "'narrow' codes -(2^(b-1)-1)..2^(b-1)-1 or 'full' -2^(b-1)..2^(b-1)-1",
    "clipped_fraction": "share of all quantized weights beyond the outer levels",
    "clip_error_energy": "sum over layers of ||D||^2 (D the clipped entries' error, eq. E5) "
    "over the sum of ||W_hat - W||^2",
    "shift_rms": "root mean square over samples and classes of the first-order logit shift "
    "J vec(D) of the clipped entries (eq. E7)",
    "measured_flips": "images whose decision changed (level 4)",
    **{
        f"L3C_{q}": f"level 3C: {d}"
        for q, d in {
            "flip_rate": "expected flip rate",
            "flip_rate_stderr": "integration standard error of flip_rate",
            "flip_rate_low": "lower end of the 95 % band of one realization",
            "flip_rate_high": "upper end of that band",
            "accuracy_loss": "expected accuracy loss",
            "accuracy_loss_stderr": "its standard error (NaN: not computed)",
            "accuracy_loss_low": "lower end of the band of the accuracy loss",
            "accuracy_loss_high": "upper end of that band",
            "flip_rate_abs_error": "|predicted - measured| flip rate",
            "accuracy_loss_abs_error": "|predicted - measured| accuracy loss",
            "flip_rate_in_band": "measured flip rate inside the band (resolution 1/n_eval)",
            "accuracy_loss_in_band": "measured accuracy loss inside the band",
        }.items()
    },
}

#: The levels whose flip-rate order is compared with the measured one.
ORDER_LEVELS = ("L2L", "L3L", "L3C")


# ----------------------------------------------------------------------------- variants
def clipping_variants(
    bits: int = 4,
    *,
    granularity: str = "channel",
    ratios: Sequence[float] = (1.03, 1.0, 0.97, 0.933),
    full: bool = True,
    mse: bool = True,
) -> list[tuple[str, Any]]:
    """The (name, quantizer) variants of the clipping study.

    Symmetric nearest rounding at ``bits``: the narrow grid with the max-based step times each
    ratio (``"max x<r>"``), PyTorch's full range (``"full"``) and the ``"mse"`` range.
    """
    from distortion.quantize import UniformQuantizer

    out = [
        (f"max x{r:g}", UniformQuantizer(bits, granularity=granularity, clip_ratio=float(r)))
        for r in ratios
    ]
    if full:
        out.append(("full", UniformQuantizer(bits, granularity=granularity,
                                             symmetric_range="full")))  # fmt: skip
    if mse:
        out.append(("mse", UniformQuantizer(bits, granularity=granularity, clipping="mse")))
    return out


def clipping_error_models(quantizer: Any, weights: dict[str, Any]) -> dict[str, Any]:
    """The split error model (eq. E5-E6) of every layer: ``quantizer.error_model(w,
    rule="clipping")``, by layer name."""
    return {k: quantizer.error_model(w, rule="clipping") for k, w in weights.items()}


# ----------------------------------------------------------------------------- level 3C
def shifted_distortion(
    grams: Any,
    variances: Sequence[Any],
    shift: np.ndarray,
    *,
    method: str = "radial",
    n_rotations: int = 4,
    seed: int = 0,
    band: bool = True,
    coverage: float = 0.95,
) -> Prediction:
    r"""Level 3C: the first-order flip rate with a known logit shift plus noise (eq. E7).

    Parameters
    ----------
    grams : GradientGrams
        Per-sample (per-channel) Grams of the float network.
    variances : sequence of length L
        Second moment of the *noise* part per layer, scalar or (C_l,) (eq. E6).
    shift : array of shape (N, K)
        The known first-order logit perturbation :math:`s(x_i) = \sum_\ell J_\ell(x_i)
        \operatorname{vec}(D_\ell)` (eq. E7).
    method, n_rotations, seed
        Orthant integration (:func:`~distortion.theory.multilayer.orthant_flip`).
    band : bool
        The band of one realization: the shift added to each of the R cached noise
        realizations (eq. L12); needs ``grams.projections``.
    coverage : float

    Returns
    -------
    Prediction
        Level ``"3C"``.

    Notes
    -----
    With :math:`r_i` the float decision, :math:`m_i = A_{r_i}(z(x_i) + s(x_i))` the shifted
    margins (any sign) and :math:`\eta \sim N(0, C(x_i))`, :math:`C` of eq. L4 with the noise
    variances,

    .. math:: P(\text{flip}_i) = 1 - P(m_i + A_{r_i}\eta > 0), \qquad
              \bar p = \frac1N\sum_i P(\text{flip}_i).

    A zero shift gives level 3L (:func:`~distortion.theory.multilayer.multilayer_distortion`)
    up to its integration error.
    """
    from dataclasses import replace

    from distortion.theory.multilayer import multilayer_distortion

    r = multilayer_distortion(
        grams, variances, method=method, n_rotations=n_rotations, seed=seed, band=band,
        coverage=coverage, shift=shift,
    )  # fmt: skip
    return replace(r.to_prediction(), level="3C", method=f"{method}+shift")


# ----------------------------------------------------------------------------- the cells
def _level_columns(prefix: str, p: Prediction, m: Any, n: int) -> dict[str, Any]:
    """The columns of one prediction level, as :meth:`ComparisonCell.row` writes them."""
    tol = resolution_tolerance(n)
    row = p.as_dict(prefix=f"{prefix}_")
    row[f"{prefix}_flip_rate_abs_error"] = abs(p.flip_rate - m.flip_rate)
    row[f"{prefix}_accuracy_loss_abs_error"] = abs(p.accuracy_loss - m.accuracy_loss)
    fb, lb = p.flip_rate_band, p.accuracy_loss_band
    row[f"{prefix}_flip_rate_in_band"] = (
        fb.contains(m.flip_rate, tol=tol) if np.isfinite(fb.low) else np.nan
    )
    row[f"{prefix}_accuracy_loss_in_band"] = (
        lb.contains(m.accuracy_loss, tol=tol) if np.isfinite(lb.low) else np.nan
    )
    return row


@dataclass(frozen=True)
class ClippingCell(CompressionCell):
    """A :class:`CompressionCell` with the clipping-aware level 3C (prefix ``L3C_``)."""

    def row(self) -> dict[str, Any]:
        base = super().row()
        p = self.predictions.get("L3C")
        if p is not None:
            base.update(_level_columns("L3C", p, self.measurement, int(self.key["n_eval"])))
        return base


@dataclass(frozen=True)
class ClippingComparison:
    """Measured flips of each clipping variant against levels 2L, 3L and 3C.

    Attributes
    ----------
    comparison : Comparison
        One row per variant: the compression comparison's columns and those of
        :data:`CLIPPING_COLUMNS`.
    variants : tuple of str
        The variants' names, in the order given.
    """

    comparison: Comparison
    variants: tuple[str, ...]

    @property
    def table(self) -> pd.DataFrame:
        return self.comparison.table

    def to_frame(self) -> pd.DataFrame:
        """The headline columns, one row per variant (the full table: ``.comparison``)."""
        t = self.table
        cols = ["model", "variant", "clip_ratio", "symmetric_range", "error_mean_square_actual",
                "clipped_fraction", "clip_error_energy", "shift_rms", "noise_energy_ratio",
                "n_eval",
                "measured_flips", "measured_flip_rate", "measured_flip_rate_low",
                "measured_flip_rate_high"]  # fmt: skip
        for lv in ORDER_LEVELS:
            cols += [f"{lv}_flip_rate", f"{lv}_flip_rate_low", f"{lv}_flip_rate_high"]
            if lv != "L2L":
                cols.append(f"{lv}_flip_rate_in_band")
        return t[[c for c in cols if c in t]].copy()

    def order_agreement(self, variants: Sequence[str] | None = None) -> pd.DataFrame:
        """Spearman's rank correlation of each level's flip rate with the measured one.

        Parameters
        ----------
        variants : sequence of str, optional
            Only these variants (default: all).

        Returns
        -------
        DataFrame
            One row per level of :data:`ORDER_LEVELS`: ``spearman`` (NaN for fewer than 3
            variants), ``same_order`` (the predicted and measured orders are identical,
            ties in either counted as agreement) and ``variants``.
        """
        from scipy import stats

        t = self.table
        if variants is not None:
            unknown = sorted(set(variants) - set(t["variant"]))
            if unknown:
                raise ValueError(f"no variant(s) {unknown} among {list(t['variant'])}")
            t = t[t["variant"].isin(list(variants))]
        meas = t["measured_flip_rate"].to_numpy(dtype=float)
        rows = []
        for lv in ORDER_LEVELS:
            pred = t[f"{lv}_flip_rate"].to_numpy(dtype=float)
            rho = float(stats.spearmanr(meas, pred).statistic) if len(t) >= 3 else float("nan")
            d_m = np.sign(meas[:, None] - meas[None, :])
            d_p = np.sign(pred[:, None] - pred[None, :])
            same = bool(np.all((d_m == d_p) | (d_m == 0) | (d_p == 0)))
            rows.append({"level": lv, "spearman": rho, "same_order": same,
                         "variants": len(t)})  # fmt: skip
        return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- compare
def compare_clipping(
    model: Any,
    data: Any,
    variants: Sequence[tuple[str, Any]],
    *,
    model_name: str = "",
    layers: str | Sequence[str] = "all",
    cache_dir: Any = None,
    n_realizations: int = 40,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 250,
) -> ClippingComparison:
    r"""Measure each clipping variant and predict it with levels 2L, 3L and 3C.

    Parameters
    ----------
    model : torch.nn.Module
        The float network.
    data : ImageDataset (or ``batches``, ``labels``, ``fingerprint``, ``__len__``)
        Evaluation images, labels known.
    variants : sequence of (name, UniformQuantizer)
        One row each (e.g. :func:`clipping_variants`); names must be unique.
    model_name : str
    layers : "all", "last" or sequence of str
    cache_dir : path, optional
        Grams and measured decisions are cached there (default cache otherwise).
    n_realizations : int
        Cached noise realizations behind the 3L and 3C bands.
    seed : int
    progress : bool
    batch_size : int
        Images per JVP batch (levels 2L and 3C).

    Returns
    -------
    ClippingComparison
    """
    from distortion.experiments.compare import first_order_actual_flips
    from distortion.experiments.compare_compression import compare_compression
    from distortion.experiments.models import get_layer
    from distortion.experiments.sensitivity import gradient_grams
    from distortion.quantize import UniformQuantizer

    variants = list(variants)
    if not variants:
        raise ValueError("variants is empty: pass at least one (name, UniformQuantizer)")
    for i, v in enumerate(variants):
        if not (isinstance(v, tuple | list) and len(v) == 2 and isinstance(v[0], str)
                and isinstance(v[1], UniformQuantizer)):  # fmt: skip
            raise ValueError(f"variants[{i}] must be a (name, UniformQuantizer) pair, got {v!r}")
    names_v = [v[0] for v in variants]
    if len(set(names_v)) != len(names_v):
        raise ValueError(f"variant names must be unique, got {names_v}")
    configs = [
        (name, float("nan") if q.clipping == "mse" else float(q.clip_ratio), q)
        for name, q in variants
    ]
    base = compare_compression(
        model, data, configs, model_name=model_name, layers=layers, cache_dir=cache_dir,
        n_realizations=n_realizations, seed=seed, progress=progress, baselines=False,
        batch_size=batch_size,
    )  # fmt: skip
    # the same call as compare_compression's: read back from its cache
    grams = gradient_grams(
        model, data, layers=layers, granularity="channel", n_realizations=n_realizations,
        seed=seed, cache_dir=cache_dir, progress=progress,
    )  # fmt: skip
    names = list(grams.layer_names)
    weights = {k: get_layer(model, k).weight.detach() for k in names}
    n = grams.n_samples
    band = grams.projections is not None
    from distortion.compression import realization_seed

    cells = []
    for i, ((name, q), cell) in enumerate(zip(variants, base.cells, strict=True)):
        split = clipping_error_models(q, weights)
        m2 = [split[k].second_moment for k in names]
        tangents = {k: SimpleNamespace(error=np.array(split[k].deterministic)) for k in names}
        if any(np.any(split[k].deterministic != 0) for k in names):
            z0, z1 = first_order_actual_flips(model, data, tangents, batch_size=batch_size)
            shift = z1 - z0  # (eq. E7)
        else:
            shift = np.zeros((n, grams.n_classes))
        l3c = shifted_distortion(grams, m2, shift, seed=realization_seed(seed, 5, i), band=band)
        comp = {k: q.quantize(w, seed=seed + j) for j, (k, w) in enumerate(weights.items())}
        d_energy = sum(float(np.sum(split[k].deterministic ** 2)) for k in names)
        e_energy = sum(float(np.sum(comp[k].error ** 2)) for k in names)
        n_w = sum(comp[k].clipped.size for k in names)
        diag = {
            **cell.diagnostics,
            "variant": name,
            "clip_ratio": float("nan") if q.clipping == "mse" else float(q.clip_ratio),
            "symmetric_range": q.symmetric_range,
            "clipped_fraction": sum(int(comp[k].clipped.sum()) for k in names) / n_w,
            "clip_error_energy": d_energy / e_energy if e_energy > 0 else float("nan"),
            "shift_rms": float(np.sqrt(np.mean(shift**2))),
            "measured_flips": int(round(cell.measurement.flip_rate * n)),
        }
        preds = {**cell.predictions, "L3C": l3c}
        cells.append(ClippingCell(cell.key, cell.measurement, preds, cell.sakr, cell.hawq, diag))
    return ClippingComparison(Comparison.from_cells(cells), tuple(names_v))
