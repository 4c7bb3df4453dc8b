"""Training time: the DNQ callbacks and what they work with.

- :class:`DNQ`: the method in one callback (recorder + differential weight noise + activation noise), the options
  of its parts in :class:`RecorderConfig`, :class:`WeightNoiseConfig`, :class:`ActNoiseConfig` (:mod:`.dnq_config`);
  :func:`dnq_callbacks` gives the same parts as separate callbacks.
- :class:`QuantErrorRecorder` (:mod:`.recorder`): the target quantizer's error statistics, which the noise
  callbacks and :class:`~flatq_lightning.callbacks.mse.QuantMSEMixin` are given.
- :class:`DifferentialNoiseInjection` (:mod:`.weight_noise`) with its :class:`NoiseMode` strategies
  (:mod:`.noise_modes`) and its in-place noise engine (:mod:`.param_noise`, usable without a Trainer),
  :class:`ActivationNoiseInjection` (:mod:`.act_noise`), regenerable noise (:mod:`.noise_source`) and
  schedules of the noise scale, the warm-up included (:mod:`.schedules`: :class:`Warmup`, :class:`Ramp`, ...).
- The FP-vs-quantized MSE mixin (:mod:`.mse`), SAM (:mod:`.sam`), flatness measures and their callback
  (:mod:`.flatness`).
"""

from __future__ import annotations

from .act_noise import ActivationNoiseInjection
from .dnq import DNQ, dnq_callbacks
from .dnq_config import ActNoiseConfig, RecorderConfig, WeightNoiseConfig
from .group import CallbackGroup
from .noise_source import NoiseSource
from .recorder import QuantErrorRecorder
from .schedules import PiecewiseLinear, Ramp, Warmup, trapezoid
from .weight_noise import (
    AddRemoveNoise,
    DifferentialNoise,
    DifferentialNoiseInjection,
    NoiseMode,
    NoNoise,
    UniformNoise,
)

__all__ = [
    "DNQ",
    "ActNoiseConfig",
    "ActivationNoiseInjection",
    "AddRemoveNoise",
    "CallbackGroup",
    "DifferentialNoise",
    "DifferentialNoiseInjection",
    "NoNoise",
    "NoiseMode",
    "NoiseSource",
    "PiecewiseLinear",
    "QuantErrorRecorder",
    "Ramp",
    "RecorderConfig",
    "UniformNoise",
    "Warmup",
    "WeightNoiseConfig",
    "dnq_callbacks",
    "trapezoid",
]
