"""Stochastic activation noise with the recorded activation-error statistics."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from ..quant.hooks import hooks_are_suspended
from ..utils.checks import check_int, check_scale_value
from ..utils.logging import log_every_n_steps, log_settings
from ._common import (
    recorder_settings,
    splitmix64,
)
from .noise_source import (
    NOISE_SOURCES,
    NoiseSource,
    ScheduledNoise,
    schedule_settings,
    with_deprecated_warmup,
)
from .recorder import QuantErrorRecorder

__all__ = ["ActivationNoiseInjection"]


class ActivationNoiseInjection(ScheduledNoise, Callback):
    """Stochastic activation noise: on training forwards, each selected layer input ``x`` becomes
    ``x + κ_a·ε`` with ``ε ~ N(μ_a, σ_a²)`` from the recorder's activation-error statistics, with
    probability ``p`` per layer and step (QDrop-style random dropping). Layers without statistics yet are
    left alone. The choice of layers and the noise are seeded from ``(seed, step, batch_idx)``. ``noise_scale``
    (κ_a) is a float or a picklable callable of the step; a :class:`~.schedules.Warmup` around it keeps the first
    steps, or the first fraction of the fit, noise-free (a fraction is resolved at fit start). ``noise_source``:
    exact generator noise or windows into a pool of ``pool_numel`` pre-drawn values (``auto``: the pool on the
    CPU). ``warmup_steps`` and ``warmup_fraction`` are deprecated (a ``FutureWarning``): they wrap
    ``noise_scale`` in a ``Warmup``.

    Example:
        >>> rec = QuantErrorRecorder("w4a4")
        >>> act = ActivationNoiseInjection(rec, p=0.5)
        >>> # Trainer(callbacks=[rec, act]).fit(model)
    """

    def __init__(
        self,
        recorder: QuantErrorRecorder,
        p: float = 0.5,
        noise_scale: float | Callable[[int], float] = 1.0,
        seed: int = 0,
        warmup_steps: int | None = None,
        noise_source: str = "auto",
        pool_numel: int = 1 << 22,
        warmup_fraction: float | None = None,
    ) -> None:
        if not isinstance(recorder, QuantErrorRecorder):
            raise ValueError(f"recorder must be a QuantErrorRecorder, got {type(recorder).__name__}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        check_scale_value("noise_scale", noise_scale)
        check_int("seed", seed)
        if noise_source not in NOISE_SOURCES:
            raise ValueError(f"noise_source must be one of {NOISE_SOURCES}, got {noise_source!r}")
        if isinstance(pool_numel, bool) or not isinstance(pool_numel, int) or pool_numel < 2:
            raise ValueError(f"pool_numel must be an int >= 2 (the noise pool's size in elements), got {pool_numel!r}")
        noise_scale = with_deprecated_warmup(type(self).__name__, noise_scale, warmup_steps, warmup_fraction)
        if not recorder.record_activations:
            raise ValueError("the recorder was built with record_activations=False: activation noise needs its statistics")
        self.recorder = recorder
        self.p = float(p)
        self.noise_scale = noise_scale
        self.seed = int(seed)
        self.noise_source = noise_source
        self.pool_numel = int(pool_numel)
        self._handles: list[RemovableHandle] = []
        self._active: set[str] = set()
        self._key: tuple[int, int] = (0, 0)
        self._kappa = 0.0
        self._source: NoiseSource | None = None
        self._coef: dict[str, tuple[int, float, Tensor, Tensor]] = {}

    def noise_memory_bytes(self) -> int:
        """Bytes of pre-drawn noise this callback holds (its pool; 0 before fit or with the exact generator)."""
        return self._source.memory_bytes() if self._source is not None else 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(recorder=self.recorder.name, p=self.p)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit: no cached coefficients of a previous fit's statistics
            self._coef.clear()
            self._active = set()

    def settings(self) -> dict[str, Any]:
        """The activation noise's settings as ``dnq/act_noise/...`` hyperparameters (with the recorder's)."""
        return {
            **recorder_settings(self.recorder),
            "dnq/act_noise/p": self.p,
            **schedule_settings("dnq/act_noise", self),
        }

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resolve_schedule(trainer)
        log_settings(trainer, self.settings())  # with the module's hyperparameters, in one set

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resolve_schedule(trainer)
        kind = self.noise_source
        if kind == "auto":
            kind = "pool" if pl_module.device.type == "cpu" else "generator"
        self._source = NoiseSource(kind, "normal", splitmix64(self.seed, 0xAC7), self.pool_numel)
        if not self._handles:
            for n in self.recorder.layers:
                self._handles.append(self.recorder.modules[n].register_forward_pre_hook(self._make_hook(n)))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._kappa = self.kappa(step)
        if log_every_n_steps(trainer, step):
            pl_module.log("dnq/act_kappa", self._kappa, on_step=True, on_epoch=False)
            pl_module.log("dnq/act_warmup", float(step < self.warmup_steps), on_step=True, on_epoch=False)
        self._key = (step, batch_idx)
        if self._kappa == 0.0 or self.p == 0.0:
            self._active = set()
            return
        rng = random.Random(splitmix64(self.seed, step, batch_idx))
        self._active = {n for n in self.recorder.layers if self.should_perturb(n, rng)}

    def should_perturb(self, layer: str, rng: random.Random) -> bool:
        """Whether ``layer``'s input gets noise in this training step: with probability ``p``. Called for each
        recorded layer in order with one generator seeded from ``(seed, step, batch_idx)``; override to choose
        layers differently (e.g. by name)."""
        return rng.random() < self.p

    def _coefficients(self, name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        rec = self.recorder
        cached = self._coef.get(name)
        if cached is not None and cached[0] == rec.act_refreshed_at and cached[1] == self._kappa:
            mu, sd = cached[2], cached[3]
        else:
            mu = self._kappa * rec.act_mean[name]
            sd = self._kappa * rec.act_var[name].clamp_min(0).sqrt()
            self._coef[name] = (rec.act_refreshed_at, self._kappa, mu, sd)
        return mu.to(dtype), sd.to(dtype)

    def _make_hook(self, name: str):
        layer_index = self.recorder.layers.index(name)

        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if name not in self._active or not module.training or hooks_are_suspended():
                return None
            if name not in self.recorder.act_mean or not args or not isinstance(args[0], Tensor):
                return None
            x = args[0]
            mu, sd = self._coefficients(name, x.dtype)
            assert self._source is not None
            eps = self._source.full((*self._key, layer_index), x.shape, x.device, x.dtype)
            return (torch.addcmul(x, sd, eps).add_(mu), *args[1:])

        return hook

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = set()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_hooks()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
