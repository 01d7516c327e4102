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
- ``summary.txt``: the printed summary; ``run.json``: configuration and timings (``runs``:
  every run into the folder, so the cold timings of the first are kept);
- ``hypothesis_verdicts.csv``: the verdicts behind the summary's H_U / H_G columns;
- ``columns.md``: what every column of the CSV files and of the summary means.

The configuration is checked as a whole (:class:`ExperimentConfig`), and the data path,
checkpoints and results folder before the first stage, so that a mistake fails at once.
"""

from __future__ import annotations

import io
import json
import re
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
from distortion.experiments.compare_activations import ActivationStudy

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


#: Sections and keys of a configuration file (``""``: the top level), for error messages.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "": ("name", "stages", "data", "models", "quantizer", "last_layer", "all_layers",
         "hypotheses", "activations", "compression"),
    "data": ("source", "n", "fit_fraction", "seed"),
    "models": ("names",),
    "quantizer": ("scheme", "clipping", "rounding", "granularity", "symmetric_range", "clip_ratio"),
    "last_layer": ("bits", "covariance", "n_realizations", "problems"),
    "all_layers": ("bits", "n", "dither_realizations", "dither_bits", "competitors",
                   "bias_correction", "input_noise", "smoothed_probes", "smoothed_bits"),
    "hypotheses": ("bits", "n_components", "layers"),
    "activations": ("n", "calibration", "grid", "granularity", "int8"),
    "compression": ("n", "families", "max_flip_rate"),
}

#: The stages a configuration may run (``stages``; default all of them). The activation stage
#: runs only where ``activations.n > 0``, the all-layer stage where ``all_layers.n > 0``.
STAGES = ("hypotheses", "last_layer", "all_layers", "activations", "compression")

#: Backends whose real int8 model the activation stage may convert (torch.ao).
INT8_BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")

#: Field of :class:`ExperimentConfig` -> its key in the TOML file (named in error messages).
_TOML_KEY: dict[str, str] = {
    "name": "name", "data_source": "data.source", "n": "data.n",
    "fit_fraction": "data.fit_fraction", "seed": "data.seed", "models": "models.names",
    "scheme": "quantizer.scheme", "clipping": "quantizer.clipping",
    "rounding": "quantizer.rounding", "granularity": "quantizer.granularity",
    "symmetric_range": "quantizer.symmetric_range", "clip_ratio": "quantizer.clip_ratio",
    "last_layer_bits": "last_layer.bits", "covariance": "last_layer.covariance",
    "n_realizations": "last_layer.n_realizations", "problems": "last_layer.problems",
    "all_layers_bits": "all_layers.bits", "all_layers_n": "all_layers.n",
    "all_layers_dither": "all_layers.dither_realizations",
    "all_layers_dither_bits": "all_layers.dither_bits",
    "all_layers_competitors": "all_layers.competitors",
    "all_layers_bias_correction": "all_layers.bias_correction",
    "all_layers_input_noise": "all_layers.input_noise",
    "all_layers_smoothed": "all_layers.smoothed_probes",
    "all_layers_smoothed_bits": "all_layers.smoothed_bits",
    "hypotheses_bits": "hypotheses.bits", "n_components": "hypotheses.n_components",
    "hypotheses_layers": "hypotheses.layers", "stages": "stages",
    "activations_n": "activations.n", "activations_calibration": "activations.calibration",
    "activations_grid": "activations.grid", "activations_granularity": "activations.granularity",
    "activations_int8": "activations.int8", "compression_n": "compression.n",
    "compression_families": "compression.families",
    "compression_max_flip_rate": "compression.max_flip_rate",
}  # fmt: skip


def parse_wa_cell(key: str, cell: Any) -> tuple[int, int]:
    """``"W8A4"`` -> (8, 4): weight and activation bits of a W+A cell, each in 2..16."""
    m = re.fullmatch(r"W(\d+)A(\d+)", cell) if isinstance(cell, str) else None
    if m is None or not all(2 <= int(b) <= 16 for b in m.groups()):
        raise ValueError(
            f"{key} holds W+A cells like \"W8A8\" or \"W4A8\" (weight and activation bits, "
            f"each 2..16), got {cell!r}"
        )
    return int(m.group(1)), int(m.group(2))

#: Realizations a 95 % band needs: its 2.5 % and 97.5 % quantiles must be two distinct draws.
MIN_BAND_REALIZATIONS = 39

_COVARIANCES = ("class", "pooled")

#: Classes above which the per-sample K x K matrices of a stage are out of reach: the
#: all-layer Grams (eq. L3; unless ``all_layers.competitors`` keeps a few classes per image)
#: and the last layer's closed-form Grams behind Sakr's bound. Such stages are skipped with
#: a message saying so (ImageNet: K = 1000).
MAX_DENSE_CLASSES = 100

#: Images per batch of the sharded extraction and measurement of ``distortion run
#: --distributed`` (also the alignment of the shards: 1 and N processes give the same bits).
DISTRIBUTED_BATCH_SIZE = 50

#: Images of one class from which the hypothesis stage tests its features and margins for
#: normality (``hypotheses._gaussian_tables``); without such a class there are no figures.
_MIN_NORMALITY_IMAGES = 20


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _check_int(key: str, v: Any, lo: int, what: str = "") -> int:
    if not _is_int(v):
        raise ValueError(f"{key} must be an integer{what}, got {v!r} ({type(v).__name__})")
    if v < lo:
        raise ValueError(f"{key} must be an integer >= {lo}{what}, got {v!r}")
    return int(v)


def _check_str(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{key} must be a non-empty string, got {v!r}")
    return v


def _check_choice(key: str, v: Any, choices: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def _check_list(key: str, v: Any, example: str) -> tuple[Any, ...]:
    """A list (or tuple) of items, never a bare string or number (which would be split)."""
    if isinstance(v, str) or not isinstance(v, list | tuple):
        raise ValueError(f"{key} must be a list, e.g. {key.rpartition('.')[2]} = {example}, "
                         f"got {v!r}")  # fmt: skip
    if not v:
        raise ValueError(f"{key} is empty; give at least one value, e.g. {example}")
    return tuple(v)


def _check_bits(key: str, v: Any) -> tuple[int, ...]:
    bits = _check_list(key, v, "[2, 4, 8]")
    bad = [b for b in bits if not _is_int(b) or not 1 <= b <= 16]
    if bad:
        raise ValueError(f"{key} must hold integer bit-widths in 1..16, got {bad}")
    if len(set(bits)) != len(bits):
        raise ValueError(f"{key} repeats a bit-width: {list(bits)}")
    return tuple(int(b) for b in bits)


def known_class_names(models: Sequence[str]) -> tuple[str, ...] | None:
    """The class names of the models' dataset when known without loading it (CIFAR-10)."""
    from distortion.experiments.data import CIFAR10_CLASSES
    from distortion.experiments.models import MODELS

    datasets = {MODELS[m].dataset for m in models if m in MODELS}
    return CIFAR10_CLASSES if datasets == {"cifar10"} else None


