"""flatq_lightning: train a full-precision network to be flat for the quantizer it will meet.

Lightning callbacks record the target quantizer's weight and activation errors, inject noise with their
statistics while the network trains, and quantize the result with plain PTQ after fit.
"""

from .callbacks import (
    ActivationNoiseInjection,
    DifferentialNoiseInjection,
    QuantErrorRecorder,
    Ramp,
    dnq_callbacks,
)
from .callbacks.flatness import SharpnessMonitor
from .callbacks.ptq import PostTrainingQuantization
from .export import load_quantized, save_quantized
from .flatness import hessian_trace, top_eigenvalue
from .mse import QuantMSEMixin
from .ptq_runner import run_ptq
from .quant import (
    QuantSpec,
    compute_qparams,
    fake_quantize,
    fold_batchnorm,
    quant_error_stats,
    quantize_model,
    reestimate_bn,
    reestimate_bn_quantized,
    select_modules,
    sqnr_db,
)
from .report import PTQReport
from .sam import SAM

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "SharpnessMonitor",
    "hessian_trace",
    "top_eigenvalue",
    "PTQReport",
    "PostTrainingQuantization",
    "load_quantized",
    "run_ptq",
    "save_quantized",
    "ActivationNoiseInjection",
    "DifferentialNoiseInjection",
    "QuantErrorRecorder",
    "QuantMSEMixin",
    "Ramp",
    "dnq_callbacks",
    "QuantSpec",
    "compute_qparams",
    "fake_quantize",
    "fold_batchnorm",
    "quant_error_stats",
    "quantize_model",
    "reestimate_bn",
    "reestimate_bn_quantized",
    "select_modules",
    "sqnr_db",
]
