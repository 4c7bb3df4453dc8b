"""The noise callbacks under their first module name (kept for imports written against it).

:mod:`.weight_noise` holds :class:`DifferentialNoiseInjection`, :mod:`.act_noise`
:class:`ActivationNoiseInjection`, :mod:`.noise_source` the regenerable noise, :mod:`.schedules` :class:`Ramp`.
"""

from .act_noise import ActivationNoiseInjection
from .noise_source import NOISE_SOURCES, POOL_MIN_NUMEL, NoiseSource
from .schedules import Ramp
from .weight_noise import NOISE_MODES, NOISY_BN_KEY, DifferentialNoiseInjection

__all__ = [
    "NOISE_MODES",
    "NOISE_SOURCES",
    "NOISY_BN_KEY",
    "POOL_MIN_NUMEL",
    "ActivationNoiseInjection",
    "DifferentialNoiseInjection",
    "NoiseSource",
    "Ramp",
]
