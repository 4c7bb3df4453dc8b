"""How the weight noise is drawn and when it sits in the parameters: one small strategy per mode."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from .recorder import QuantErrorRecorder

__all__ = ["NOISE_MODES", "AddRemoveNoise", "DifferentialNoise", "NoNoise", "NoiseMode", "UniformNoise"]


class NoiseMode:
    """How the weight noise is drawn and when it sits in the parameters: one small strategy per mode.

    ``δ = a + b ⊙ ε`` per output channel, ``ε`` standard noise of :attr:`distribution`; :meth:`coefficients`
    gives ``(a, b)`` from the recorder's statistics. Subclass and pass an instance as
    ``DifferentialNoiseInjection(mode=...)`` to change the noise (for example its law or its scale).

    Example:
        >>> [m.name for m in (DifferentialNoise(), AddRemoveNoise(), UniformNoise(), NoNoise())]
        ['differential', 'add_remove', 'uniform', 'off']
        >>> NoiseMode.from_name("add_remove").persistent
        False
    """

    #: the name ``mode=`` takes and the logged ``dnq/weight_noise/mode``
    name: ClassVar[str] = ""
    #: the standard noise ε: ``"normal"`` N(0, 1) or ``"uniform"`` U(-½, ½)
    distribution: ClassVar[str] = "normal"
    #: True: the parameters hold ``W + δ_t`` between optimizer steps and move by ``δ_{t+1} − δ_t`` after each
    #: (one in-place pass per step); False: δ is added before the forward and removed before the optimizer step
    persistent: ClassVar[bool] = True
    #: False: no noise at all (the callback only records)
    active: ClassVar[bool] = True

    def coefficients(self, recorder: QuantErrorRecorder, layer: str, kappa: float) -> tuple[Tensor | None, Tensor]:
        """``(a, b)`` per output channel of ``layer`` at noise scale ``kappa``: the recorded error's mean and std."""
        return kappa * recorder.weight_mean[layer], kappa * recorder.weight_var[layer].clamp_min(0).sqrt()

    @staticmethod
    def from_name(mode: str | NoiseMode) -> NoiseMode:
        """An instance for ``mode`` (a name in :data:`NOISE_MODES` or an instance, returned as is)."""
        if isinstance(mode, NoiseMode):
            return mode
        if mode not in NOISE_MODES:
            raise ValueError(f"mode must be one of {tuple(NOISE_MODES)} or a NoiseMode, got {mode!r}")
        return NOISE_MODES[mode]()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DifferentialNoise(NoiseMode):
    """The method's noise: Gaussian with the recorded weight-error statistics, moved differentially."""

    name = "differential"


class AddRemoveNoise(NoiseMode):
    """The same Gaussian noise, added before each forward and removed before each optimizer step (the
    parameters are clean between steps, so weight averaging sees clean weights; two passes per step)."""

    name = "add_remove"
    persistent = False


class UniformNoise(NoiseMode):
    """DiffQ-style pseudo-quantization noise: uniform in ``[-Δ/2, Δ/2]`` with the quantizer's step ``Δ``."""

    name = "uniform"
    distribution = "uniform"

    def coefficients(self, recorder: QuantErrorRecorder, layer: str, kappa: float) -> tuple[Tensor | None, Tensor]:
        return None, kappa * recorder.weight_scale[layer]


class NoNoise(NoiseMode):
    """No weight noise: the callback records and logs, the parameters are never touched."""

    name = "off"
    active = False


#: ``mode=`` name → strategy class
NOISE_MODES: dict[str, type[NoiseMode]] = {
    m.name: m for m in (DifferentialNoise, AddRemoveNoise, UniformNoise, NoNoise)
}