@dataclass(frozen=True)
class ExperimentConfig:
    """Settings of an experiment (see ``experiments/default.toml``).

    Every setting is checked on construction (type, range, known names), so that a broken
    configuration fails at once, naming its TOML key, not after minutes of extraction.
    """

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
    symmetric_range: str = "narrow"
    clip_ratio: float = 1.0
    last_layer_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    covariance: str = "class"
    n_realizations: int = 400
    problems: tuple[Problem, ...] = (Problem("10-class"), Problem("cat-vs-dog", ("cat", "dog")))
    all_layers_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    all_layers_n: int = 2000
    all_layers_dither: int = 0
    all_layers_dither_bits: tuple[int, ...] | None = None
    all_layers_competitors: int | None = None
    all_layers_bias_correction: int = 0
    all_layers_input_noise: int = 0
    all_layers_smoothed: int = 0
    all_layers_smoothed_bits: tuple[int, ...] | None = None
    hypotheses_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    n_components: int = 10
    hypotheses_layers: str = "all"
    stages: tuple[str, ...] = STAGES
    activations_n: int = 0
    activations_calibration: int = 500
    activations_grid: tuple[str, ...] = ("W8A8", "W6A6", "W4A8", "W8A4", "W4A4")
    activations_granularity: tuple[str, ...] = ("tensor", "channel")
    activations_int8: tuple[str, ...] = ("x86",)
    compression_n: int = 0
    compression_families: tuple[str, ...] | None = None  # None: every family
    compression_max_flip_rate: float = 0.2
    source_file: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        from distortion.experiments.models import MODELS
        from distortion.quantize import _CLIPPINGS, _GRANULARITIES, _ROUNDINGS, _SCHEMES

        k = _TOML_KEY
        set_ = object.__setattr__
        _check_str(k["name"], self.name)
        if any(c in self.name for c in "/\\") or self.name in (".", ".."):
            raise ValueError(f"name must be a plain folder name (no '/'), got {self.name!r}")
        _check_str(k["data_source"], self.data_source)
        if self.n is not None:
            _check_int(k["n"], self.n, 20, " (images; 0 keeps every image)")
        ff = self.fit_fraction
        if not isinstance(ff, float | int) or isinstance(ff, bool) or not 0.0 < ff < 1.0:
            raise ValueError(f"{k['fit_fraction']} must be a number in (0, 1), got {ff!r}")
        set_(self, "fit_fraction", float(ff))
        _check_int(k["seed"], self.seed, 0)
        if isinstance(self.models, list | tuple) and not self.models:
            raise ValueError("models.names is empty: name at least one model, e.g. resnet20")
        models = _check_list(k["models"], self.models, '["resnet20"]')
        for m in models:
            if not isinstance(m, str) or m not in MODELS:
                raise ValueError(f"{k['models']}: unknown model {m!r}; choose from "
                                 f"{', '.join(MODELS)}")  # fmt: skip
        if len(set(models)) != len(models):
            raise ValueError(f"{k['models']} repeats a model: {list(models)}")
        set_(self, "models", models)
        _check_choice(k["scheme"], self.scheme, _SCHEMES)
        _check_choice(k["clipping"], self.clipping, _CLIPPINGS)
        _check_choice(k["rounding"], self.rounding, _ROUNDINGS)
        from distortion.quantize import UniformQuantizer

        try:  # the quantizer's own checks (range of clip_ratio, full range needs symmetric)
            UniformQuantizer(
                8, scheme=self.scheme, clipping=self.clipping,
                symmetric_range=self.symmetric_range, clip_ratio=self.clip_ratio,
            )  # fmt: skip
        except ValueError as exc:
            raise ValueError(f"[quantizer] symmetric_range / clip_ratio: {exc}") from None
        gran = (self.granularity,) if isinstance(self.granularity, str) else self.granularity
        gran = _check_list(k["granularity"], gran, '["tensor", "channel"]')
        for g in gran:
            _check_choice(k["granularity"], g, _GRANULARITIES)
        if len(set(gran)) != len(gran):
            raise ValueError(f"{k['granularity']} repeats a granularity: {list(gran)}")
        set_(self, "granularity", gran)
        for key in ("last_layer_bits", "all_layers_bits", "hypotheses_bits"):
            set_(self, key, _check_bits(k[key], getattr(self, key)))
        _check_choice(k["covariance"], self.covariance, _COVARIANCES)
        band = f" (a 95 % band needs at least {MIN_BAND_REALIZATIONS} realizations)"
        _check_int(k["n_realizations"], self.n_realizations, MIN_BAND_REALIZATIONS, band)
        _check_int(k["all_layers_n"], self.all_layers_n, 0, " (0 skips the all-layer stage)")
        _check_int(k["all_layers_dither"], self.all_layers_dither, 0, " (0: no level 3N)")
        if self.all_layers_dither == 1:
            raise ValueError(f"{k['all_layers_dither']} must be 0 (no level 3N) or at least 2")
        if self.all_layers_dither_bits is not None:
            set_(self, "all_layers_dither_bits",
                 _check_bits(k["all_layers_dither_bits"], self.all_layers_dither_bits))
        if self.all_layers_competitors is not None:
            _check_int(k["all_layers_competitors"], self.all_layers_competitors, 1,
                       " (runners-up kept per image)")  # fmt: skip
        _check_int(k["all_layers_bias_correction"], self.all_layers_bias_correction, 0,
                   " (calibration images of the bias-corrected cells; 0: none)")  # fmt: skip
        _check_int(k["all_layers_input_noise"], self.all_layers_input_noise, 0,
                   " (images of the input-noise ratios, level L3I; 0: none)")  # fmt: skip
        _check_int(k["all_layers_smoothed"], self.all_layers_smoothed, 0,
                   " (probes of the smoothed network's mean, level L3S; 0: none)")  # fmt: skip
        if self.all_layers_smoothed == 1:
            raise ValueError(f"{k['all_layers_smoothed']} must be 0 (none) or >= 2, got 1")
        if self.all_layers_smoothed_bits is not None:
            set_(self, "all_layers_smoothed_bits",
                 _check_bits(k["all_layers_smoothed_bits"], self.all_layers_smoothed_bits))
        _check_int(k["n_components"], self.n_components, 1, " (principal components)")
        _check_choice(k["hypotheses_layers"], self.hypotheses_layers, ("all", "last"))
        problems = _check_list(k["problems"], self.problems, '[{ name = "10-class" }]')
        if not all(isinstance(p, Problem) for p in problems):
            raise ValueError(f"{k['problems']} must hold Problem objects, got {problems!r}")
        names = [p.name for p in problems]
        if len(set(names)) != len(names):
            raise ValueError(f"{k['problems']} repeats a problem name: {names}")
        known = known_class_names(models)
        for p in problems:
            check_problem_classes(p, known)
        set_(self, "problems", problems)
        stages = _check_list(k["stages"], self.stages, '["activations"]')
        bad = [x for x in stages if x not in STAGES]
        if bad or not stages:
            raise ValueError(f"{k['stages']} names stages among {', '.join(STAGES)}; got "
                             f"{list(stages)}")  # fmt: skip
        set_(self, "stages", tuple(stages))
        _check_int(k["activations_n"], self.activations_n, 0,
                   " (evaluation images; 0 skips the activation stage)")  # fmt: skip
        _check_int(k["activations_calibration"], self.activations_calibration, 1,
                   " (calibration images from the fit part)")  # fmt: skip
        grid = self.activations_grid  # may be empty (int8 only), never a bare string
        grid = () if isinstance(grid, list | tuple) and not grid else _check_list(
            k["activations_grid"], grid, '["W8A8", "W4A8"]')  # fmt: skip
        for c in grid:
            parse_wa_cell(k["activations_grid"], c)
        set_(self, "activations_grid", tuple(grid))
        ag = self.activations_granularity
        ag = _check_list(k["activations_granularity"], (ag,) if isinstance(ag, str) else ag,
                         '["tensor", "channel"]')  # fmt: skip
        for g in ag:
            _check_choice(k["activations_granularity"], g, ("tensor", "channel"))
        set_(self, "activations_granularity", tuple(ag))
        i8 = self.activations_int8
        i8 = (i8,) if isinstance(i8, str) else i8  # may be empty: no real int8 model
        i8 = () if isinstance(i8, list | tuple) and not i8 else _check_list(
            k["activations_int8"], i8, '["x86"]')  # fmt: skip
        for b in i8:
            _check_choice(k["activations_int8"], b, INT8_BACKENDS)
        set_(self, "activations_int8", tuple(i8))
        _check_int(k["compression_n"], self.compression_n, 0,
                   " (evaluation images; 0 skips the compression stage)")  # fmt: skip
        if self.compression_families is not None:
            from distortion.experiments.compare_compression import COMPRESSION_FAMILIES

            fams = _check_list(k["compression_families"], self.compression_families,
                               '["prune-layer", "svd-energy"]')  # fmt: skip
            for f in fams:
                _check_choice(k["compression_families"], f, COMPRESSION_FAMILIES)
            set_(self, "compression_families", tuple(fams))
        mf = self.compression_max_flip_rate
        if not isinstance(mf, float | int) or isinstance(mf, bool) or not 0.0 < mf <= 1.0:
            raise ValueError(f"{k['compression_max_flip_rate']} must be a number in (0, 1], "
                             f"got {mf!r}")  # fmt: skip
        set_(self, "compression_max_flip_rate", float(mf))
        if self.activations_n and not grid and not i8:
            raise ValueError(f"{k['activations_grid']} and {k['activations_int8']} are both "
                             "empty: name W+A cells or an int8 backend")  # fmt: skip

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
        except UnicodeDecodeError as exc:
            raise ValueError(f"{p} is not a UTF-8 text file: {exc}") from None
        return cls.from_dict(raw, source_file=str(p))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source_file: str | None = None) -> ExperimentConfig:
        """Build from the nested dictionary of a TOML file, checking every section and key.

        Unknown sections or keys are an error that lists the known ones; each value is
        checked for its type and range (see :meth:`__post_init__`).
        """
        if not isinstance(raw, dict):
            raise ValueError(f"a configuration is a table of sections, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(CONFIG_KEYS[""]))
        if unknown:
            raise ValueError(
                f"unknown configuration key(s): {', '.join(unknown)}; known top-level keys: "
                f"{', '.join(CONFIG_KEYS[''])}"
            )
        for section, keys in CONFIG_KEYS.items():
            if not section or section not in raw:
                continue
            if not isinstance(raw[section], dict):
                raise ValueError(
                    f"[{section}] must be a table (a [{section}] section), got {raw[section]!r}"
                )
            bad = sorted(set(raw[section]) - set(keys))
            if bad:
                raise ValueError(
                    f"unknown configuration key(s): {', '.join(f'{section}.{b}' for b in bad)}; "
                    f"known keys of [{section}]: {', '.join(keys)}"
                )
        kw: dict[str, Any] = {"source_file": source_file}
        for field_name, key in _TOML_KEY.items():
            section, _, name = key.rpartition(".")
            sec = raw.get(section, {}) if section else raw
            if name in sec:
                kw[field_name] = sec[name]
        if "n" in kw and _is_int(kw["n"]) and kw["n"] == 0:
            kw["n"] = None  # 0: every image
        if "models" in kw and isinstance(kw["models"], list | tuple) and kw["models"]:
            kw["models"] = _check_list(_TOML_KEY["models"], kw["models"], '["resnet20"]')
        if "problems" in kw:
            kw["problems"] = _problems(kw["problems"])
        for key in ("granularity", "last_layer_bits", "all_layers_bits", "hypotheses_bits",
                    "all_layers_smoothed_bits", "all_layers_dither_bits", "stages",
                    "activations_grid",
                    "activations_granularity", "activations_int8", "compression_families"):
            if isinstance(kw.get(key), list):
                kw[key] = tuple(kw[key])
        return cls(**kw)

    def quantizers(self, bits: Sequence[int]):
        """The quantizer grid granularity × bits of this experiment."""
        from distortion.experiments.compare import quantizer_grid

        return quantizer_grid(bits, granularity=self.granularity, scheme=self.scheme,
                              clipping=self.clipping, rounding=self.rounding,
                              symmetric_range=self.symmetric_range,
                              clip_ratio=self.clip_ratio)  # fmt: skip

    def hypothesis_quantizers(self) -> dict[str, Any]:
        """The quantizers whose error the hypothesis stage tests: this experiment's scheme,
        clipping and rounding, one per granularity (bit-widths: ``hypotheses_bits``)."""
        from distortion.quantize import UniformQuantizer

        return {
            f"per_{g}": UniformQuantizer(8, scheme=self.scheme, granularity=g,
                                         clipping=self.clipping, rounding=self.rounding,
                                         symmetric_range=self.symmetric_range,
                                         clip_ratio=self.clip_ratio)
            for g in self.granularity
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable settings."""
        d = asdict(self)
        d["problems"] = [asdict(p) for p in self.problems]
        return d


def check_problem_classes(problem: Problem, class_names: Sequence[str] | None) -> None:
    """Raise a ValueError when ``problem`` names a class that ``class_names`` lacks (or
    fewer than two, or one twice); ``class_names=None``: only the count is checked."""
    key = _TOML_KEY["problems"]
    if problem.classes is None:
        return
    cls = list(problem.classes)
    if len(cls) < 2 or len(set(cls)) != len(cls):
        raise ValueError(f"{key} {problem.name!r}: classes must name at least two distinct "
                         f"classes, got {cls}")  # fmt: skip
    if class_names is not None:
        bad = [c for c in cls if c not in class_names]
        if bad:
            raise ValueError(
                f"{key} {problem.name!r}: unknown class name(s) {bad}; the dataset's classes "
                f"are {', '.join(class_names)}"
            )


def _problems(items: Any) -> tuple[Problem, ...]:
    key = _TOML_KEY["problems"]
    items = _check_list(key, items, '[{ name = "10-class" }]')
    out = []
    for it in items:
        if not isinstance(it, dict) or "name" not in it:
            raise ValueError(f"each {key} entry needs a name, got {it!r}")
        bad = sorted(set(it) - {"name", "classes"})
        if bad:
            raise ValueError(f"unknown key(s) {bad} in {key} entry {it!r}; known: name, classes")
        name = _check_str(f"{key} name", it["name"])
        classes = it.get("classes")
        if classes is not None:
            classes = _check_list(f"{key} {name!r}: classes", classes, '["cat", "dog"]')
            if not all(isinstance(c, str) for c in classes):
                raise ValueError(f"{key} {name!r}: classes must be class names, got {classes}")
        out.append(Problem(name, classes))
    return tuple(out)


@dataclass(frozen=True)
class ExperimentResult:
    """What :func:`run_experiment` produced."""

    config: ExperimentConfig
    out_dir: Path
    comparison: Any  # Comparison; None on the ranks > 0 of a distributed run
    timings: dict[str, float] = field(repr=False)
    accuracies: dict[str, float] = field(repr=False)
    #: The activation stage's ActivationStudy (None when it did not run).
    activations: Any = field(default=None, repr=False)
    #: The compression stage's Comparison (None when it did not run).
    compression: Any = field(default=None, repr=False)

    def to_frame(self) -> pd.DataFrame:
        """The comparison table."""
        return self.comparison.to_frame()


class _Stages:
    """Prints each stage's name and duration; wraps failures in StageError."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.i, self.timings = total, 0, {}
        self.skipped: dict[str, str] = {}
        self.stream = stream or sys.stderr

    def skip(self, name: str, reason: str) -> None:
        """Count a stage that does not run, print and record why."""
        self.i += 1
        self.skipped[name] = reason
        print(f"[{self.i}/{self.total}] {name} skipped: {reason}", file=self.stream, flush=True)

    def note(self, name: str, reason: str) -> None:
        """Record and print that part of a stage was left out (the stage still runs)."""
        self.skipped[name] = reason
        print(f"    {name} skipped: {reason}", file=self.stream, flush=True)

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
    """A path relative to --data, else to DISTORTION_DATA / ../shared, or a named dataset.

    An explicit ``data`` is the only place looked in: when it does not exist, or does not
    hold ``source``, that is an error, never a fallback to the shared folder.
    """
    if source == "imagenet" and data is not None:
        root = Path(data).expanduser()
        for folder in (root / "data" / "imagenet" / "val", root / "imagenet" / "val", root):
            if folder.is_dir():
                return str(folder)
        raise FileNotFoundError(
            f'--data {data}: not a folder; for source = "imagenet" pass the validation '
            "folder in ImageFolder layout (one sub-folder of images per class)"
        )
    if source in ("cifar10", "cifar100", "imagenet"):
        return source
    p = Path(source).expanduser()
    if data is not None:
        root = Path(data).expanduser()
        if not root.exists():
            raise FileNotFoundError(
                f"--data {data}: no such file or folder; pass an existing .npz file or the "
                "folder holding data/cifar10/test.npz"
            )
        roots = [root]
    else:
        shared = _paths.shared_dir()
        roots = [] if shared is None else [shared]
    if p.is_absolute():
        if data is None or p.exists():
            return str(p)
    for r in roots:
        if r.is_file():
            return str(r)
        if (r / p).exists():
            return str(r / p)
    where = [str(r) for r in roots] or "no data folder"
    raise FileNotFoundError(
        f"data source {source!r} not found under {where}; pass --data PATH (a .npz file or "
        "the folder holding data/cifar10/test.npz) or set DISTORTION_DATA"
    )


def _check_inputs(
    config: ExperimentConfig, data: str | None, weights: dict[str, str], out: Path
) -> None:
    """Everything that can be checked before the first stage: the explicit data path, the
    checkpoints (of models the configuration runs) and a writable results folder."""
    if data is not None and not Path(data).expanduser().exists():
        raise FileNotFoundError(
            f"--data {data}: no such file or folder; pass an existing .npz file or the folder "
            "holding data/cifar10/test.npz (or leave it out to use DISTORTION_DATA)"
        )
    extra = sorted(set(weights) - set(config.models))
    if extra:
        raise ValueError(
            f"--weights for {', '.join(extra)}, which the configuration does not run; its "
            f"models (models.names) are {', '.join(config.models)}"
        )
    for name, path in weights.items():
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"--weights {name}={path}: no such checkpoint file")
    _paths.check_output_dir(out, "--out")


def _competitors_supported() -> bool:
    """Whether ``compare_all_layers`` and ``(sharded_)gradient_grams`` take ``competitors``."""
    import inspect

    from distortion.experiments.compare import compare_all_layers
    from distortion.experiments.distributed import sharded_gradient_grams
    from distortion.experiments.sensitivity import gradient_grams

    return all(
        "competitors" in inspect.signature(f).parameters
        for f in (compare_all_layers, gradient_grams, sharded_gradient_grams)
    )


def _check_competitors(config: ExperimentConfig) -> None:
    if config.all_layers_competitors is not None and not _competitors_supported():
        raise ValueError(
            f"{_TOML_KEY['all_layers_competitors']} = {config.all_layers_competitors}, but "
            "this version's gradient_grams / compare_all_layers take no 'competitors': "
            "comment the key out (the all-layer stage is then skipped for networks of more "
            f"than {MAX_DENSE_CLASSES} classes)"
        )


def _check_fit_counts(fit: Any, problem: Problem, fraction: float) -> None:
    """A clear error when a problem's class has fewer than 2 fitting images (the Gaussian
    model needs 2 per class even for the pooled covariance: a class mean and a residual)."""
    names = list(fit.class_names)
    classes = problem.classes
    rows = range(len(names)) if classes is None else [names.index(c) for c in classes]
    counts = np.bincount(np.asarray(fit.labels), minlength=len(names))
    few = [(names[k], int(counts[k])) for k in rows if counts[k] < 2]
    if few:
        shown = ", ".join(f"{c} ({n})" for c, n in few[:5]) + (", ..." if len(few) > 5 else "")
        raise ValueError(
            f"problem {problem.name!r}: {len(few)} of its {len(rows)} classes have fewer than 2 "
            f"images in the fit part (data.fit_fraction = {fraction}): {shown}; the Gaussian "
            "model needs at least 2 per class: use more images per class (data.n = 0 keeps "
            "all) or a problem over fewer classes (last_layer.problems)"
        )


def _hypothesis_features(fs: Any, problems: Sequence[Problem], name: str, stage: _Stages) -> Any:
    """The features whose normality (H_G) the hypothesis stage tests: all of them, or for
    more than :data:`MAX_DENSE_CLASSES` classes those of the problems' classes (else the
    first :data:`MAX_DENSE_CLASSES`), restricted to those classes' logit margins. Each class
    costs d + K - 1 univariate tests and a K - 1 dimensional multivariate one: hours at
    K = 1000. H_U is tested on the model's weights either way."""
    k = len(fs.class_names)
    if k <= MAX_DENSE_CLASSES:
        return fs
    chosen = list(dict.fromkeys(c for p in problems if p.classes for c in p.classes))
    if not chosen or len(chosen) > MAX_DENSE_CLASSES:
        chosen = list(fs.class_names[:MAX_DENSE_CLASSES])
    stage.note(
        f"{name}: H_G tests of {k - len(chosen)} of the {k} classes",
        f"{k} classes > {MAX_DENSE_CLASSES}: features and logit margins are tested for "
        f"normality on {len(chosen)} classes (those of last_layer.problems, else the first "
        f"{MAX_DENSE_CLASSES}), against each other",
    )  # fmt: skip
    return fs.subset(classes=chosen)


def _shard_all_layer_inputs(
    model: Any,
    images: Any,
    quantizers: Sequence[Any],
    *,
    seed: int,
    cache: Path,
    progress: bool,
    competitors: int | None = None,
) -> None:
    """Compute, sharded over the ranks, the per-sample Grams and the measurements that
    :func:`~distortion.experiments.compare.compare_all_layers` then reads from the cache.

    Every rank calls it. The Grams are those ``compare_all_layers`` asks for (all layers,
    its granularity, its 40 realizations, ``seed``, ``competitors``, the batch size from its
    memory budget);
    the measurements are stored under the key of its measurement cache (same model, images,
    layers, quantizer and seed; ``tests/test_imagenet.py`` checks that it then measures
    nothing).
    """
    from distortion.experiments import distributed as D
    from distortion.experiments._torch_state import evaluated_on
    from distortion.experiments.compare import _cached_measurement
    from distortion.experiments.sensitivity import _data_info, _model_hash, resolve_quantizable

    ctx = D.current_context()
    granularity = "channel" if any(q.granularity == "channel" for q in quantizers) else "tensor"
    extra = {} if competitors is None else {"competitors": competitors}
    D.sharded_gradient_grams(
        model, images, cache_dir=cache, layers="all", granularity=granularity,
        n_realizations=40, seed=seed, load_merged=False, progress=progress, **extra,
    )  # fmt: skip
    with evaluated_on(model, D._auto_device(None, ctx)) as dev:
        x, _ = next(iter(images.batches(2)))
        names = resolve_quantizable(model, "all", x.to(dev))
    data_key = {"model": _model_hash(model), "data": _data_info(images)[2], "layers": names}
    for q in quantizers:
        m = D.sharded_measure(
            model, images, q, cache_dir=cache, layers=names, seed=seed,
            batch_size=DISTRIBUTED_BATCH_SIZE, load_merged=False, progress=progress,
        )  # fmt: skip
        if ctx.is_main:  # the key compare_all_layers gives its measurement (same fields)
            key = {**data_key, "quantizer": repr(q), "seed": seed, "kind": "all-layers"}
            _cached_measurement(cache, key, lambda m=m: m)


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
    download: bool = False,
    distributed: bool = False,
) -> ExperimentResult:
    """Run every stage of ``config``; return the comparison and write the results.

    Parameters
    ----------
    config : ExperimentConfig
    data : str, optional
        The data file or folder (else ``DISTORTION_DATA`` or ``../shared``); for
        ``data.source = "imagenet"``, the validation folder in ImageFolder layout.
    weights : dict of model name to checkpoint path, optional
    out_dir : path, optional
        Default ``experiments/results/<config.name>``.
    cache_dir : path, optional
        Feature and gradient caches (default ``$DISTORTION_CACHE`` or ``~/.cache/distortion``).
        Shared by every rank of a distributed run (a shared file system across nodes).
    figures : bool
        Draw the figures.
    progress : bool
        Progress bars.
    stream : file, optional
        Where stage messages go (default stderr).
    download : bool
        Download the published weights of a model not found locally (needs a network).
    distributed : bool
        Shard the feature extraction, the all-layer Grams and the all-layer measurements
        over the processes of a ``torch.distributed`` job (``torchrun``, ``srun``;
        :func:`~distortion.experiments.distributed.init_distributed` is called here) with
        batches of :data:`DISTRIBUTED_BATCH_SIZE` images; rank 0 runs the other stages and
        writes every output, the other ranks return with ``comparison=None``. One process
        (a plain run) computes every shard itself: 1 and N processes give the same bits.

    Notes
    -----
    Networks of more than :data:`MAX_DENSE_CLASSES` classes (ImageNet) skip, with a
    message, the all-layer stage unless ``all_layers.competitors`` is set, and the
    last-layer problems over all their classes (name a subset in ``last_layer.problems``).
    """
    from distortion.experiments import distributed as D
    from distortion.experiments.compare import Comparison, compare_all_layers, compare_last_layer
    from distortion.experiments.data import load_dataset
    from distortion.experiments.features import extract_features
    from distortion.experiments.hypotheses import run_hypothesis_tests
    from distortion.experiments.models import load_model

    out = Path(out_dir) if out_dir else _paths.repo_root() / "experiments" / "results" / config.name
    weights = dict(weights or {})
    _check_inputs(config, data, weights, out)
    _check_competitors(config)
    ctx = D.init_distributed() if distributed else D.current_context()
    main = ctx.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    cache = _paths.cache_dir(cache_dir)
    started = time.time()
    st = config.stages
    features = "hypotheses" in st or "last_layer" in st
    all_layers = config.all_layers_n > 0 and "all_layers" in st
    act_stage = config.activations_n > 0 and "activations" in st
    comp_stage = config.compression_n > 0 and "compression" in st
    n_stages = len(config.models) * (
        2 + ("hypotheses" in st) + ("last_layer" in st) + all_layers + act_stage + comp_stage
        + (all_layers and config.all_layers_bias_correction > 0)
    ) + 1 + figures
    stage = _Stages(n_stages, stream if main else io.StringIO())  # rank 0 prints
    progress = progress and main
    competitors = config.all_layers_competitors
    parts, accuracies, verdicts, act_parts, comp_parts = [], {}, [], [], []
    with stage("load data"):
        source = _resolve_source(config.data_source, data)
        if config.data_source == "imagenet" and source != "imagenet":
            dataset = load_dataset("imagenet", root=source, n=config.n)
        else:
            dataset = load_dataset(source, n=config.n)
        for prob in config.problems:  # names of a dataset not known before loading it
            check_problem_classes(prob, dataset.class_names)
    for name in config.models:
        if not features:  # the split from the labels alone (the same as the features')
            with stage(f"{name}: load model"):
                model = load_model(name, weights.get(name), download=download)
                n_classes = dataset.n_classes
                first = fit_evaluate_mask(dataset.labels, n_classes, config.fit_fraction,
                                          config.seed)  # fmt: skip
        else:
            with stage(f"{name}: load model and extract features"):
                model = load_model(name, weights.get(name), download=download)
                if distributed:
                    fs = D.sharded_extract_features(
                        model, dataset, cache_dir=cache, batch_size=DISTRIBUTED_BATCH_SIZE,
                        progress=progress,
                    )  # fmt: skip
                else:
                    fs = extract_features(model, dataset, cache_dir=cache, progress=progress)
                if main:
                    (out / "features").mkdir(exist_ok=True)
                    fs.save(out / "features" / f"{name}.npz")
                accuracies[name] = fs.accuracy
                first = fs.split_mask(config.fit_fraction, seed=config.seed)
                fit, evaluate = fs.select(first), fs.select(~first)
                n_classes = len(fs.class_names)
        if main and "hypotheses" in st:
            with stage(f"{name}: hypothesis tests"):
                hyp_fs = _hypothesis_features(fs, config.problems, name, stage)
                hyp_figures = figures
                if figures and np.bincount(hyp_fs.labels).max() < _MIN_NORMALITY_IMAGES:
                    hyp_figures = False
                    stage.note(
                        f"{name}: hypothesis figures",
                        f"no class has the {_MIN_NORMALITY_IMAGES} images the normality "
                        "tests of H_G need (ImageNet: 50 per class)",
                    )  # fmt: skip
                report = run_hypothesis_tests(
                    hyp_fs, model, layers=config.hypotheses_layers, bits=config.hypotheses_bits,
                    quantizers=config.hypothesis_quantizers(), n_components=config.n_components,
                    seed=config.seed, out_dir=out / "hypotheses" / name, figures=hyp_figures,
                    cache_dir=cache, progress=progress,
                )  # fmt: skip
                verdicts.append(hypothesis_verdicts(report, name, config.problems))
        if main and "last_layer" in st:
            with stage(f"{name}: last layer, predicted vs measured"):
                for prob in config.problems:
                    k = n_classes if prob.classes is None else len(prob.classes)
                    if k > MAX_DENSE_CLASSES:
                        stage.note(
                            f"{name}: last layer, problem {prob.name!r}",
                            f"{k} classes > {MAX_DENSE_CLASSES}: the last-layer comparison "
                            "forms per-sample K x K Grams (Sakr's bound); name a subset of "
                            "classes in last_layer.problems",
                        )  # fmt: skip
                        continue
                    _check_fit_counts(fit, prob, config.fit_fraction)
                    try:
                        cmp = compare_last_layer(
                            fit, evaluate, config.quantizers(config.last_layer_bits),
                            model_name=name, problem=prob.name, classes=prob.classes,
                            covariance=config.covariance, n_realizations=config.n_realizations,
                            seed=config.seed,
                        )  # fmt: skip
                    except ValueError as exc:
                        if config.covariance == "class" and "covariance" in str(exc):
                            raise ValueError(
                                f"{exc}; with few images per class set "
                                'last_layer.covariance = "pooled"'
                            ) from exc
                        raise
                    parts.append(cmp)
        if all_layers:
            all_name = f"{name}: all layers, predicted vs measured"
            if n_classes > MAX_DENSE_CLASSES and competitors is None:
                stage.skip(
                    all_name,
                    f"{name} has {n_classes} classes > {MAX_DENSE_CLASSES}: per-sample "
                    f"{n_classes} x {n_classes} Grams are out of reach; set "
                    "all_layers.competitors (the runners-up kept per image) to run it",
                )  # fmt: skip
            else:
                with stage(all_name):
                    images = _evaluation_images(dataset, ~first, config.all_layers_n)
                    quantizers = config.quantizers(config.all_layers_bits)
                    if distributed:
                        _shard_all_layer_inputs(
                            model, images, quantizers, seed=config.seed, cache=cache,
                            progress=progress, competitors=competitors,
                        )  # fmt: skip
                    if main:
                        extra = {} if competitors is None else {"competitors": competitors}
                        if config.all_layers_input_noise:
                            extra["input_noise_images"] = config.all_layers_input_noise
                        smooth = {}  # not in `extra`, which the bias-corrected cells reuse:
                        if config.all_layers_smoothed:  # the correction removes that mean
                            smooth["smoothed_probes"] = config.all_layers_smoothed
                            smooth["smoothed_bits"] = config.all_layers_smoothed_bits
                        parts.append(
                            compare_all_layers(
                                model,
                                images,
                                quantizers,
                                model_name=name,
                                cache_dir=cache,
                                seed=config.seed,
                                progress=progress,
                                n_dither_realizations=config.all_layers_dither,
                                dither_bits=config.all_layers_dither_bits,
                                **extra,
                                **smooth,
                            )  # fmt: skip
                        )
                if main and config.all_layers_bias_correction:
                    with stage(f"{name}: all layers, bias-corrected, predicted vs measured"):
                        parts.append(_bias_corrected_stage(
                            config, model, name, dataset, first, images, quantizers, cache,
                            progress, extra,
                        ))  # fmt: skip
        if main and act_stage:
            with stage(f"{name}: activations (W+A, int8), predicted vs measured"):
                act_parts.append(_activation_stage(config, model, name, dataset, first, cache,
                                                   progress, stage))  # fmt: skip
        if main and comp_stage:
            with stage(f"{name}: compression families, predicted vs measured"):
                comp_parts.append(_compression_stage(config, model, name, dataset, first, cache,
                                                     progress))  # fmt: skip
        if main:
            with stage(f"{name}: write tables"):
                if parts:
                    Comparison.concat(parts).save(out)
                if act_parts:
                    ActivationStudy.concat(act_parts).save(out / "activations", figures=False)
                if comp_parts:
                    _save_compression(Comparison.concat(comp_parts), out / "compression",
                                      config.compression_max_flip_rate)  # fmt: skip
    if not main:
        D.shutdown_distributed()
        return ExperimentResult(config, out, None, stage.timings, accuracies)
    activations = ActivationStudy.concat(act_parts) if act_parts else None
    compression = Comparison.concat(comp_parts) if comp_parts else None
    if not any(len(p.table) for p in parts) and activations is None and compression is None:
        raise StageError(
            "no cell was computed: every last-layer problem and all-layer stage was skipped ("
            + "; ".join(f"{k}: {v}" for k, v in stage.skipped.items())
            + ")"
        )
    comparison = Comparison.concat(parts) if any(len(p.table) for p in parts) else None
    if figures:
        with stage("figures"):
            from distortion.plotting.compare import save_comparison_figures

            if comparison is not None:
                save_comparison_figures(comparison, out / "figures")
            if activations is not None:
                activations.save(out / "activations", figures=True)
            if compression is not None:
                from distortion.plotting.compression import save_compression_figures

                save_compression_figures(compression, out / "compression" / "figures")
    verdict_table = pd.concat(verdicts, ignore_index=True) if verdicts else None
    if verdict_table is not None:
        if "bits" in verdict_table:  # integers, empty for the H_G rows (not 2.0)
            verdict_table["bits"] = verdict_table["bits"].astype("Int64")
        verdict_table.to_csv(out / "hypothesis_verdicts.csv", index=False)
    text = "" if comparison is None else summary_table(comparison, accuracies, verdict_table)
    if activations is not None:
        text += ("\n\n" if text else "") + "activations (W+A, int8):\n" + activations.summary()
    if compression is not None:
        text += ("\n\n" if text else "") + _compression_text(compression,
                                                               config.compression_max_flip_rate)
    if stage.skipped:
        text += "\n" + "\n".join(f"skipped: {k}: {v}" for k, v in stage.skipped.items())
    (out / "summary.txt").write_text(text + "\n")
    _write_run_json(out / "run.json", config, stage.timings, accuracies, started,
                    skipped=stage.skipped, world_size=ctx.world_size)  # fmt: skip
    write_column_dictionary(out / "columns.md")
    if distributed:
        D.shutdown_distributed()
    return ExperimentResult(config, out, comparison, stage.timings, accuracies, activations,
                            compression)


