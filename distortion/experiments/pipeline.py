r"""The main job: one experiment end to end, from a TOML configuration.

Stages, per model: extraction (cached), hypothesis tests, last-layer comparison (every
problem × quantizer × bit-width), all-layer comparison (gradient norms cached, real
quantization of every layer), then figures and a summary table. Each stage prints its name
and duration; a stage that fails raises :class:`StageError` naming the stage and the cause.

Everything is written under ``<results>/<experiment name>/``:

- ``comparison.csv`` / ``comparison.json`` / ``comparison_summary.csv``: every cell;
- ``hypotheses/<model>/``: the hypothesis-test tables;
- ``features/<model>.npz``: the extracted features;
- ``figures/*.png``;
- ``summary.txt``: the printed summary; ``run.json``: configuration, timings, versions.
"""

from __future__ import annotations

import json
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distortion.experiments import _paths

__all__ = [
    "ExperimentConfig",
    "ExperimentResult",
    "StageError",
    "run_experiment",
    "hypothesis_verdicts",
    "summary_table",
]

DEFAULT_CONFIG = _paths.repo_root() / "experiments" / "default.toml"


class StageError(RuntimeError):
    """A stage of the experiment failed; the message names the stage and the cause."""


@dataclass(frozen=True)
class Problem:
    """A classification problem on the model's outputs: all classes or a subset."""

    name: str
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    """Settings of an experiment (see ``experiments/default.toml``)."""

    name: str = "default"
    data_source: str = "data/cifar10/test.npz"
    n: int | None = 10000
    fit_fraction: float = 0.5
    seed: int = 0
    models: tuple[str, ...] = ("resnet20", "resnet56")
    scheme: str = "symmetric"
    clipping: str = "max"
    rounding: str = "nearest"
    granularity: tuple[str, ...] = ("tensor", "channel")
    last_layer_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    covariance: str = "class"
    n_realizations: int = 400
    problems: tuple[Problem, ...] = (Problem("10-class"), Problem("cat-vs-dog", ("cat", "dog")))
    all_layers_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    all_layers_n: int = 2000
    hypotheses_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    n_components: int = 10
    source_file: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.fit_fraction < 1.0:
            raise ValueError(f"data.fit_fraction must be in (0, 1), got {self.fit_fraction!r}")
        if not self.models:
            raise ValueError("models.names is empty: name at least one model, e.g. resnet20")
        for key in ("last_layer_bits", "all_layers_bits", "hypotheses_bits"):
            bad = [b for b in getattr(self, key) if not 1 <= int(b) <= 16]
            if bad:
                raise ValueError(f"{key} must hold bit-widths in 1..16, got {bad}")
        if self.n is not None and self.n < 20:
            raise ValueError(f"data.n must be at least 20 images, got {self.n}")
        if self.all_layers_n < 0:
            raise ValueError(f"all_layers.n must be >= 0 (0 skips), got {self.all_layers_n}")

    @classmethod
    def from_toml(cls, path: str | Path) -> ExperimentConfig:
        """Read a configuration file; unknown keys are an error (a typo would be ignored)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"no configuration file {p}: pass --config experiments/<name>.toml"
            )
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{p} is not valid TOML: {exc}") from None
        return cls.from_dict(raw, source_file=str(p))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source_file: str | None = None) -> ExperimentConfig:
        """Build from the nested dictionary of a TOML file."""
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
        kw: dict[str, Any] = {"source_file": source_file}

        def take(section: str, key: str, target: str, conv=lambda v: v) -> None:
            sec = raw.get(section, {})
            if key in sec:
                kw[target] = conv(sec.pop(key))

        if "name" in raw:
            kw["name"] = str(raw.pop("name"))
        take("data", "source", "data_source", str)
        take("data", "n", "n", lambda v: None if v in (0, None) else int(v))
        take("data", "fit_fraction", "fit_fraction", float)
        take("data", "seed", "seed", int)
        take("models", "names", "models", lambda v: tuple(map(str, v)))
        take("quantizer", "scheme", "scheme", str)
        take("quantizer", "clipping", "clipping", str)
        take("quantizer", "rounding", "rounding", str)
        take("quantizer", "granularity", "granularity",
             lambda v: (v,) if isinstance(v, str) else tuple(v))  # fmt: skip
        take("last_layer", "bits", "last_layer_bits", lambda v: tuple(map(int, v)))
        take("last_layer", "covariance", "covariance", str)
        take("last_layer", "n_realizations", "n_realizations", int)
        take("last_layer", "problems", "problems", _problems)
        take("all_layers", "bits", "all_layers_bits", lambda v: tuple(map(int, v)))
        take("all_layers", "n", "all_layers_n", int)
        take("hypotheses", "bits", "hypotheses_bits", lambda v: tuple(map(int, v)))
        take("hypotheses", "n_components", "n_components", int)
        leftover = [
            f"{s}.{k}" if isinstance(v, dict) else s
            for s, v in raw.items()
            for k in (v if isinstance(v, dict) else [None])
        ]
        if leftover:
            raise ValueError(f"unknown configuration key(s): {', '.join(sorted(leftover))}")
        return cls(**kw)

    def quantizers(self, bits: Sequence[int]):
        """The quantizer grid granularity × bits of this experiment."""
        from distortion.experiments.compare import quantizer_grid

        return quantizer_grid(bits, granularity=self.granularity, scheme=self.scheme,
                              clipping=self.clipping, rounding=self.rounding)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable settings."""
        d = asdict(self)
        d["problems"] = [asdict(p) for p in self.problems]
        return d


