"""distortion: predict, explain and measure the accuracy loss of a quantized network.

``import distortion`` loads numpy, scipy and pandas only: torch and matplotlib are imported
where they are needed (model building, extraction, measurement, ``distortion.plotting``).
"""

from distortion.experiments.features import FeatureSet
from distortion.quantize import (
    QuantizedTensor,
    QuantParams,
    UniformQuantizer,
    choose_qparams,
    dequantize,
    quantize,
)
from distortion.theory.binary import (
    BayesRisk,
    DistortionCurve,
    DistortionResult,
    FlipResult,
    bayes_risk,
    distortion_curve,
    flip_probability,
    risk_of_weights,
)
from distortion.theory.binary import distortion as binary_distortion
from distortion.theory.gaussian import GaussianModel

__version__ = "0.1.0"

__all__ = [
    "BayesRisk",
    "DistortionCurve",
    "DistortionResult",
    "FeatureSet",
    "FlipResult",
    "GaussianModel",
    "QuantParams",
    "QuantizedTensor",
    "UniformQuantizer",
    "__version__",
    "bayes_risk",
    "binary_distortion",
    "choose_qparams",
    "dequantize",
    "distortion_curve",
    "flip_probability",
    "quantize",
    "risk_of_weights",
]