def _bias_corrected_stage(
    config: ExperimentConfig, model: Any, name: str, dataset: Any, first: np.ndarray,
    images: Any, quantizers: Any, cache: Any, progress: bool, extra: dict[str, Any],
) -> Any:  # fmt: skip
    """The all-layer cells of the bias-corrected networks (``theory/multilayer.md`` section
    16): means of every layer's input on the first ``all_layers.bias_correction`` images of
    the fit part (disjoint from the evaluation images), then the same quantizers."""
    from distortion.experiments.bias_correction import input_means
    from distortion.experiments.compare import compare_all_layers

    cal_pos = np.flatnonzero(first)[: config.all_layers_bias_correction]
    cal = _subset(dataset, cal_pos, f"{dataset.dataset_id}[bias-cal:{len(cal_pos)}]")
    means = input_means(model, cal, progress=progress)
    return compare_all_layers(
        model, images, quantizers, model_name=name, cache_dir=cache, seed=config.seed,
        progress=progress, n_dither_realizations=config.all_layers_dither,
        dither_bits=config.all_layers_dither_bits, bias_correction=means, **extra,
    )  # fmt: skip


def _activation_stage(
    config: ExperimentConfig, model: Any, name: str, dataset: Any, first: np.ndarray,
    cache: Any, progress: bool, stage: _Stages,
) -> ActivationStudy:
    """The activation stage of one model: calibration on the first
    ``activations.calibration`` images of the fit part, evaluation on the first
    ``activations.n`` of the evaluation part (disjoint by construction, checked by content)."""
    import torch

    from distortion.experiments.compare_activations import compare_activations

    backends = []
    for b in config.activations_int8:
        if b in torch.backends.quantized.supported_engines:
            backends.append(b)
        else:
            have = ", ".join(torch.backends.quantized.supported_engines)
            stage.note(f"{name}: int8 {b}", f"the torch.ao backend {b!r} is not available on "
                       f"this machine (it has {have})")  # fmt: skip
    cal_pos = np.flatnonzero(first)[: config.activations_calibration]
    cal = _subset(dataset, cal_pos, f"{dataset.dataset_id}[cal:{len(cal_pos)}]")
    ev = _evaluation_images(dataset, ~first, config.activations_n)
    grid = [parse_wa_cell("activations.grid", c) for c in config.activations_grid]
    return compare_activations(
        model, cal, ev, model_name=name, grid=grid,
        granularities=config.activations_granularity, int8_backends=backends,
        seed=config.seed, cache_dir=cache, progress=progress,
    )  # fmt: skip


