"""Lightning callbacks: error recorders, weight and activation noise (and the PTQ/flatness families)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lightning.pytorch.callbacks import Callback

from ..quant.spec import QuantSpec
from .noise import ActivationNoiseInjection, DifferentialNoiseInjection, NoiseSource, Ramp
from .recorder import QuantErrorRecorder

__all__ = [
    "ActivationNoiseInjection",
    "DifferentialNoiseInjection",
    "NoiseSource",
    "QuantErrorRecorder",
    "Ramp",
    "dnq_callbacks",
]


def dnq_callbacks(
    preset: str | QuantSpec = "w4a4",
    *,
    act_spec: QuantSpec | None = None,
    noise_scale: float | Callable[[int], float] = 1.0,
    mode: str = "differential",
    weight_noise: bool = True,
    act_noise: bool = True,
    p: float = 0.5,
    act_noise_scale: float | Callable[[int], float] = 1.0,
    stats_every: int = 16,
    momentum: float = 0.9,
    warmup_steps: int = 0,
    warmup_fraction: float = 0.0,
    seed: int = 0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    keep_first_last_8bit: bool = True,
    noise_source: str = "auto",
    attention_points: bool = True,
    clean_bn_batches: int = 32,
) -> list[Callback]:
    """The DNQ callbacks wired together: recorder, differential weight noise, activation noise.

    ``preset``: the target quantizer as a preset (``"w4a4"``) or as the weight :class:`QuantSpec`, with
    ``act_spec`` for the activations (default: the method's activation quantizer at the weight's bits).

    ``warmup_steps`` / ``warmup_fraction``: no noise for that many optimizer steps, or that fraction of the fit
    (clean training first, then DNQ). ``attention_points``: also record (and noise) Q, K, V and the softmax output of timm attention modules
    during fit (see :class:`QuantErrorRecorder`). ``clean_bn_batches``: training batches on which the end of fit
    (and every checkpoint) re-estimates the BatchNorm statistics on the clean weights; 0 keeps those gathered
    under noise (see :class:`DifferentialNoiseInjection`).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> cbs = dnq_callbacks("w4a4", noise_scale=1.0, p=0.5)
        >>> [type(c).__name__ for c in cbs]
        ['QuantErrorRecorder', 'DifferentialNoiseInjection', 'ActivationNoiseInjection']
        >>> trainer = Trainer(callbacks=[*cbs], logger=False, enable_checkpointing=False)
    """
    recorder = QuantErrorRecorder(
        preset,
        act_spec,
        stats_every=stats_every,
        momentum=momentum,
        include=list(include) if isinstance(include, Sequence) and not isinstance(include, str) else include,
        exclude=list(exclude) if isinstance(exclude, Sequence) and not isinstance(exclude, str) else exclude,
        keep_first_last_8bit=keep_first_last_8bit,
        record_activations=act_noise,
        attention_points=attention_points,
    )
    cbs: list[Callback] = [recorder]
    if weight_noise:
        cbs.append(
            DifferentialNoiseInjection(
                recorder, noise_scale=noise_scale, mode=mode, warmup_steps=warmup_steps, seed=seed,
                warmup_fraction=warmup_fraction, noise_source=noise_source, clean_bn_batches=clean_bn_batches,
            )
        )
    if act_noise:
        cbs.append(
            ActivationNoiseInjection(
                recorder, p=p, noise_scale=act_noise_scale, seed=seed, warmup_steps=warmup_steps, noise_source=noise_source,
                warmup_fraction=warmup_fraction,
            )
        )
    return cbs
