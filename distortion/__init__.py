"""distortion: predict, explain and measure the accuracy loss of a quantized network.

``import distortion`` loads numpy, scipy and pandas only: torch and matplotlib are imported
where they are needed (model building, extraction, measurement, ``distortion.plotting``).
"""

from distortion.estimator import AccuracyLossEstimator, AccuracyLossPrediction, BitAllocation
from distortion.experiments.features import FeatureSet
from distortion.quantize import (
    QuantizedTensor,
    QuantParams,
    UniformQuantizer,
    choose_qparams,
    dequantize,
    quantize,
)
from distortion.theory.baselines import (
    HawqSensitivity,
    HessianTrace,
    SakrBound,
    hawq_v2_sensitivity,
    sakr_bound,
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
from distortion.theory.multiclass import (
    MulticlassDistortion,
    SemiParametricDistortion,
    multiclass_accuracy,
    multiclass_distortion,
    multiclass_distortion_actual,
    semiparametric_distortion,
)
from distortion.theory.multilayer import GradientGrams, MultilayerDistortion, multilayer_distortion

__version__ = "0.1.0"

__all__ = [
    "AccuracyLossEstimator",
    "AccuracyLossPrediction",
    "BayesRisk",
    "BitAllocation",
    "DistortionCurve",
    "DistortionResult",
    "FeatureSet",
    "FlipResult",
    "GaussianModel",
    "GradientGrams",
    "HawqSensitivity",
    "HessianTrace",
    "MulticlassDistortion",
    "MultilayerDistortion",
    "QuantParams",
    "QuantizedTensor",
    "SakrBound",
    "SemiParametricDistortion",
    "UniformQuantizer",
    "__version__",
    "bayes_risk",
    "binary_distortion",
    "choose_qparams",
    "dequantize",
    "distortion_curve",
    "flip_probability",
    "hawq_v2_sensitivity",
    "multiclass_accuracy",
    "multiclass_distortion",
    "multiclass_distortion_actual",
    "multilayer_distortion",
    "quantize",
    "risk_of_weights",
    "sakr_bound",
    "semiparametric_distortion",
]