def _compression_stage(
    config: ExperimentConfig, model: Any, name: str, dataset: Any, first: np.ndarray,
    cache: Any, progress: bool,
) -> Any:
    """The compression stage of one model: every family of ``compression.families`` on the
    first ``compression.n`` images of the evaluation part, all layers
    (:func:`~distortion.experiments.compare_compression.compare_compression`)."""
    from distortion.experiments.compare_compression import compare_compression, compression_grid
    from distortion.experiments.models import quantizable_layers

    images = _evaluation_images(dataset, ~first, config.compression_n)
    shape = (1, *tuple(images[0][0].shape))  # one preprocessed image
    names = [layer.name for layer in quantizable_layers(model, input_shape=shape)]
    configs = compression_grid(model, names, config.compression_families)
    return compare_compression(model, images, configs, model_name=name, cache_dir=cache,
                               seed=config.seed, progress=progress)  # fmt: skip


def _compression_text(comparison: Any, max_flip_rate: float) -> str:
    from distortion.experiments.compare_compression import compression_summary

    s = compression_summary(comparison, max_flip_rate=max_flip_rate)
    with pd.option_context("display.width", 220, "display.max_rows", 500):
        body = s.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    return f"compression families (cells with measured flip rate <= {max_flip_rate:g}):\n{body}"


