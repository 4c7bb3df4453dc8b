"""Post-training quantization: the runner, the callback that runs it after fit, its report, exports and CLI.

The quantizer arithmetic lives in :mod:`flatq_lightning.quant`; this part drives it over a trained network
(BN handling, calibration, one quantized copy per bit-width, evaluation) and hands the result on.
"""

from .callback import PostTrainingQuantization
from .export import load_quantized, save_quantized
from .report import PTQReport
from .runner import run_ptq

__all__ = ["PTQReport", "PostTrainingQuantization", "load_quantized", "run_ptq", "save_quantized"]
