"""DNQ in one callback: the recorder, the differential weight noise and the activation noise, composed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback

from ..quant.targets import QuantTarget
from .act_noise import ActivationNoiseInjection
from .dnq_config import ActNoiseConfig, RecorderConfig, WeightNoiseConfig, part_kwargs, resolve_part_configs
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
    string (``"w4a4"``); both sides quantized. With the target's ``attention_points`` Q, K, V and the softmax
    output of timm attention modules are recorded (and noised) too.

    The parts' options: ``recorder`` (a :class:`~.dnq_config.RecorderConfig`), ``weight_noise`` and ``act_noise``
    (``True``, ``False``: that part off, or a :class:`~.dnq_config.WeightNoiseConfig` /
    :class:`~.dnq_config.ActNoiseConfig`: on, with these options); a mapping of a config's fields is accepted
    too (a Hydra YAML node). The flat arguments are shortcuts for the options used most (the YAML's keys):
    ``stats_every``, ``momentum``, ``placement`` (the recorder's), ``noise_scale``, ``mode``,
    ``clean_bn_batches`` (the weight noise's), ``p``, ``act_noise_scale`` (the activation noise's
    ``noise_scale``), ``seed`` and ``noise_source`` (both noises'). ``None`` is not set: a part option set
    nowhere takes the part's own default. A flat argument and a config field that set the same option to
    different values are a ``ValueError`` naming both. ``warmup_steps`` / ``warmup_fraction``: no noise for that
    many optimizer steps, or that fraction of the fit (clean training first): both noise scales inside a
    :class:`~.schedules.Warmup` (give a ``Warmup`` as a config's ``noise_scale`` to warm one noise up alone).
    ``clean_bn_batches``: training batches on which the end of fit (and every checkpoint) re-estimates the
    BatchNorm statistics on the clean weights; 0 keeps those gathered under noise. ``name``: this DNQ's name
    (its recorder's: the ``quant_<name>/`` metrics and the checkpoint's state key), by default the target's
    (``"w4a4"``). ``placement``: ``"onnxruntime"`` also records and perturbs the residual-block and pooling
    points that PTQ with ``placement="onnxruntime"`` quantizes (:mod:`~flatq_lightning.quant.placement`), each
    tensor once.

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
        >>> quiet = DNQ("w4a4", recorder=RecorderConfig(log_sqnr=False), act_noise=ActNoiseConfig(pool_numel=1 << 20))
        >>> quiet.recorder.log_sqnr, quiet.act_noise.pool_numel, quiet.act_noise.p
        (False, 1048576, 0.5)
    """

    def __init__(
        self,
        target: QuantTarget | str = "w4a4",
        *,
        recorder: RecorderConfig | Mapping[str, Any] | None = None,
        weight_noise: bool | WeightNoiseConfig | Mapping[str, Any] = True,
        act_noise: bool | ActNoiseConfig | Mapping[str, Any] = True,
        noise_scale: float | Callable[[int], float] | None = None,
        mode: str | NoiseMode | None = None,
        p: float | None = None,
        act_noise_scale: float | Callable[[int], float] | None = None,
        stats_every: int | None = None,
        momentum: float | None = None,
        warmup_steps: int | None = None,
        warmup_fraction: float | None = None,
        seed: int | None = None,
        noise_source: str | None = None,
        clean_bn_batches: int | None = None,
        name: str | None = None,
        placement: str | None = None,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string or None (the target's name), got {name!r}")
        flat = dict(
            noise_scale=noise_scale, mode=mode, p=p, act_noise_scale=act_noise_scale, stats_every=stats_every,
            momentum=momentum, warmup_steps=warmup_steps, warmup_fraction=warmup_fraction, seed=seed,
            noise_source=noise_source, clean_bn_batches=clean_bn_batches, placement=placement,
        )
        cfg = resolve_part_configs(recorder, weight_noise, act_noise, flat)
        rec_kw = part_kwargs(cfg["recorder"])
        record = rec_kw.pop("record_activations", cfg["act_noise"] is not None)
        #: the statistics of the target quantizer's errors, which both noise parts read
        self.recorder = QuantErrorRecorder(
            target, record_activations=record, refresh_weights=cfg["weight_noise"] is None, name=name, **rec_kw
        )
        #: the weight noise (owns the clean weights and the clean BN statistics), or None
        self.weight_noise: DifferentialNoiseInjection | None = None
        if cfg["weight_noise"] is not None:
            self.weight_noise = DifferentialNoiseInjection(self.recorder, **part_kwargs(cfg["weight_noise"]))
        #: the activation noise, or None
        self.act_noise: ActivationNoiseInjection | None = None
        if cfg["act_noise"] is not None:
            self.act_noise = ActivationNoiseInjection(self.recorder, **part_kwargs(cfg["act_noise"]))
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