def _save_compression(comparison: Any, out: Path, max_flip_rate: float) -> None:
    from distortion.experiments.compare_compression import compression_summary

    comparison.save(out, name="compression")
    compression_summary(comparison, max_flip_rate=max_flip_rate).to_csv(
        out / "compression_summary.csv", index=False
    )
    (out / "compression_summary.txt").write_text(_compression_text(comparison, max_flip_rate)
                                                 + "\n")  # fmt: skip


def _write_run_json(
    path: Path,
    config: ExperimentConfig,
    timings: dict[str, float],
    accuracies: dict[str, float],
    started: float,
    *,
    skipped: dict[str, str] | None = None,
    world_size: int = 1,
) -> None:
    """Write ``run.json``: the configuration, accuracies and this run's timings
    (``timings_s``), and every run into the folder so far (``runs``, oldest first), so the
    cold timings of the first run are never overwritten by a rerun from the caches
    (``first_run``)."""
    runs: list[dict[str, Any]] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            runs = list(old.get("runs") or [])
            if not runs and "timings_s" in old:  # written before runs were kept
                runs = [{"started": None, "timings_s": old["timings_s"]}]
        except (ValueError, OSError, AttributeError, TypeError):
            runs = []
    this = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "total_s": time.time() - started,
        "timings_s": timings,
        "config_name": config.name,
        "world_size": int(world_size),
        "skipped": dict(skipped or {}),
    }
    runs.append(this)
    meta = {
        "config": config.to_dict(),
        "timings_s": timings,
        "accuracies": accuracies,
        "first_run": runs[0],
        "runs": runs,
    }
    path.write_text(json.dumps(meta, indent=1, default=str))


