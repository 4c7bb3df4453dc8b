"""flatq_lightning: train a full-precision network to be flat for the quantizer it will meet.

Lightning callbacks record the target quantizer's weight and activation errors, inject noise with their
statistics while the network trains, and quantize the result with plain PTQ after fit.
"""

from .callbacks import (
    DNQ,
    ActivationNoiseInjection,
    ActNoiseConfig,
    DifferentialNoiseInjection,
    QuantErrorRecorder,
    Ramp,
    RecorderConfig,
    Warmup,
    WeightNoiseConfig,
    dnq_callbacks,
)
from .callbacks.flatness import SharpnessMonitor, hessian_trace, top_eigenvalue
from .callbacks.mse import QuantMSEMixin
from .callbacks.sam import SAM
from .ptq.callback import PostTrainingQuantization
from .ptq.export import load_quantized, save_quantized
from .ptq.recipe import PTQRecipe
from .ptq.report import PTQReport
from .ptq.runner import run_ptq
from .quant import (
    QuantSpec,
    QuantTarget,
    Reconstruction,
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

try:  # the one place the version is stated is pyproject.toml
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("flatq_lightning")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DNQ",
    "SAM",
    "SharpnessMonitor",
    "hessian_trace",
    "top_eigenvalue",
    "PTQRecipe",
    "PTQReport",
    "Reconstruction",
    "PostTrainingQuantization",
    "load_quantized",
    "run_ptq",
    "save_quantized",
    "ActivationNoiseInjection",
    "DifferentialNoiseInjection",
    "QuantErrorRecorder",
    "QuantMSEMixin",
    "Ramp",
    "Warmup",
    "RecorderConfig",
    "WeightNoiseConfig",
    "ActNoiseConfig",
    "dnq_callbacks",
    "QuantSpec",
    "QuantTarget",
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
