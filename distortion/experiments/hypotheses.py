r"""Run the hypothesis tests of :mod:`distortion.stats` on a network and its features.

:func:`run_hypothesis_tests` takes a :class:`~distortion.experiments.features.FeatureSet`
(and optionally the model it came from) and tests

* H_G per class on the raw penultimate features and on the logit margins
  :math:`z_k - z_j` (univariate tests with effect sizes and verdicts, Mardia and
  Henze--Zirkler on the top principal components and on the margins, Box's M for pooled
  versus per-class covariances);
* H_U for every chosen layer × bit-width × quantizer, plus a pooled row over all layers
  (each layer's error divided by its own step).

It returns a :class:`HypothesisReport` and, given ``out_dir``, writes tidy CSV files and
figures. Torch is only touched to read the model's weights, inside the function.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from distortion import stats as S
from distortion.experiments import _cache
from distortion.quantize import UniformQuantizer

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from distortion.experiments.features import FeatureSet

__all__ = ["DEFAULT_QUANTIZERS", "HypothesisReport", "run_hypothesis_tests"]

#: Default quantizers (their bit-width is replaced by each of ``bits``).
DEFAULT_QUANTIZERS: dict[str, UniformQuantizer] = {
    "per_tensor": UniformQuantizer(8, granularity="tensor"),
    "per_channel": UniformQuantizer(8, granularity="channel"),
}
#: Layer name of the row that pools the normalized errors of all tested layers.
ALL_LAYERS = "(all layers)"
_TABLES = ("gaussian", "multivariate", "covariance", "uniform")
_CACHE_VERSION = 1
#: Columns read back as text by HypothesisReport.load (a layer called "4" stays a string).
_STRING_COLUMNS = {
    c: str
    for c in ("layer", "kind", "quantizer", "granularity", "class_name", "variable", "space",
              "test", "effect_name", "verdict", "failing", "choice", "note")
}  # fmt: skip


@dataclass(frozen=True)
class HypothesisReport:
    r"""Results of :func:`run_hypothesis_tests`, as four tables.

    Attributes
    ----------
    gaussian : DataFrame
        One row per (class, kind, variable): ``kind`` is ``"feature"`` (a penultimate
        feature) or ``"margin"`` (:math:`z_k - z_j` for the samples of class k); columns of
        :meth:`distortion.stats.UnivariateNormalityResult.to_frame` plus ``class``,
        ``class_name``, ``kind``.
    multivariate : DataFrame
        One row per (class, kind, space, test): Mardia's skewness and kurtosis and
        Henze--Zirkler, on the top principal components of the features (``space="pca"``),
        on all features when the class covariance allows (``"full"``), and on the margins.
    covariance : DataFrame
        Box's M across classes, on the top principal components of the pooled within-class
        covariance and, when no class covariance is singular, on all features.
    uniform : DataFrame
        One row per (layer, quantizer, bits) with the columns of
        :meth:`distortion.stats.UniformErrorResult.to_frame`, plus a row per (quantizer,
        bits) with ``layer == "(all layers)"`` pooling every tested layer.
    provenance : dict
        Model, features checksum, options.
    """

    gaussian: pd.DataFrame  # (n_classes * (n_features + n_classes - 1), ...)
    multivariate: pd.DataFrame  # (n_rows, ...)
    covariance: pd.DataFrame  # (n_spaces, ...)
    uniform: pd.DataFrame  # (n_layers * n_quantizers * n_bits [+ pooled], ...)
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ summaries
    def gaussian_summary(self, *, by_class: bool = False) -> pd.DataFrame:
        """Verdict counts and median effect sizes per kind (features vs margins).

        Parameters
        ----------
        by_class : bool
            One row per (kind, class) instead of per kind.
        """
        keys = ["kind", "class_name"] if by_class else ["kind"]
        g = self.gaussian
        counts = pd.crosstab([g[k] for k in keys], g["verdict"])
        for v in ("holds", "marginal", "fails", "degenerate"):
            if v not in counts:
                counts[v] = 0
        counts = counts[["holds", "marginal", "fails", "degenerate"]]
        counts.columns.name = None
        med = g.assign(abs_skewness=g["skewness"].abs(), abs_kurtosis=g["excess_kurtosis"].abs())
        med = med.groupby(keys)[["abs_skewness", "abs_kurtosis", "wasserstein"]].median()
        med.columns = ["median_abs_skewness", "median_abs_excess_kurtosis", "median_wasserstein"]
        out = counts.join(med)
        out.insert(0, "n_variables", counts.sum(axis=1))
        return out.reset_index()

    def uniform_summary(self) -> pd.DataFrame:
        """Verdicts per bit-width: last layer and pooled over layers, per quantizer.

        Returns
        -------
        DataFrame
            Index ``bits``; columns ``(quantizer, scope)`` with scope ``"last layer"``,
            ``"all layers (pooled)"`` and ``"layers holding/marginal/failing"`` (counts).
        """
        u = self.uniform
        last = self.provenance.get("last_layer")
        per_layer = u[u["layer"] != ALL_LAYERS]
        cols = {}
        for q in dict.fromkeys(u["quantizer"]):
            uq = u[u["quantizer"] == q]
            if last is not None and (uq["layer"] == last).any():
                cols[(q, "last layer")] = uq[uq["layer"] == last].set_index("bits")["verdict"]
            pooled = uq[uq["layer"] == ALL_LAYERS]
            if len(pooled):
                cols[(q, "all layers (pooled)")] = pooled.set_index("bits")["verdict"]
            pl = per_layer[per_layer["quantizer"] == q]
            counts = pd.crosstab(pl["bits"], pl["verdict"])
            cols[(q, "layers h/m/f")] = pd.Series(
                {
                    b: "/".join(
                        str(int(counts.loc[b].get(v, 0))) for v in ("holds", "marginal", "fails")
                    )
                    for b in counts.index
                }
            )
        out = pd.DataFrame(cols)
        out.index.name = "bits"
        return out

    # ------------------------------------------------------------------ tidy form, I/O
    def to_frame(self) -> pd.DataFrame:
        """All results in long (tidy) form: one row per (table, unit, quantity).

        Columns: ``hypothesis`` (``"H_G"``/``"H_U"``), ``table``, ``class_name``, ``kind``,
        ``variable`` (a feature, margin, space or test), ``layer``, ``quantizer``, ``bits``,
        ``quantity``, ``value``, ``verdict`` (of the unit, when it has one).
        """
        frames = []
        specs = {
            "gaussian": ("H_G", ["class_name", "kind", "variable"]),
            "multivariate": ("H_G", ["class_name", "kind", "space", "test"]),
            "covariance": ("H_G", ["space", "test"]),
            "uniform": ("H_U", ["layer", "quantizer", "bits"]),
        }
        id_cols = ["class_name", "kind", "variable", "layer", "quantizer", "bits"]
        for name, (hyp, keys) in specs.items():
            df = getattr(self, name).copy()
            if df.empty:
                continue
            if name == "multivariate":
                df["variable"] = df["space"] + ":" + df["test"]
            elif name == "covariance":
                df["variable"] = df["space"] + ":" + df["test"]
            verdict = df["verdict"] if "verdict" in df else pd.Series(None, index=df.index)
            numeric = [
                c
                for c in df.columns
                if c not in keys + id_cols + ["verdict", "class"]
                and pd.api.types.is_numeric_dtype(df[c])
            ]
            ids = df.reindex(columns=id_cols).assign(verdict=verdict.values)
            long = pd.concat([ids, df[numeric]], axis=1).melt(
                id_vars=[*id_cols, "verdict"], var_name="quantity", value_name="value"
            )
            long.insert(0, "table", name)
            long.insert(0, "hypothesis", hyp)
            frames.append(long)
        cols = ["hypothesis", "table", *id_cols, "quantity", "value", "verdict"]
        if not frames:
            return pd.DataFrame(columns=cols)
        return pd.concat(frames, ignore_index=True)[cols]

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``hypotheses_<table>.csv`` for each table, the tidy ``hypotheses.csv`` and
        ``hypotheses.json`` (provenance) into ``out_dir``; return the folder."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in _TABLES:
            text = getattr(self, name).to_csv(index=False)
            _cache.atomic_write_text(out / f"hypotheses_{name}.csv", text)
        _cache.atomic_write_text(out / "hypotheses.csv", self.to_frame().to_csv(index=False))
        prov = json.dumps(_cache.jsonable(self.provenance), indent=2)
        _cache.atomic_write_text(out / "hypotheses.json", prov)
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> HypothesisReport:
        """Read a report written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            A table is missing.
        ValueError
            A file is unreadable or garbled (the message names it).
        """
        out = Path(out_dir)
        missing = [n for n in _TABLES if not (out / f"hypotheses_{n}.csv").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{out} holds no saved hypothesis report (missing "
                f"{', '.join(f'hypotheses_{n}.csv' for n in missing)}); run "
                "run_hypothesis_tests(..., out_dir=...) first"
            )
        tables = {}
        for n in _TABLES:
            file = out / f"hypotheses_{n}.csv"
            try:
                tables[n] = _read_table(file)
            except (OSError, ValueError, pd.errors.ParserError) as exc:
                raise ValueError(f"cannot read {str(file)!r}: {exc}") from exc
        prov_file = out / "hypotheses.json"
        prov = {}
        if prov_file.is_file():
            try:
                prov = json.loads(prov_file.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read {str(prov_file)!r}: {exc}") from exc
            if not isinstance(prov, dict):
                raise ValueError(f"{str(prov_file)!r} does not hold a JSON object")
        return cls(**tables, provenance=prov)


def _read_table(source: Any) -> pd.DataFrame:
    """A table written by :meth:`HypothesisReport.save` (a path or a text buffer)."""
    try:
        table = pd.read_csv(source, dtype=_STRING_COLUMNS)
    except pd.errors.EmptyDataError:
        table = pd.DataFrame()
    if "failing" in table:
        table["failing"] = table["failing"].fillna("")
    return table


def _encode_report(report: HypothesisReport) -> dict[str, Any]:
    """The cache record of a report: its tables as CSV text, and its provenance."""
    tables = {n: getattr(report, n).to_csv(index=False) for n in _TABLES}
    return {"tables": tables, "provenance": _cache.jsonable(report.provenance)}


def _decode_report(record: dict[str, Any]) -> HypothesisReport:
    tables = {n: _read_table(io.StringIO(record["tables"][n])) for n in _TABLES}
    if not isinstance(record["provenance"], dict):
        raise ValueError("the provenance is not a JSON object")
    return HypothesisReport(**tables, provenance=record["provenance"])


# ---------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------


def _check_feature_set(fs: Any) -> None:
    for attr in ("features", "labels", "logits", "W", "b", "class_names"):
        if not hasattr(fs, attr):
            raise ValueError(
                f"feature_set must be a FeatureSet (see extract_features); it has no {attr!r}"
            )


def _normalize_bits(bits: Any) -> tuple[int, ...]:
    if isinstance(bits, int | np.integer):
        bits = [bits]
    try:
        out = tuple(int(b) for b in bits)
    except (TypeError, ValueError):
        raise ValueError(f"bits must be an int or a sequence of ints, got {bits!r}") from None
    if not out or any(not 1 <= b <= 16 for b in out):
        raise ValueError(f"bits must be in 1..16, got {bits!r}")
    return out


def _normalize_quantizers(quantizers: Any) -> dict[str, UniformQuantizer]:
    if quantizers is None:
        return dict(DEFAULT_QUANTIZERS)
    if isinstance(quantizers, UniformQuantizer):
        quantizers = [quantizers]
    if isinstance(quantizers, Mapping):
        items = list(quantizers.items())
    else:
        items = [(f"{q.scheme}-{q.granularity}-{q.clipping}-{q.rounding}", q) for q in quantizers]
    if not items:
        raise ValueError("quantizers must name at least one UniformQuantizer")
    for label, q in items:
        if not isinstance(q, UniformQuantizer):
            raise ValueError(
                f"quantizers must hold UniformQuantizer objects, got {type(q).__name__} "
                f"for {label!r}"
            )
    return {str(k): v for k, v in items}


def _layer_weights(
    feature_set: FeatureSet, model: nn.Module | None, layers: Any
) -> tuple[list[tuple[str, str, np.ndarray]], str]:
    """[(name, kind, weight as float64 numpy)], and the name of the last linear layer."""
    if model is None:
        name = str(feature_set.provenance.get("last_linear", "last"))
        if not (isinstance(layers, str) and layers in ("all", "last")) and list(layers) != [name]:
            raise ValueError(
                f"layers={layers!r} needs the model: without it only the last layer "
                f"({name!r}, from feature_set.W) can be tested; pass model= or layers='last'"
            )
        return [(name, "linear", np.asarray(feature_set.W, dtype=np.float64))], name

    from distortion.experiments.models import get_layer, last_linear, quantizable_layers

    infos = quantizable_layers(model)
    last = last_linear(model).name
    if isinstance(layers, str):
        if layers == "all":
            chosen = [(li.name, li.kind) for li in infos]
        elif layers == "last":
            chosen = [(last, "linear")]
        else:
            raise ValueError(f"layers must be 'all', 'last' or a list of names, got {layers!r}")
    else:
        kinds = {li.name: li.kind for li in infos}
        chosen = []
        for name in layers:
            if name not in kinds:
                get_layer(model, name)  # raises a ValueError that lists the layers
                raise ValueError(f"layer {name!r} is not a convolution or linear layer")
            chosen.append((name, kinds[name]))
        if not chosen:
            raise ValueError("layers must name at least one layer")
    out = []
    for name, kind in chosen:
        w = get_layer(model, name).weight.detach().cpu().double().numpy()
        out.append((name, kind, w))
    return out, last


def _code_files() -> list[Path]:
    """The source files whose code computes a report (part of its cache key)."""
    from distortion import quantize

    files = [Path(sys.modules[__name__].__file__), Path(quantize.__file__)]
    stats = Path(S.__file__)
    files += sorted(stats.parent.rglob("*.py")) if stats.name == "__init__.py" else [stats]
    return files


_KEY_ARRAYS = ("features", "labels", "logits", "W", "b")


def _cache_key(feature_set: FeatureSet, weights: list, options: dict[str, Any]) -> str:
    root = Path(S.__file__).parents[2]
    return _cache.content_key(
        {"cache": "hypotheses", "version": _CACHE_VERSION},
        {str(f.relative_to(root)): f.read_bytes() for f in _code_files()},
        {a: np.asarray(getattr(feature_set, a)) for a in _KEY_ARRAYS},
        [[name, kind, np.asarray(w)] for name, kind, w in weights],
        _cache.jsonable(options),
    )


def _gaussian_tables(
    feature_set: FeatureSet, *, n_components: int, alpha: float, bar: Any
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    x_all = np.asarray(feature_set.features, dtype=np.float64)
    y = np.asarray(feature_set.labels)
    z = np.asarray(feature_set.logits, dtype=np.float64)
    names = [str(c) for c in feature_set.class_names]
    d = x_all.shape[1]
    feat_names = [f"x{j}" for j in range(d)]
    uni, multi = [], []
    for k in np.unique(y):
        k = int(k)
        xk = x_all[y == k]
        mk = S.logit_margins(z, y, k)
        margin_names = [f"z[{names[k]}]-z[{names[j]}]" for j in range(len(names)) if j != k]
        for kind, data, cols in (("feature", xk, feat_names), ("margin", mk, margin_names)):
            if data.shape[0] < 20:
                continue
            r = S.univariate_normality(data, names=cols, alpha=alpha).to_frame()
            r.insert(0, "kind", kind)
            r.insert(0, "class_name", names[k])
            r.insert(0, "class", k)
            uni.append(r)
            spaces: list[tuple[str, int | None]] = []
            if kind == "feature" and d > n_components:
                spaces.append(("pca", n_components))
            spaces.append(("full", None))
            for space, m in spaces:
                try:
                    mv = S.multivariate_normality(data, n_components=m).to_frame()
                except ValueError as exc:  # too few samples for the rank
                    mv = pd.DataFrame({"test": ["mardia_skewness"], "space": [space],
                                       "note": [str(exc)]})  # fmt: skip
                mv.insert(0, "kind", kind)
                mv.insert(0, "class_name", names[k])
                mv.insert(0, "class", k)
                multi.append(mv)
        bar.update(1)
    cov = []
    m = min(n_components, d)
    for space, nc in (("pca", m), ("full", None)):
        try:
            cov.append(S.box_m_test(x_all, y, n_components=nc).to_frame())
        except ValueError as exc:
            cov.append(pd.DataFrame({"test": ["box_m"], "space": [space], "note": [str(exc)]}))
    return (
        pd.concat(uni, ignore_index=True) if uni else pd.DataFrame(),
        pd.concat(multi, ignore_index=True) if multi else pd.DataFrame(),
        pd.concat(cov, ignore_index=True),
    )


def _uniform_table(
    weights: list[tuple[str, str, np.ndarray]],
    quantizers: dict[str, UniformQuantizer],
    bits: tuple[int, ...],
    *,
    alpha: float,
    seed: int,
    bar: Any,
) -> pd.DataFrame:
    rows = []
    for qi, (label, q0) in enumerate(quantizers.items()):
        for b in bits:
            q = q0.with_bits(b)
            pooled_u, pooled_t, clipped, total = [], [], 0.0, 0
            for li, (name, kind, w) in enumerate(weights):
                qt = q.quantize(w, seed=seed + 7919 * (qi * 64 + li) + b)
                r = S.uniform_error_tests(w, qt, alpha=alpha)
                row = r.to_frame()
                row.insert(0, "bits", b)
                row.insert(0, "granularity", q.granularity)
                row.insert(0, "quantizer", label)
                row.insert(0, "n_weights", w.size)
                row.insert(0, "kind", kind)
                row.insert(0, "layer", name)
                rows.append(row)
                step = np.asarray(qt.step, dtype=np.float64)
                delta = step if step.ndim == 0 else step.reshape((-1,) + (1,) * (w.ndim - 1))
                delta = np.broadcast_to(delta, w.shape)
                keep = delta > 0
                pooled_u.append(qt.error[keep] / delta[keep])
                pooled_t.append(w[keep] / delta[keep])
                clipped += qt.clipped_fraction * w.size
                total += w.size
                bar.update(1)
            if len(weights) > 1:
                r = S.uniform_error_statistics(
                    np.concatenate(pooled_t),
                    np.concatenate(pooled_u),
                    1.0,
                    clipped_fraction=clipped / total,
                    use_characteristic_function=q.rounding == "nearest",
                    alpha=alpha,
                )
                row = r.to_frame()
                row.insert(0, "bits", b)
                row.insert(0, "granularity", q.granularity)
                row.insert(0, "quantizer", label)
                row.insert(0, "n_weights", total)
                row.insert(0, "kind", "pooled")
                row.insert(0, "layer", ALL_LAYERS)
                rows.append(row)
    return pd.concat(rows, ignore_index=True)


def run_hypothesis_tests(
    feature_set: FeatureSet,
    model: nn.Module | None = None,
    *,
    layers: Literal["all", "last"] | Sequence[str] = "all",
    bits: Sequence[int] | int = range(2, 9),
    quantizers: Mapping[str, UniformQuantizer] | Sequence[UniformQuantizer] | None = None,
    n_components: int = 10,
    alpha: float = 0.05,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    figures: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> HypothesisReport:
    r"""Test H_G on the features and margins and H_U on the model's layers.

    Parameters
    ----------
    feature_set : FeatureSet
        Features, labels, logits and last layer (``W``, ``b``) of the network.
    model : torch.nn.Module, optional
        The network, to test H_U on its other layers. Without it only the last layer
        (``feature_set.W``) is tested.
    layers : {"all", "last"} or sequence of str, default "all"
        Layers whose quantization error is tested (names as in
        :func:`~distortion.experiments.models.quantizable_layers`).
    bits : int or sequence of int, default 2..8
        Bit-widths.
    quantizers : mapping of label to UniformQuantizer, or a sequence of them, optional
        Quantizer configurations; their own bit-width is replaced by each of ``bits``.
        Default :data:`DEFAULT_QUANTIZERS` (symmetric, max clipping, round to nearest, per
        tensor and per channel).
    n_components : int, default 10
        Principal components for the multivariate tests on the features and Box's M.
    alpha : float, default 0.05
        Level of the tests that gate the verdicts.
    seed : int, default 0
        Seed of stochastic or dithered rounding (each layer/bit-width gets its own stream).
    out_dir : path, optional
        Write the CSV files (:meth:`HypothesisReport.save`) and, with ``figures``, PNG
        figures there.
    figures : bool, default True
        Draw figures into ``out_dir`` (Q--Q plots of margins and features, error
        histograms of the last layer, verdict heatmaps).
    cache_dir : path, optional
        Cache the report there (``hypotheses/<key>.json``), keyed by the features, the
        tested weights, the options and the source of the code that computes it (sha256); a
        later call with the same inputs reads it back. An unusable cache file (unreadable,
        truncated, garbled) is recomputed and overwritten after a
        :class:`~distortion.experiments._cache.CacheWarning`.
    progress : bool, default True
        Show a tqdm progress bar.

    Returns
    -------
    HypothesisReport

    Examples
    --------
    >>> report = run_hypothesis_tests(fs, model, bits=[4, 8])  # doctest: +SKIP
    >>> report.uniform_summary()  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    _check_feature_set(feature_set)
    bits = _normalize_bits(bits)
    quantizers = _normalize_quantizers(quantizers)
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    weights, last = _layer_weights(feature_set, model, layers)

    options = {
        "layers": [w[0] for w in weights],
        "bits": list(bits),
        "quantizers": {k: q.__dict__ for k, q in quantizers.items()},
        "n_components": n_components,
        "alpha": alpha,
        "seed": seed,
    }
    fs_prov = getattr(feature_set, "provenance", None) or {}
    provenance = {
        "model": fs_prov.get("model"),
        "features_checksum": feature_set.checksum() if hasattr(feature_set, "checksum") else None,
        "last_layer": last,
        "n_samples": int(len(feature_set.labels)),
        **options,
    }

    def compute() -> HypothesisReport:
        n_classes = len(np.unique(np.asarray(feature_set.labels)))
        total = n_classes + len(weights) * len(quantizers) * len(bits)
        with tqdm(total=total, desc="hypothesis tests", disable=not progress) as bar:
            gauss, multi, cov = _gaussian_tables(
                feature_set, n_components=n_components, alpha=alpha, bar=bar
            )
            uni = _uniform_table(weights, quantizers, bits, alpha=alpha, seed=seed, bar=bar)
        return HypothesisReport(gauss, multi, cov, uni, provenance=provenance)

    if cache_dir is None:
        report = compute()
    else:  # <cache_dir>/hypotheses/<key>.json; an unusable file: a CacheWarning, recomputed
        key = _cache_key(feature_set, weights, options)
        provenance["cache_key"] = key
        report = _cache.cached_json(
            cache_dir, "hypotheses", key, compute, encode=_encode_report, decode=_decode_report
        )
    if out_dir is not None:
        report.save(out_dir)
        if figures:
            _figures(report, feature_set, weights, quantizers, bits, Path(out_dir), seed)
    return report