#: Columns of ``hypothesis_verdicts.csv`` (:func:`hypothesis_verdicts`) and their meaning.
VERDICT_COLUMNS: dict[str, str] = {
    "model": "network name (models.names)",
    "granularity": "quantizer granularity, tensor or channel (empty for the H_G rows)",
    "bits": "bit-width of the quantizer (integer; empty for the H_G rows, which do not "
    "depend on it)",
    "layers": "'last': the last linear layer only; 'all': every tested layer",
    "problem": "classification problem of the H_G row (empty for the H_U rows)",
    "H_U_fails": "share of the tested layers whose quantization error fails the uniform "
    "hypothesis H_U (0..1)",
    "H_U_marginal": "share of the tested layers whose H_U verdict is marginal (0..1)",
    "H_U_layers": "number of layers behind H_U_fails / H_U_marginal",
    "H_G_margins_fail": "share of the logit margins of the problem's classes that fail the "
    "Gaussian hypothesis H_G (0..1)",
    "H_G_margins": "number of logit margins behind H_G_margins_fail",
}

#: Columns of the printed summary (``summary.txt``).
SUMMARY_TEXT_COLUMNS: dict[str, str] = {
    "<level> |err| pp": "mean absolute error of the level's (or bound's) flip rate against "
    "the measured one, in percentage points",
    "L3 in band": "share of cells whose measured flip rate lies in the level-3 band",
    "L3I band": "the same for the band of level L3I (all layers, where all_layers.input_noise "
    "> 0)",
    "L3S band": "the same for the band of level L3S (all layers, where "
    "all_layers.smoothed_probes > 0)",
    "H_U fails": "share of (quantized layer x bit-width) whose error fails H_U",
    "H_G margins fail": "share of logit margins failing normality (last layer)",
}


