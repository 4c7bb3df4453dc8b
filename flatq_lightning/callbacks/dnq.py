"""DNQ in one callback: the recorder, the differential weight noise and the activation noise, composed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch.callbacks import Callback

from ..quant.targets import QuantTarget
from .act_noise import ActivationNoiseInjection
from .group import CallbackGroup
from .recorder import QuantErrorRecorder
from .weight_noise import DifferentialNoiseInjection, NoiseMode

__all__ = ["DNQ", "dnq_callbacks"]


class DNQ(CallbackGroup):
    """Differential noise injection for a target quantizer, as one self-contained callback.

    It builds and runs, in this order, a :class:`QuantErrorRecorder` (:attr:`recorder`), a
    :class:`DifferentialNoiseInjection` (:attr:`weight_noise`, ``None`` with ``weight_noise=False``) and an
    :class:`ActivationNoiseInjection` (:attr:`act_noise`, ``None`` with ``act_noise=False``): the same callbacks,
    hooks and numbers as listing the three in a Trainer, in one object a config file can name::

        # LightningCLI                               # Hydra
        trainer:                                     callbacks:
          callbacks:                                   dnq:
            - class_path: flatq_lightning.DNQ            _target_: flatq_lightning.DNQ
              init_args: {target: w4a4, p: 0.5}          target: w4a4

    ``target``: the quantizer the network will meet, a :class:`~flatq_lightning.quant.targets.QuantTarget` (its
    quantizers, the layers in scope, the first/last policy, attention points, per-layer widths) or a preset
    string (``"w4a4"``); both sides quantized. ``warmup_steps`` / ``warmup_fraction``: no noise for that many optimizer steps, or that fraction of the fit
    (clean training first). With the target's ``attention_points`` Q, K, V and the softmax output of timm
    attention modules are recorded (and noised) too. ``clean_bn_batches``: training batches on which the end of fit (and every checkpoint)
    re-estimates the BatchNorm statistics on the clean weights; 0 keeps those gathered under noise. ``name``:
    this DNQ's name (its recorder's: the ``quant_<name>/`` metrics and the checkpoint's state key), by default
    the target's (``"w4a4"``). ``placement``: ``"onnxruntime"`` also records and perturbs the residual-block and
    pooling points that PTQ with ``placement="onnxruntime"`` quantizes (:mod:`~flatq_lightning.quant.placement`),
    each tensor once. The other arguments are those of the three parts.

    One DNQ per Trainer: two with the same name have the same state key, which Lightning refuses when the
    Trainer is built ("Found more than one stateful callback of type `DNQ`", before any hook of ours runs);
    with distinct names (``DNQ("w4a4", name="w4a4_b")``) a second DNQ with weight noise is refused at setup,
    because each would measure the other's noise as part of the clean weights. Keep one DNQ, and watch other
    bit-widths with ``QuantErrorRecorder(target, name=...)`` callbacks beside it.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> dnq = DNQ("w4a4", noise_scale=1.0, p=0.5)
        >>> [type(c).__name__ for c in dnq.parts]
        ['QuantErrorRecorder', 'DifferentialNoiseInjection', 'ActivationNoiseInjection']
        >>> trainer = Trainer(callbacks=[dnq], logger=False, enable_checkpointing=False)
    """

    def __init__(
        self,
        target: QuantTarget | str = "w4a4",
        *,
        noise_scale: float | Callable[[int], float] = 1.0,
        mode: str | NoiseMode = "differential",
        weight_noise: bool = True,
        act_noise: bool = True,
        p: float = 0.5,
        act_noise_scale: float | Callable[[int], float] = 1.0,
        stats_every: int = 16,
        momentum: float = 0.9,
        warmup_steps: int = 0,
        warmup_fraction: float = 0.0,
        seed: int = 0,
        noise_source: str = "auto",
        clean_bn_batches: int = 32,
        name: str | None = None,
        placement: str = "layer_inputs",
    ) -> None:
        for flag, value in (("weight_noise", weight_noise), ("act_noise", act_noise)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string or None (the target's name), got {name!r}")
        #: the statistics of the target quantizer's errors, which both noise parts read
        self.recorder = QuantErrorRecorder(
            target,
            stats_every=stats_every,
            momentum=momentum,
            record_activations=act_noise,
            refresh_weights=not weight_noise,
            name=name,
            placement=placement,
        )
        #: the weight noise (owns the clean weights and the clean BN statistics), or None
        self.weight_noise: DifferentialNoiseInjection | None = None
        if weight_noise:
            self.weight_noise = DifferentialNoiseInjection(
                self.recorder, noise_scale=noise_scale, mode=mode, warmup_steps=warmup_steps, seed=seed,
                warmup_fraction=warmup_fraction, noise_source=noise_source, clean_bn_batches=clean_bn_batches,
            )
        #: the activation noise, or None
        self.act_noise: ActivationNoiseInjection | None = None
        if act_noise:
            self.act_noise = ActivationNoiseInjection(
                self.recorder, p=p, noise_scale=act_noise_scale, seed=seed, warmup_steps=warmup_steps,
                noise_source=noise_source, warmup_fraction=warmup_fraction,
            )
        super().__init__([c for c in (self.recorder, self.weight_noise, self.act_noise) if c is not None])

    @property
    def state_key(self) -> str:
        return self._generate_state_key(recorder=self.recorder.name)

    @property
    def target(self) -> QuantTarget:
        """The quantizer the network is trained for (the recorder's)."""
        return self.recorder.target

    def part_names(self) -> list[str]:
        return [n for n, c in (("recorder", self.recorder), ("weight_noise", self.weight_noise),
                               ("act_noise", self.act_noise)) if c is not None]

    @contextlib.contextmanager
    def clean_weights(self) -> Iterator[None]:
        """Inside the block the parameters hold the clean weights (a no-op without weight noise)."""
        with self.weight_noise.clean_weights() if self.weight_noise is not None else contextlib.nullcontext():
            yield


def dnq_callbacks(target: QuantTarget | str = "w4a4", **kwargs: Any) -> list[Callback]:
    """The parts of :class:`DNQ` as separate callbacks, for those who list them one by one: ``DNQ``'s arguments,
    the same callbacks and numbers (``DNQ(target, **kwargs).parts``).

    Example:
        >>> [type(c).__name__ for c in dnq_callbacks("w4a4", act_noise=False)]
        ['QuantErrorRecorder', 'DifferentialNoiseInjection']
    """
    return list(DNQ(target, **kwargs).parts)