def _problems(items: Any) -> tuple[Problem, ...]:
    out = []
    for it in items:
        if not isinstance(it, dict) or "name" not in it:
            raise ValueError(f"each last_layer.problems entry needs a name, got {it!r}")
        classes = it.get("classes")
        out.append(Problem(str(it["name"]), None if classes is None else tuple(map(str, classes))))
    return tuple(out)


@dataclass(frozen=True)
class ExperimentResult:
    """What :func:`run_experiment` produced."""

    config: ExperimentConfig
    out_dir: Path
    comparison: Any  # Comparison
    timings: dict[str, float] = field(repr=False)
    accuracies: dict[str, float] = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """The comparison table."""
        return self.comparison.to_frame()


class _Stages:
    """Prints each stage's name and duration; wraps failures in StageError."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.i, self.timings = total, 0, {}
        self.stream = stream or sys.stderr

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.i += 1
        print(f"[{self.i}/{self.total}] {name} ...", file=self.stream, flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except (KeyboardInterrupt, StageError):
            raise
        except Exception as exc:
            raise StageError(f"stage '{name}' failed: {type(exc).__name__}: {exc}") from exc
        dt = time.perf_counter() - t0
        self.timings[name] = dt
        print(f"[{self.i}/{self.total}] {name} done in {dt:.1f} s", file=self.stream, flush=True)


def _resolve_source(source: str, data: str | None) -> str:
    """A path relative to --data / DISTORTION_DATA / ../shared, or a named dataset."""
    if source in ("cifar10", "cifar100", "imagenet"):
        return source
    p = Path(source)
    if p.is_absolute():
        return str(p)
    roots = [Path(data)] if data else []
    shared = _paths.shared_dir()
    if shared is not None:
        roots.append(shared)
    for r in roots:
        if (r / p).exists():
            return str(r / p)
        if r.is_file() or (r.suffix == ".npz" and r.exists()):
            return str(r)
    raise FileNotFoundError(
        f"data source {source!r} not found under {[str(r) for r in roots] or 'no data folder'}; "
        "pass --data PATH (a .npz file or the folder holding data/cifar10/test.npz) or set "
        "DISTORTION_DATA"
    )


def run_experiment(
    config: ExperimentConfig,
    *,
    data: str | None = None,
    weights: dict[str, str] | None = None,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    figures: bool = True,
    progress: bool = True,
    stream=None,
) -> ExperimentResult:
    """Run every stage of ``config``; return the comparison and write the results.

    Parameters
    ----------
    config : ExperimentConfig
    data : str, optional
        The data file or folder (else ``DISTORTION_DATA`` or ``../shared``).
    weights : dict of model name to checkpoint path, optional
    out_dir : path, optional
        Default ``experiments/results/<config.name>``.
    cache_dir : path, optional
        Feature and gradient caches (default ``$DISTORTION_CACHE`` or ``~/.cache/distortion``).
    figures : bool
        Draw the figures.
    progress : bool
        Progress bars.
    stream : file, optional
        Where stage messages go (default stderr).
    """
    from distortion.experiments.compare import Comparison, compare_all_layers, compare_last_layer
    from distortion.experiments.data import load_dataset
    from distortion.experiments.features import extract_features
    from distortion.experiments.hypotheses import run_hypothesis_tests
    from distortion.experiments.models import load_model

    out = Path(out_dir) if out_dir else _paths.repo_root() / "experiments" / "results" / config.name
    out.mkdir(parents=True, exist_ok=True)
    cache = _paths.cache_dir(cache_dir)
    weights = weights or {}
    n_stages = len(config.models) * (4 + (config.all_layers_n > 0)) + 1 + figures
    stage = _Stages(n_stages, stream)
    parts, accuracies, verdicts = [], {}, []
    with stage("load data"):
        source = _resolve_source(config.data_source, data)
        dataset = load_dataset(source, n=config.n)
    for name in config.models:
        with stage(f"{name}: load model and extract features"):
            model = load_model(name, weights.get(name))
            fs = extract_features(model, dataset, cache_dir=cache, progress=progress)
            (out / "features").mkdir(exist_ok=True)
            fs.save(out / "features" / f"{name}.npz")
            accuracies[name] = fs.accuracy
            first = fs.split_mask(config.fit_fraction, seed=config.seed)
            fit, evaluate = fs.select(first), fs.select(~first)
        with stage(f"{name}: hypothesis tests"):
            report = run_hypothesis_tests(
                fs, model, bits=config.hypotheses_bits, n_components=config.n_components,
                seed=config.seed, out_dir=out / "hypotheses" / name, figures=figures,
                cache_dir=cache, progress=progress,
            )  # fmt: skip
            verdicts.append(hypothesis_verdicts(report, name, config.problems))
        with stage(f"{name}: last layer, predicted vs measured"):
            for prob in config.problems:
                parts.append(
                    compare_last_layer(
                        fit,
                        evaluate,
                        config.quantizers(config.last_layer_bits),
                        model_name=name,
                        problem=prob.name,
                        classes=prob.classes,
                        covariance=config.covariance,
                        n_realizations=config.n_realizations,
                        seed=config.seed,
                    )  # fmt: skip
                )
        if config.all_layers_n > 0:
            with stage(f"{name}: all layers, predicted vs measured"):
                images = _evaluation_images(dataset, ~first, config.all_layers_n)
                parts.append(
                    compare_all_layers(
                        model,
                        images,
                        config.quantizers(config.all_layers_bits),
                        model_name=name,
                        cache_dir=cache,
                        seed=config.seed,
                        progress=progress,
                    )
                )
        with stage(f"{name}: write tables"):
            Comparison.concat(parts).save(out)
    comparison = Comparison.concat(parts)
    if figures:
        with stage("figures"):
            from distortion.plotting.compare import save_comparison_figures

            save_comparison_figures(comparison, out / "figures")
    verdict_table = pd.concat(verdicts, ignore_index=True) if verdicts else None
    if verdict_table is not None:
        verdict_table.to_csv(out / "hypothesis_verdicts.csv", index=False)
    text = summary_table(comparison, accuracies, verdict_table)
    (out / "summary.txt").write_text(text + "\n")
    meta = {"config": config.to_dict(), "timings_s": stage.timings, "accuracies": accuracies}
    (out / "run.json").write_text(json.dumps(meta, indent=1, default=str))
    return ExperimentResult(config, out, comparison, stage.timings, accuracies)


def _evaluation_images(dataset: Any, mask: np.ndarray, n: int) -> Any:
    """The first ``n`` images of ``dataset`` where ``mask`` is true (same preprocessing)."""
    from distortion.experiments.data import ImageDataset

    pos = np.flatnonzero(mask)[:n]
    if dataset.images is None:
        raise ValueError("the all-layer stage needs an in-memory dataset (.npz or CIFAR)")
    return ImageDataset.from_arrays(
        dataset.images[pos], dataset.labels[pos], class_names=dataset.class_names,
        preprocessing=dataset.preprocessing, name=f"{dataset.dataset_id}[eval:{len(pos)}]",
    )  # fmt: skip


def hypothesis_verdicts(report: Any, model: str, problems: Sequence[Problem]) -> pd.DataFrame:
    """Per model × granularity × bit-width: the share of layers whose quantization error
    fails (or is marginal for) the uniform hypothesis H_U — the last layer, and all tested
    layers — and, per problem, the share of logit margins that fail the Gaussian
    hypothesis H_G (same for every bit-width). Feeds the summary's verdict columns.
    """
    from distortion.experiments.hypotheses import ALL_LAYERS

    u = report.uniform
    per = u[u["layer"] != ALL_LAYERS]
    last = report.provenance.get("last_layer")
    g = report.gaussian
    margins = g[g["kind"] == "margin"]
    rows = []
    for (gran, bits), part in per.groupby(["granularity", "bits"], sort=True):
        for layers, sel in (("last", part[part["layer"] == last]), ("all", part)):
            if not len(sel):
                continue
            rows.append({
                "model": model, "granularity": gran, "bits": int(bits), "layers": layers,
                "problem": None, "H_U_fails": float(np.mean(sel["verdict"] == "fails")),
                "H_U_marginal": float(np.mean(sel["verdict"] == "marginal")),
                "H_U_layers": len(sel),
            })  # fmt: skip
    for prob in problems:
        sel = margins if prob.classes is None else margins[margins["class_name"].isin(prob.classes)]
        if len(sel):
            rows.append({
                "model": model, "granularity": None, "bits": None, "layers": "last",
                "problem": prob.name, "H_G_margins_fail": float(np.mean(sel["verdict"] == "fails")),
                "H_G_margins": len(sel),
            })  # fmt: skip
    return pd.DataFrame(rows)


def summary_table(
    comparison: Any,
    accuracies: dict[str, float] | None = None,
    verdicts: pd.DataFrame | None = None,
    *,
    split_bits: int = 4,
) -> str:
    """The printed summary: per model × problem × layers × granularity × bit range (below
    ``split_bits`` and from it on), the mean absolute error of each level's flip rate and of
    Sakr's bound (percentage points), the level-3 band coverage and, from ``verdicts``
    (:func:`hypothesis_verdicts`), the share of H_U failures among the quantized layers
    over those bit-widths and of H_G failures among the logit margins (last layer)."""
    s = comparison.summary(split_bits=split_bits)
    if s.empty:
        return "(no cells)"
    cols = [c for c in s.columns if c.endswith("flip_abs_error")]
    keys = ["model", "problem", "layers", "granularity", *(["bits"] if "bits" in s else [])]
    show = s[[*keys, "cells", *cols]].copy()
    for c in cols:
        show[c] = 100 * show[c]
    show = show.rename(columns={c: c.replace("_flip_abs_error", " |err| pp") for c in cols})
    if "L3_flip_in_band" in s:
        show["L3 in band"] = s["L3_flip_in_band"].map(
            lambda v: f"{100 * v:.0f} %" if pd.notna(v) else "-"
        )
    if verdicts is not None and len(verdicts):
        show["H_U fails"] = [_hu_share(verdicts, r) for r in s.itertuples()]
        show["H_G margins fail"] = [_hg_share(verdicts, r) for r in s.itertuples()]
    lines = []
    if accuracies:
        lines.append(
            "float accuracy: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in accuracies.items())
        )
    lines.append(show.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if verdicts is not None and len(verdicts):
        lines.append(
            "H_U fails: share of (quantized layer x bit-width) whose error fails the uniform "
            "hypothesis; H_G margins fail: share of logit margins failing normality (last layer)."
        )
    return "\n".join(lines)


def _bit_range(label: Any) -> tuple[int, int]:
    """``"2-3"`` -> (2, 3); ``"4"`` -> (4, 4) (the ``bits`` labels of ``summary``)."""
    lo, _, hi = str(label).partition("-")
    return int(lo), int(hi or lo)


def _hu_share(verdicts: pd.DataFrame, row: Any) -> str:
    if "H_U_fails" not in verdicts:
        return "-"
    lo, hi = _bit_range(getattr(row, "bits", "1-16"))
    v = verdicts[
        (verdicts["model"] == row.model) & (verdicts["layers"] == row.layers)
        & (verdicts["granularity"] == row.granularity) & verdicts["bits"].between(lo, hi)
    ]  # fmt: skip
    v = v.dropna(subset=["H_U_fails"])
    if not len(v):
        return "-"
    return f"{100 * np.average(v['H_U_fails'], weights=v['H_U_layers']):.0f} %"


def _hg_share(verdicts: pd.DataFrame, row: Any) -> str:
    if row.layers != "last" or "H_G_margins_fail" not in verdicts:
        return "-"
    v = verdicts[(verdicts["model"] == row.model) & (verdicts["problem"] == row.problem)]
    v = v.dropna(subset=["H_G_margins_fail"])
    return f"{100 * v['H_G_margins_fail'].iloc[0]:.0f} %" if len(v) else "-"