#: Columns of ``comparison_summary.csv`` beyond the group keys and the mean errors.
SUMMARY_CSV_COLUMNS: dict[str, str] = {
    "band_coverage": "share of the group's cells whose measured flip rate lies inside the band "
    "of the layer set's level-3 prediction (L3 for the last layer, L3L for all layers)",
    "band_coverage_L3I": "the same for the band of level L3I, where it was run "
    "(all_layers.input_noise > 0; empty elsewhere)",
    "band_coverage_L3S": "the same for the band of level L3S, where it was run "
    "(all_layers.smoothed_probes > 0; empty elsewhere)",
    "band_coverage_L3N": "the same for the band of level L3N, the dithered networks, where "
    "it was run (all_layers.dither_realizations > 0; empty elsewhere)",
    "sakr_vacuous_share": "share of the group's cells where Sakr's published bound is >= 1",
    "cells": "number of cells (bit-widths) in the group",
    "bits_min": "smallest bit-width of the group (integer)",
    "bits_max": "largest bit-width of the group (integer)",
}


def column_dictionary() -> dict[str, dict[str, str]]:
    """Every column of the files a run writes, with its meaning, per file.

    The comparison columns come from :data:`distortion.experiments.compare.COLUMN_DICTIONARY`;
    ``comparison_summary.csv`` holds the group keys, the mean over the group's cells of each
    ``*_abs_error`` column and :data:`SUMMARY_CSV_COLUMNS`.
    """
    from distortion.experiments import compare

    comparison = dict(getattr(compare, "COLUMN_DICTIONARY", {}) or {})
    keys = ("model", "problem", "layers", "granularity")
    summary = {k: comparison[k] for k in keys if k in comparison}
    summary.update({
        c: f"mean over the group's cells of {c} ({m})"
        for c, m in comparison.items() if c.endswith("_abs_error")
    })  # fmt: skip
    summary.update(getattr(compare, "SUMMARY_COLUMN_DICTIONARY", None) or SUMMARY_CSV_COLUMNS)
    return {
        "comparison.csv (and comparison.json)": comparison,
        "comparison_summary.csv": summary,
        "hypothesis_verdicts.csv": dict(VERDICT_COLUMNS),
        "summary.txt (printed summary)": dict(SUMMARY_TEXT_COLUMNS),
    }


