"""Quantization core: one spec, pure fake-quant functions, observers, layer selection and PTQ."""

from .attention import (
    QuantizedAttention,
    QuantPoint,
    attach_attention_points,
    attention_points,
    detach_attention_points,
    is_patched_attention,
)
from .observers import MinMaxObserver, MSEObserver, PercentileObserver, RangeObserver, make_observer
from .ops import (
    check_finite,
    compute_qparams,
    dequantize_int,
    fake_quantize,
    observe_range,
    qparams_from_range,
    quant_error,
    quant_error_stats,
    quantize_int,
    round_ste,
    sqnr_db,
)
from .ptq import QuantizedLayer, batch_inputs, calibrate, fold_batchnorm, quantize_model, quantized_layers
from .spec import QuantSpec, parse_bits, preset_name
from .targets import QUANTIZABLE_TYPES, first_last_names, has_weight, layer_specs, select_modules

__all__ = [
    "QUANTIZABLE_TYPES",
    "MSEObserver",
    "MinMaxObserver",
    "PercentileObserver",
    "QuantPoint",
    "QuantSpec",
    "QuantizedAttention",
    "QuantizedLayer",
    "RangeObserver",
    "attach_attention_points",
    "attention_points",
    "batch_inputs",
    "calibrate",
    "check_finite",
    "compute_qparams",
    "dequantize_int",
    "detach_attention_points",
    "fake_quantize",
    "first_last_names",
    "fold_batchnorm",
    "has_weight",
    "is_patched_attention",
    "layer_specs",
    "make_observer",
    "observe_range",
    "parse_bits",
    "preset_name",
    "qparams_from_range",
    "quant_error",
    "quant_error_stats",
    "quantize_int",
    "quantize_model",
    "quantized_layers",
    "round_ste",
    "select_modules",
    "sqnr_db",
]