def _figures(
    report: HypothesisReport,
    feature_set: FeatureSet,
    weights: list[tuple[str, str, np.ndarray]],
    quantizers: dict[str, UniformQuantizer],
    bits: tuple[int, ...],
    out: Path,
    seed: int,
) -> None:
    """Q-Q grids (margins, most non-Gaussian features), error histograms, verdict maps."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from distortion.plotting import hypotheses as P

    y = np.asarray(feature_set.labels)
    z = np.asarray(feature_set.logits, dtype=np.float64)
    x = np.asarray(feature_set.features, dtype=np.float64)
    names = [str(c) for c in feature_set.class_names]
    classes = [int(k) for k in np.unique(y)][:10]
    ncol = min(5, len(classes))
    nrow = int(np.ceil(len(classes) / ncol))

    # Q-Q of the margin to the closest competitor (smallest median margin) per class
    fig, axes = plt.subplots(nrow, ncol, figsize=(3 * ncol, 3 * nrow), squeeze=False)
    for ax, k in zip(axes.ravel(), classes, strict=False):
        m = S.logit_margins(z, y, k)
        others = [j for j in range(z.shape[1]) if j != k]
        c = int(np.argmin(np.median(m, axis=0)))
        P.plot_qq(S.qq_data(m[:, c], name=f"z[{names[k]}]-z[{names[others[c]]}]"), ax=ax)
    for ax in axes.ravel()[len(classes) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out / "qq_margins.png", dpi=120)
    plt.close(fig)

    # Q-Q of the feature with the largest Wasserstein distance per class
    g = report.gaussian
    fig, axes = plt.subplots(nrow, ncol, figsize=(3 * ncol, 3 * nrow), squeeze=False)
    for ax, k in zip(axes.ravel(), classes, strict=False):
        gk = g[(g["class"] == k) & (g["kind"] == "feature")].dropna(subset=["wasserstein"])
        if gk.empty:
            ax.set_visible(False)
            continue
        var = gk.loc[gk["wasserstein"].idxmax(), "variable"]
        j = int(str(var).lstrip("x"))
        P.plot_qq(S.qq_data(x[y == k, j], name=f"{names[k]}: {var}"), ax=ax)
    for ax in axes.ravel()[len(classes) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out / "qq_features.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    P.plot_gaussian_effects(report.gaussian, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "gaussian_effects.png", dpi=120)
    plt.close(fig)

    # error histograms of the last tested layer, first quantizer, each bit-width
    name, _, w = weights[-1]
    label, q0 = next(iter(quantizers.items()))
    fig, axes = plt.subplots(1, len(bits), figsize=(2.6 * len(bits), 2.6), squeeze=False)
    for ax, b in zip(axes.ravel(), bits, strict=True):
        qt = q0.with_bits(b).quantize(w, seed=seed)
        P.plot_error_histogram(w, qt, ax=ax)
        ax.set_title(f"{name}, {b} bits", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "error_histograms.png", dpi=120)
    plt.close(fig)

    for label in quantizers:
        n_layers = report.uniform["layer"].nunique()
        fig, ax = plt.subplots(figsize=(1 + 0.5 * len(bits), 1 + 0.22 * n_layers))
        P.plot_uniform_verdicts(report.uniform, quantizer=label, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"uniform_verdicts_{label}.png", dpi=120)
        plt.close(fig)