def write_column_dictionary(path: str | Path) -> Path:
    """Write :func:`column_dictionary` as a Markdown file (one table per file)."""
    lines = ["# Columns of the result files", ""]
    for files, cols in column_dictionary().items():
        lines += [f"## {files}", "", "| column | meaning |", "|---|---|"]
        if not cols:
            lines.append("| (not documented in this version) | |")
        lines += [f"| `{c}` | {m.replace('|', '/')} |" for c, m in cols.items()]
        lines.append("")
    p = Path(path)
    p.write_text("\n".join(lines))
    return p


def fit_evaluate_mask(labels: np.ndarray, n_classes: int, fraction: float, seed: int) -> np.ndarray:
    """The fit part of the stratified split :func:`run_experiment` uses (True: fit the
    statistics, False: evaluate and measure), from the labels alone: exactly
    :meth:`FeatureSet.split_mask` of features with these labels."""
    from distortion.experiments.features import FeatureSet

    y = np.asarray(labels, dtype=np.int64)
    k = int(n_classes)
    dummy = FeatureSet(
        features=np.zeros((len(y), 1), np.float32), labels=y,
        logits=np.zeros((len(y), k), np.float32), W=np.zeros((k, 1), np.float32),
        b=np.zeros(k, np.float32), class_names=tuple(str(i) for i in range(k)),
    )  # fmt: skip
    return dummy.split_mask(fraction, seed=seed)


def select_images(dataset: Any, positions: np.ndarray, label: str) -> Any:
    """The images of ``dataset`` at ``positions`` (same preprocessing and class names):
    in-memory images (.npz, CIFAR) or image files (an ImageFolder tree such as ImageNet)."""
    return _subset(dataset, positions, f"{dataset.dataset_id}[{label}]")


def _evaluation_images(dataset: Any, mask: np.ndarray, n: int) -> Any:
    """The first ``n`` images of ``dataset`` where ``mask`` is true (same preprocessing)."""
    pos = np.flatnonzero(mask)[:n]
    return _subset(dataset, pos, f"{dataset.dataset_id}[eval:{len(pos)}]")


def _subset(dataset: Any, positions: np.ndarray, name: str) -> Any:
    from distortion.experiments.data import ImageDataset, SubsetSpec

    pos = np.asarray(positions, dtype=np.int64)
    if dataset.images is not None:
        return ImageDataset.from_arrays(
            dataset.images[pos], dataset.labels[pos], class_names=dataset.class_names,
            preprocessing=dataset.preprocessing, name=name,
        )  # fmt: skip
    files = dataset.files
    return ImageDataset(
        labels=np.array(dataset.labels[pos]), class_names=dataset.class_names,
        class_ids=dataset.class_ids, source_class_names=dataset.source_class_names,
        indices=np.array(dataset.indices[pos]), base_id=name,
        preprocessing=dataset.preprocessing, subset=SubsetSpec(),
        files=[files[i] for i in pos], source=dataset.source,
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
    # no class with enough images for the normality tests (fewer than 20 each): no H_G rows
    margins = g[g["kind"] == "margin"] if "kind" in g else g.iloc[:0]
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
    for prob in problems if len(margins) else ():
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
    Sakr's clipped bound (percentage points; "-" where a level does not apply), the share of
    cells where Sakr's published bound is vacuous (>= 1), the coverage of the level-3 band
    (L3 for the last layer, L3L for all layers) and, from ``verdicts``
    (:func:`hypothesis_verdicts`), the share of H_U failures among the quantized layers
    over those bit-widths and of H_G failures among the logit margins (last layer)."""
    s = comparison.summary(split_bits=split_bits)
    if s.empty:
        return "(no cells)"
    cols = [c for c in s.columns if c.endswith("_flip_rate_abs_error")]
    show = s[["model", "problem", "layers", "granularity"]].copy()
    show["bits"] = [
        f"{a}" if a == b else f"{a}-{b}" for a, b in zip(s["bits_min"], s["bits_max"], strict=True)
    ]
    show["cells"] = s["cells"]

    def pct(v: float, digits: int = 2) -> str:
        return "-" if pd.isna(v) else f"{100 * v:.{digits}f}"

    for c in cols:
        show[c.replace("_flip_rate_abs_error", " |err| pp")] = [pct(v) for v in s[c]]
    show["band"] = [pct(v, 0) + (" %" if pd.notna(v) else "") for v in s["band_coverage"]]
    from distortion.experiments.compare import OPTIONAL_BAND_LEVELS

    for lvl in OPTIONAL_BAND_LEVELS:
        if f"band_coverage_{lvl}" in s and s[f"band_coverage_{lvl}"].notna().any():
            show[f"{lvl} band"] = [
                pct(v, 0) + (" %" if pd.notna(v) else "") for v in s[f"band_coverage_{lvl}"]
            ]
    if "sakr_vacuous_share" in s:
        show["sakr vacuous"] = [
            pct(v, 0) + (" %" if pd.notna(v) else "") for v in s["sakr_vacuous_share"]
        ]
    rows = list(s.itertuples())
    if verdicts is not None and len(verdicts):
        show["H_U fails"] = [_hu_share(verdicts, r) for r in rows]
        show["H_G margins fail"] = [_hg_share(verdicts, r) for r in rows]
    lines = []
    if accuracies:
        lines.append(
            "float accuracy: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in accuracies.items())
        )
    lines.append(show.to_string(index=False))
    lines.append(
        "L1/L2/L3: last layer (Gaussian features + error model / + actual error; empirical "
        "features + error model); L2L/L3L: all layers, first order (actual error / error "
        "model); band: measured flip rate inside the 95 % band of L3 (last) or L3L (all); "
        "sakr: bound clipped at 1 per image, 'sakr vacuous' the cells where the published "
        "bound is >= 1."
    )
    if any(c.startswith("L3I") for c in cols):
        lines.append(
            "L3I: L3L with each layer's second moment inflated by the noise at its input "
            "(all_layers.input_noise, theory/multilayer.md eq. L25), 'L3I band' the coverage of "
            "its band; 'all, bias-corrected': "
            "the networks with corrected biases (all_layers.bias_correction, eq. L22)."
        )
    if any(c.startswith("L3S") for c in cols):
        lines.append(
            "L3S: L3L moved by the mean of the network whose ReLUs are smoothed by the noise "
            "each one sees (all_layers.smoothed_probes, theory/multilayer.md eq. L31), "
            "'L3S band' the coverage of its band."
        )
    if any(c.startswith("L3N") for c in cols):
        lines.append(
            "L3N: the mean of dithered networks, every layer with a subtractive-dither error of "
            "its real step run through the real network (all_layers.dither_realizations: H_U "
            "exact, nothing linearized), 'L3N band' the coverage of their order-statistic band."
        )
    if verdicts is not None and len(verdicts):
        lines.append(
            "H_U fails: share of (quantized layer x bit-width) whose error fails the uniform "
            "hypothesis; H_G margins fail: share of logit margins failing normality (last layer)."
        )
    return "\n".join(lines)


def _hu_share(verdicts: pd.DataFrame, row: Any) -> str:
    if "H_U_fails" not in verdicts:
        return "-"
    lo, hi = int(row.bits_min), int(row.bits_max)
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
