"""distortion: predict, explain and measure the accuracy loss of a quantized network.

The public names below are loaded lazily (PEP 562): ``import distortion`` itself imports
nothing heavy, and ``from distortion import X`` loads only the module that defines ``X``
(numpy, scipy and pandas at most). torch and matplotlib are imported only where they are
needed (model building, extraction, measurement, ``distortion.plotting``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> (module, attribute in that module)
_LAZY: dict[str, tuple[str, str]] = {
    **{
        n: ("distortion.estimator", n)
        for n in ("AccuracyLossEstimator", "AccuracyLossPrediction", "BitAllocation")
    },
    "FeatureSet": ("distortion.experiments.features", "FeatureSet"),
    **{
        n: ("distortion.activations", n)
        for n in ("ActivationQParams", "ActivationQuantizer", "BackendPreset", "preset")
    },
    **{
        n: ("distortion.compressors", n)
        for n in (
            "Compose",
            "KMeansQuantizer",
            "LowRank",
            "MagnitudePruner",
            "NonUniformQuantizer",
            "ResidualExpansion",
        )  # fmt: skip
    },
    **{n: ("distortion.compression", n) for n in ("Compressed", "Compressor")},
    **{n: ("distortion.results", n) for n in ("Band", "ConfidenceInterval", "Prediction")},
    "ErrorModel": ("distortion.theory.error_models", "ErrorModel"),
    **{
        n: ("distortion.quantize", n)
        for n in (
            "QuantizedTensor",
            "QuantParams",
            "UniformQuantizer",
            "choose_qparams",
            "dequantize",
            "quantize",
        )  # fmt: skip
    },
    **{
        n: ("distortion.theory.baselines", n)
        for n in (
            "HawqSensitivity",
            "HessianTrace",
            "SakrBound",
            "hawq_v2_sensitivity",
            "sakr_bound",
        )  # fmt: skip
    },
    **{
        n: ("distortion.theory.binary", n)
        for n in (
            "BayesRisk",
            "DistortionCurve",
            "DistortionResult",
            "FlipResult",
            "bayes_risk",
            "distortion_curve",
            "flip_probability",
            "flip_rate",
            "flip_rate_of_weights",
            "risk_of_weights",
        )  # fmt: skip
    },
    "binary_distortion": ("distortion.theory.binary", "distortion"),
    "GaussianModel": ("distortion.theory.gaussian", "GaussianModel"),
    **{
        n: ("distortion.theory.multiclass", n)
        for n in (
            "MulticlassDistortion",
            "SemiParametricDistortion",
            "multiclass_accuracy",
            "multiclass_distortion",
            "multiclass_distortion_actual",
            "semiparametric_distortion",
        )  # fmt: skip
    },
    **{
        n: ("distortion.theory.multilayer", n)
        for n in ("GradientGrams", "MultilayerDistortion", "multilayer_distortion")
    },
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'distortion' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
