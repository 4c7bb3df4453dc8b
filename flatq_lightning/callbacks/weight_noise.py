"""Differential weight noise with the recorded weight-error statistics: the Lightning callback (its hooks, the
guards against strategies and callbacks it cannot work with, BatchNorm statistics in checkpoints and at the end of
fit). The in-place noise itself is :class:`~flatq_lightning.callbacks.param_noise.ParamNoise`; the strategies are
in :mod:`.noise_modes`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from ..quant.bn import bn_state, load_bn_state
from ..utils.checks import check_int, check_scale_value
from ..utils.logging import log_every_n_steps, log_settings
from ._common import (
    recorder_settings,
    reestimate_bn_on_training_data,
)
from .group import flatten_callbacks
from .noise_modes import NOISE_MODES, AddRemoveNoise, DifferentialNoise, NoiseMode, NoNoise, UniformNoise
from .noise_source import (
    NOISE_SOURCES,
    POOL_MIN_NUMEL,
    NoiseSource,
    ScheduledNoise,
    schedule_settings,
    with_deprecated_warmup,
)
from .param_noise import NoiseSnapshot, ParamNoise
from .recorder import QuantErrorRecorder

__all__ = [
    "NOISE_MODES",
    "NOISY_BN_KEY",
    "AddRemoveNoise",
    "DifferentialNoise",
    "DifferentialNoiseInjection",
    "NoNoise",
    "NoiseMode",
    "UniformNoise",
]

#: checkpoint key holding the BatchNorm statistics gathered under noise (the state_dict holds clean ones)
NOISY_BN_KEY = "flatq_noisy_bn"


def _refuse_sharded_strategy(trainer: pl.Trainer, cb: Callback) -> None:
    """In-place weight noise needs whole parameters on every rank: refuse FSDP, DeepSpeed and model parallelism
    (as Lightning's StochasticWeightAveraging does)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise ValueError(
            f"{type(cb).__name__} does not support the {type(trainer.strategy).__name__}: it adds noise in place to "
            "whole weight tensors, which that strategy shards across ranks. Use strategy='ddp' (or a single device), "
            "or train with mode='off'"
        )


def _refuse_other_weight_noise(trainer: pl.Trainer, cb: DifferentialNoiseInjection) -> None:
    others = [
        c for c in flatten_callbacks(trainer.callbacks)
        if isinstance(c, DifferentialNoiseInjection) and c is not cb and c.active
    ]
    if others:
        raise ValueError(
            f"two weight-noise callbacks in one Trainer ({cb.state_key} and {others[0].state_key}): each would "
            "measure the other's noise as part of the clean weights. Give the Trainer one DNQ(...); "
            "to monitor other bit-widths add QuantErrorRecorder(preset, name=...) instances alone"
        )


