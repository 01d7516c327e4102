"""distortion: predict, explain and measure the accuracy loss of a quantized network.

``import distortion`` loads numpy, scipy and pandas only: torch and matplotlib are imported
where they are needed (``distortion.experiments``, ``distortion.plotting``).
"""

from distortion.quantize import (
    QuantizedTensor,
    QuantParams,
    UniformQuantizer,
    choose_qparams,
    dequantize,
    quantize,
)

__version__ = "0.1.0"

__all__ = [
    "QuantParams",
    "QuantizedTensor",
    "UniformQuantizer",
    "__version__",
    "choose_qparams",
    "dequantize",
    "quantize",
]
