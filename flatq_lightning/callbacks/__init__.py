"""Training time: the DNQ callbacks and what they work with.

- :class:`DNQ`: the method in one callback (recorder + differential weight noise + activation noise);
  :func:`dnq_callbacks` gives the same parts as separate callbacks.
- :class:`QuantErrorRecorder` (:mod:`.recorder`): the target quantizer's error statistics, which the noise
  callbacks and :class:`~flatq_lightning.callbacks.mse.QuantMSEMixin` are given.
- :class:`DifferentialNoiseInjection` (:mod:`.weight_noise`) with its :class:`NoiseMode` strategies
  (:mod:`.noise_modes`) and its in-place noise engine (:mod:`.param_noise`, usable without a Trainer),
  :class:`ActivationNoiseInjection` (:mod:`.act_noise`), regenerable noise (:mod:`.noise_source`) and
  schedules (:mod:`.schedules`).
- The FP-vs-quantized MSE mixin (:mod:`.mse`), SAM (:mod:`.sam`), flatness measures and their callback
  (:mod:`.flatness`).
"""

from __future__ import annotations

from .act_noise import ActivationNoiseInjection
from .dnq import DNQ, dnq_callbacks
from .group import CallbackGroup
from .noise_source import NoiseSource
from .recorder import QuantErrorRecorder
from .schedules import PiecewiseLinear, Ramp, trapezoid
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
    "UniformNoise",
    "dnq_callbacks",
    "trapezoid",
]