def _refuse_weight_averaging(trainer: pl.Trainer, cb: DifferentialNoiseInjection) -> None:
    """SWA/EMA would average W + δ: the parameters hold the noise between steps in this mode."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging
    from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

    avg = [c for c in flatten_callbacks(trainer.callbacks) if isinstance(c, (StochasticWeightAveraging, WeightAveraging))]
    if avg:
        raise ValueError(
            f"{type(avg[0]).__name__} next to {type(cb).__name__}(mode={cb.mode!r}) would average the noisy weights "
            "W + δ (in this mode the parameters hold the noise between optimizer steps), and its checkpoints and "
            "final weights would be noisy. Use mode='add_remove' (the noise is removed before every optimizer "
            "step, so the averaging sees the clean weights), or drop the weight-averaging callback"
        )


class DifferentialNoiseInjection(ScheduledNoise, Callback):
    """Zero-mean differential Gaussian weight noise with the recorded weight-error statistics.

    At optimizer step ``t`` the forward and backward passes see ``W + δ_t`` with ``δ_t = κ·ε_t``,
    ``ε_t ~ N(μ_c, σ_c²)`` per output channel from the recorder. In ``differential`` mode the parameters hold
    ``W + δ_t`` and, after each optimizer step, receive ``δ_{t+1} − δ_t`` in place; ``δ`` is regenerated from
    ``(seed, step)``, so no copy of the weights is kept. Validation, test, checkpoints and the end of fit see the
    clean ``W``. Modes: ``differential`` (default), ``add_remove`` (noise added before the forward and removed
    before the optimizer step), ``uniform`` (DiffQ-style ``U(−s/2, s/2)`` with the quantizer's channel step ``s``,
    applied differentially), ``off``. ``noise_scale`` is a float or a picklable callable of the step
    (e.g. :class:`Ramp`); a :class:`~.schedules.Warmup` around it keeps the first steps, or the first fraction of
    the fit, noise-free (clean training first; a fraction is resolved at fit start, and :attr:`warmup_steps`
    then holds the step count). ``noise_source`` picks exact generator noise or a fast pool of noise
    (``auto``: the pool for large models on the CPU, the generator elsewhere; ``pool_fraction``: the pool's
    size as a fraction of the noisy elements). Only the recorder's layers with
    a weight (``recorder.weight_layers``) are perturbed; weightless points (attention operands) get activation
    noise only. Noise is keyed by the layer's index among those weighted layers. ``warmup_steps`` and
    ``warmup_fraction`` are deprecated (a ``FutureWarning``): they wrap ``noise_scale`` in a ``Warmup``.

    BatchNorm: while the noise trains, BN running statistics describe the noisy network. When noise was
    applied, the end of fit re-estimates them on the clean weights (noise off, cumulative average over
    ``clean_bn_batches`` training batches through the training augmentation, weights untouched, like
    ``torch.optim.swa_utils.update_bn``), so the returned model and the PTQ callback's FP row carry clean
    statistics; the set gathered under noise is kept in :attr:`noisy_bn_state`. Every checkpoint likewise holds
    clean statistics in its ``state_dict`` and the noisy set under ``checkpoint["flatq_noisy_bn"]``, which a
    resume puts back so training continues with them. ``clean_bn_batches=0`` keeps the noisy statistics
    everywhere.

    Example:
        >>> rec = QuantErrorRecorder("w4a4", refresh_weights=False)  # this callback refreshes it on clean weights
        >>> from flatq_lightning.callbacks.schedules import Warmup
        >>> noise = DifferentialNoiseInjection(rec, noise_scale=Warmup(1.0, steps=100))  # clean for 100 steps
        >>> # Trainer(callbacks=[rec, noise]).fit(model)
    """

    def __init__(
        self,
        recorder: QuantErrorRecorder,
        noise_scale: float | Callable[[int], float] = 1.0,
        mode: str | NoiseMode = "differential",
        warmup_steps: int | None = None,
        seed: int = 0,
        warmup_fraction: float | None = None,
        noise_source: str = "auto",
        pool_fraction: float = 1 / 32,
        clean_bn_batches: int = 32,
    ) -> None:
        if isinstance(clean_bn_batches, bool) or not isinstance(clean_bn_batches, int) or clean_bn_batches < 0:
            raise ValueError(f"clean_bn_batches must be an int >= 0 (0: keep the noisy statistics), got {clean_bn_batches!r}")
        if not isinstance(recorder, QuantErrorRecorder):
            raise ValueError(f"recorder must be a QuantErrorRecorder, got {type(recorder).__name__}")
        noise_mode = NoiseMode.from_name(mode)
        check_scale_value("noise_scale", noise_scale)
        check_int("seed", seed)
        noise_scale = with_deprecated_warmup(type(self).__name__, noise_scale, warmup_steps, warmup_fraction)
        if noise_source not in NOISE_SOURCES:
            raise ValueError(f"noise_source must be one of {NOISE_SOURCES}, got {noise_source!r}")
        if not 0.0 < pool_fraction <= 1.0:
            raise ValueError(f"pool_fraction must be in (0, 1], got {pool_fraction}")
        if recorder.refresh_weights:
            raise ValueError(
                "the recorder measures the weight error on its own schedule, which would read the noisy weights: "
                "build it with QuantErrorRecorder(..., refresh_weights=False) (this callback then refreshes it on the "
                "clean weights), or use the one-callback DNQ(...)"
            )
        self.recorder = recorder
        self.noise_scale = noise_scale
        #: the strategy that draws δ and says when it sits in the parameters
        self.noise_mode = noise_mode
        self.seed = int(seed)
        self.noise_source = noise_source
        self.pool_fraction = float(pool_fraction)
        #: the in-place noise on the weighted layers' parameters, built at train start (``None`` before)
        self.engine: ParamNoise | None = None
        self._names: list[str] = []  # the first weighted layer of each unique parameter, in the engine's order
        self._layer_index: dict[str, int] = {}  # every weighted layer → its parameter's index in the engine
        self._resume: NoiseSnapshot | None = None
        self._resume_residual: list[tuple[Tensor, Tensor]] | None = None
        self._coef_cache: tuple[tuple[int, float], NoiseSnapshot] | None = None
        self._before_eval: NoiseSnapshot | None = None
        self.clean_bn_batches = clean_bn_batches
        #: the BatchNorm statistics gathered under noise, kept when the end of fit re-estimated clean ones
        self.noisy_bn_state: dict[str, dict[str, Tensor]] | None = None
        self._resume_bn: dict[str, dict[str, Tensor]] | None = None

    def noise_memory_bytes(self) -> int:
        """Bytes of pre-drawn noise this callback holds (its pool; 0 before fit or with the exact generator)."""
        return self._source.memory_bytes() if self._source is not None else 0

    # the engine's state, as this callback reads it -----------------------------------------------------------
    @property
    def _applied(self) -> NoiseSnapshot | None:
        """The noise the parameters hold now (``None``: clean, or before train start)."""
        return self.engine.applied if self.engine is not None else None

    @_applied.setter
    def _applied(self, snap: NoiseSnapshot | None) -> None:
        if self.engine is not None:
            self.engine.applied = snap
        elif snap is not None:
            raise RuntimeError("no noise engine yet: it is built at train start")

    @property
    def _params(self) -> list[Tensor]:
        return self.engine.params if self.engine is not None else []

    @property
    def _source(self) -> NoiseSource | None:
        return self.engine.source if self.engine is not None else None

    @property
    def _noised(self) -> bool:
        """Some noise was applied in this fit (the BN statistics saw it)."""
        return self.engine is not None and self.engine.noised

    @property
    def state_key(self) -> str:
        return self._generate_state_key(recorder=self.recorder.name)

    @property
    def mode(self) -> str:
        """The noise mode's name (``"differential"``, ``"add_remove"``, ``"uniform"``, ``"off"`` or a subclass's)."""
        return self.noise_mode.name

    @property
    def active(self) -> bool:
        return self.noise_mode.active

    # setup --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _refuse_sharded_strategy(trainer, self)
        if self.active:
            _refuse_other_weight_noise(trainer, self)
            if self.noise_mode.persistent:
                _refuse_weight_averaging(trainer, self)
        # a new fit starts clean: nothing of a previous fit (another model, another width) carries over; a resume
        # restores the checkpoint's state (load_state_dict) right after this hook
        self._applied = self._resume = self._coef_cache = self._before_eval = self._resume_residual = None

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        rec = self.recorder
        if not rec.layers:
            raise RuntimeError("the recorder has no layers: add the QuantErrorRecorder to the Trainer's callbacks")
        # one entry per unique Parameter: a weight shared by several layers (tied weights) is noised once,
        # with the statistics of its first layer; self._layer_index maps every layer to its entry
        self._names, self._layer_index = [], {}
        params: list[Tensor] = []
        first: dict[int, int] = {}
        for n in rec.weight_layers:
            p = rec.modules[n].weight
            i = first.setdefault(id(p), len(params))
            if i == len(params):
                self._names.append(n)
                params.append(p)
            self._layer_index[n] = i
        total = sum(p.numel() for p in params)
        kind = self.noise_source
        if kind == "auto":
            kind = "pool" if (pl_module.device.type == "cpu" and total >= POOL_MIN_NUMEL) else "generator"
        pool = max(1 << 15, int(total * self.pool_fraction)) if kind == "pool" else 0
        self.engine = ParamNoise(params, NoiseSource(kind, self.noise_mode.distribution, self.seed, pool))

    def _coefficients(self, step: int, device: torch.device) -> NoiseSnapshot:
        """The noise of ``step`` from the recorder's statistics (the coefficients are reused until the next
        refresh or change of κ)."""
        rec = self.recorder
        kappa = self.kappa(step)
        key = (rec.weight_refreshed_at, kappa)
        if self._coef_cache is not None and self._coef_cache[0] == key:
            c = self._coef_cache[1]
            return NoiseSnapshot(step, kappa, c.a, c.b)
        assert self.engine is not None
        coefficients = [self.noise_mode.coefficients(rec, n, kappa) for n in self._names]
        snap = self.engine.snapshot(step, kappa, coefficients, device)
        self._coef_cache = (key, snap)
        return snap

    # moving the noise ----------------------------------------------------------------------------------------
    def _apply_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Move the parameters from W + δ_old to W + δ_step (refreshing weight statistics on clean W if due)."""
        rec = self.recorder
        engine = self.engine
        assert engine is not None
        if rec.is_refresh_step(step) and step != rec.weight_refreshed_at:
            engine.remove()
            rec.refresh_weight_stats(step)
            rec.log_stats(trainer)
        engine.move_to(self._coefficients(step, pl_module.device))

    def _remove(self) -> None:
        if self.engine is not None:
            self.engine.remove()

    # public helpers ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def clean_weights(self) -> Iterator[None]:
        """Inside the block the parameters hold the clean weights; the noise is restored afterwards."""
        with self.engine.clean() if self.engine is not None else contextlib.nullcontext():
            yield

    def current_noise(self, name: str) -> Tensor | None:
        """δ currently inside the named layer's weight (regenerated; None when no noise is applied or the layer
        is a weightless point)."""
        if self._applied is None or self._applied.kappa == 0.0:
            return None
        if name not in self._layer_index:
            if name in self.recorder.layers:
                return None  # a weightless point: nothing in its weight
            raise ValueError(f"{name!r} is not one of the recorder's layers")
        assert self.engine is not None
        return self.engine.noise(self._layer_index[name])

    def clean_weight(self, name: str) -> Tensor:
        """``param − δ``: the clean weight of a layer, differentiable w.r.t. the parameter."""
        w = self.recorder.modules[name].weight
        delta = self.current_noise(name)
        return w if delta is None else w - delta

    # Lightning hooks ----------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The weight noise's settings as ``dnq/weight_noise/...`` hyperparameters (with the recorder's)."""
        return {
            **recorder_settings(self.recorder),
            "dnq/weight_noise/mode": self.mode,
            **schedule_settings("dnq/weight_noise", self),
            "dnq/weight_noise/noise_source": self.noise_source,
            "dnq/weight_noise/clean_bn_batches": self.clean_bn_batches,
        }

    def _log_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if log_every_n_steps(trainer, step):
            pl_module.log("dnq/kappa", self.kappa(step), on_step=True, on_epoch=False)
            pl_module.log("dnq/warmup", float(step < self.warmup_steps), on_step=True, on_epoch=False)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before Lightning logs the module's hyperparameters: the settings go out with them, in one set
        self.resolve_schedule(trainer)
        log_settings(trainer, self.settings())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resolve_schedule(trainer)
        self._prepare(pl_module)
        engine = self.engine
        assert engine is not None
        self.noisy_bn_state = None
        resume_bn, self._resume_bn = self._resume_bn, None
        engine.noised = resume_bn is not None
        if resume_bn is not None:  # the checkpoint's state_dict held clean statistics: train on with the noisy
            load_bn_state(pl_module, resume_bn)
        rec = self.recorder
        if not rec.weight_mean:
            rec.refresh_weight_stats(trainer.global_step)
            rec.log_stats(trainer)
        if not self.active or not self.noise_mode.persistent:
            return
        resume, self._resume = self._resume, None
        if resume is not None and resume.step == trainer.global_step:
            snap = resume.to(pl_module.device)
            engine.put(snap)
            # the live run reuses these very coefficient tensors until the next refresh (and skips a's add/sub
            # when they are the same objects): so must the resumed one, or it rounds differently
            if snap.kappa == self.kappa(trainer.global_step):
                self._coef_cache = ((rec.weight_refreshed_at, snap.kappa), snap)
            residual, self._resume_residual = self._resume_residual, None
            if residual is not None:
                engine.restore_residual(residual)
        else:
            self._apply_step(trainer, pl_module, trainer.global_step)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._log_state(trainer, pl_module)
        if self.active and not self.noise_mode.persistent and self._applied is None:
            step = trainer.global_step
            rec = self.recorder
            if rec.is_refresh_step(step) and step != rec.weight_refreshed_at:
                rec.refresh_weight_stats(step)
                rec.log_stats(trainer)
            assert self.engine is not None
            self.engine.put(self._coefficients(step, pl_module.device))

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.noise_mode.persistent:
            self._remove()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.active or not self.noise_mode.persistent or self._applied is None:
            return
        step = trainer.global_step
        if step != self._applied.step:  # the optimizer stepped (not on accumulation-only batches)
            self._apply_step(trainer, pl_module, step)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before_eval = self._applied
        self._remove()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snap, self._before_eval = self._before_eval, None
        if snap is not None and trainer.state.fn == TrainerFn.FITTING and self._applied is None:
            assert self.engine is not None
            self.engine.put(snap)

    def _clean_bn_due(self) -> bool:
        return self.clean_bn_batches > 0 and self._noised

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict")
        if sd is None:
            return
        if self._clean_bn_due() and trainer.state.fn == TrainerFn.FITTING:
            self._checkpoint_clean_bn(trainer, pl_module, sd, checkpoint)
        keys: dict[int, list[str]] = {}  # every state_dict key of a parameter, aliases (tied weights) included
        for n, p in pl_module.named_parameters(remove_duplicate=False):
            keys.setdefault(id(p), []).append(n)
        for layer, p in zip(self._names, self._params):
            clean = None
            for key in keys.get(id(p), []):
                if key in sd:
                    clean = self.clean_weight(layer).detach().clone() if clean is None else clean
                    sd[key] = clean

    @torch.no_grad()
    def _checkpoint_clean_bn(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, sd: dict[str, Any], checkpoint: dict[str, Any]
    ) -> None:
        """Clean BN statistics into the checkpoint's state_dict, the noisy set beside it; the live model keeps
        training with the noisy set."""
        noisy = bn_state(pl_module)
        assert self.engine is not None
        # exact copies put back afterwards: removing and re-adding the noise would leave float rounding behind
        # and make a run with checkpoints differ from one without
        with self.engine.clean_exact():
            n = reestimate_bn_on_training_data(trainer, pl_module, self.clean_bn_batches)
        if n == 0:
            return
        clean = bn_state(pl_module)
        load_bn_state(pl_module, noisy)
        for name, buffers in clean.items():
            for k, v in buffers.items():
                key = f"{name}.{k}" if name else k
                if key in sd:
                    sd[key] = v.detach().cpu()
        checkpoint[NOISY_BN_KEY] = {n_: {k: v.detach().cpu() for k, v in b.items()} for n_, b in noisy.items()}

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # a resume: train on with the statistics gathered under noise
            self._resume_bn = checkpoint.get(NOISY_BN_KEY)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()
        if self._clean_bn_due():
            noisy = bn_state(pl_module)
            if reestimate_bn_on_training_data(trainer, pl_module, self.clean_bn_batches):
                self.noisy_bn_state = noisy

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove()

    # state --------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        snap = self._applied
        return {
            "seed": self.seed,
            "residual": None if snap is None or snap.kappa == 0.0 else self.engine.rounding_residual(snap),
            "applied": None
            if snap is None
            else {
                "step": snap.step,
                "kappa": snap.kappa,
                "a": [None if t is None else t.detach().cpu() for t in snap.a],
                "b": [t.detach().cpu() for t in snap.b],
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        a = state_dict.get("applied")
        self._resume = None if a is None else NoiseSnapshot(a["step"], a["kappa"], list(a["a"]), list(a["b"]))
        self._resume_residual = state_dict.get("residual") if a is not None else None
