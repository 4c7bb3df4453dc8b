"""Post-training quantization: the runner, the callback that runs it after fit, its report, exports and CLI.

The quantizer arithmetic lives in :mod:`flatq_lightning.quant`; this part drives it over a trained network
(BN handling, calibration, one quantized copy per bit-width, evaluation) and hands the result on: packed
safetensors (:mod:`.export`) and ONNX with QuantizeLinear/DequantizeLinear checked in ONNX Runtime
(:mod:`.onnx_export`, needs the ``[onnx]`` extra only when called). How each copy is made is a
:class:`~.recipe.PTQRecipe` (observers, BN re-estimation, block reconstruction). Which layer costs the accuracy:
:mod:`.sensitivity` (predicted and measured per-layer sensitivity); a per-layer weight-width plan under a size
budget: :mod:`.mixed_precision`.
"""

from .callback import PostTrainingQuantization
from .export import load_quantized, save_quantized
from .mixed_precision import MixedPrecisionPlan, plan_bits, plan_mixed_precision
from .onnx_export import check_onnx_parity, export_onnx
from .recipe import RECIPES, PTQRecipe, resolve_recipe
from .report import PTQReport
from .runner import run_ptq
from .sensitivity import SensitivityReport, analyze_sensitivity, measure_sensitivity, predict_sensitivity

__all__ = [
    "RECIPES",
    "MixedPrecisionPlan",
    "SensitivityReport",
    "analyze_sensitivity",
    "measure_sensitivity",
    "plan_bits",
    "plan_mixed_precision",
    "predict_sensitivity",
    "PTQRecipe",
    "PTQReport",
    "PostTrainingQuantization",
    "check_onnx_parity",
    "export_onnx",
    "load_quantized",
    "resolve_recipe",
    "run_ptq",
    "save_quantized",
]
