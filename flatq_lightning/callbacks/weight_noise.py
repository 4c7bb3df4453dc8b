"""Differential weight noise with the recorded weight-error statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
    check_warmup,
    kappa_value,
    resolve_warmup,
    schedule_settings,
)
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



@dataclass
class _Snapshot:
    """The noise currently inside the parameters: δ_i = a_i + b_i ⊙ ε(step, i)."""

    step: int
    kappa: float
    a: list[Tensor | None]
    b: list[Tensor]

    def to(self, device: torch.device) -> _Snapshot:
        return _Snapshot(self.step, self.kappa, [None if t is None else t.to(device) for t in self.a], [t.to(device) for t in self.b])


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


class DifferentialNoiseInjection(Callback):
    """Zero-mean differential Gaussian weight noise with the recorded weight-error statistics.

    At optimizer step ``t`` the forward and backward passes see ``W + δ_t`` with ``δ_t = κ·ε_t``,
    ``ε_t ~ N(μ_c, σ_c²)`` per output channel from the recorder. In ``differential`` mode the parameters hold
    ``W + δ_t`` and, after each optimizer step, receive ``δ_{t+1} − δ_t`` in place; ``δ`` is regenerated from
    ``(seed, step)``, so no copy of the weights is kept. Validation, test, checkpoints and the end of fit see the
    clean ``W``. Modes: ``differential`` (default), ``add_remove`` (noise added before the forward and removed
    before the optimizer step), ``uniform`` (DiffQ-style ``U(−s/2, s/2)`` with the quantizer's channel step ``s``,
    applied differentially), ``off``. ``noise_scale`` is a float or a picklable callable of the step
    (e.g. :class:`Ramp`). ``noise_source`` picks exact generator noise or a fast pool of noise
    (``auto``: the pool for large models on the CPU, the generator elsewhere). Only the recorder's layers with
    a weight (``recorder.weight_layers``) are perturbed; weightless points (attention operands) get activation
    noise only. Noise is keyed by the layer's index among those weighted layers. No noise for the first
    ``warmup_steps`` optimizer steps, or the first ``warmup_fraction`` of the fit's steps (clean training first;
    the fraction is resolved at train start, and ``warmup_steps`` then holds the step count).

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
        >>> noise = DifferentialNoiseInjection(rec, noise_scale=1.0)
        >>> # Trainer(callbacks=[rec, noise]).fit(model)
    """

    def __init__(
        self,
        recorder: QuantErrorRecorder,
        noise_scale: float | Callable[[int], float] = 1.0,
        mode: str | NoiseMode = "differential",
        warmup_steps: int = 0,
        seed: int = 0,
        warmup_fraction: float = 0.0,
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
        check_warmup(warmup_steps, warmup_fraction)
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
        self.warmup_steps = warmup_steps
        self.warmup_fraction = float(warmup_fraction)
        self.seed = int(seed)
        self.noise_source = noise_source
        self.pool_fraction = float(pool_fraction)
        self._params: list[Tensor] = []
        self._names: list[str] = []  # the first weighted layer of each unique parameter, in the order of self._params
        self._layer_index: dict[str, int] = {}  # every weighted layer → its index in self._params
        self._source: NoiseSource | None = None
        self._applied: _Snapshot | None = None
        self._resume: _Snapshot | None = None
        self._resume_residual: list[tuple[Tensor, Tensor]] | None = None
        self._coef_cache: tuple[tuple[int, float], _Snapshot] | None = None
        self._before_eval: _Snapshot | None = None
        self.clean_bn_batches = clean_bn_batches
        #: the BatchNorm statistics gathered under noise, kept when the end of fit re-estimated clean ones
        self.noisy_bn_state: dict[str, dict[str, Tensor]] | None = None
        self._noised = False  # some noise was applied in this fit (BN statistics saw it)
        self._resume_bn: dict[str, dict[str, Tensor]] | None = None

    def noise_memory_bytes(self) -> int:
        """Bytes of pre-drawn noise this callback holds (its pool; 0 before fit or with the exact generator)."""
        return self._source.memory_bytes() if self._source is not None else 0

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
        self._names, self._params, self._layer_index = [], [], {}
        first: dict[int, int] = {}
        for n in rec.weight_layers:
            p = rec.modules[n].weight
            i = first.setdefault(id(p), len(self._params))
            if i == len(self._params):
                self._names.append(n)
                self._params.append(p)
            self._layer_index[n] = i
        total = sum(p.numel() for p in self._params)
        kind = self.noise_source
        if kind == "auto":
            kind = "pool" if (pl_module.device.type == "cpu" and total >= POOL_MIN_NUMEL) else "generator"
        pool = max(1 << 15, int(total * self.pool_fraction)) if kind == "pool" else 0
        self._source = NoiseSource(kind, self.noise_mode.distribution, self.seed, pool)

    def kappa(self, step: int) -> float:
        return kappa_value(self.noise_scale, self.warmup_steps, step)

    def _coefficients(self, step: int, device: torch.device) -> _Snapshot:
        rec = self.recorder
        kappa = self.kappa(step)
        key = (rec.weight_refreshed_at, kappa)
        if self._coef_cache is not None and self._coef_cache[0] == key:
            c = self._coef_cache[1]
            return _Snapshot(step, kappa, c.a, c.b)
        a: list[Tensor | None] = []
        b: list[Tensor] = []
        for n, p in zip(self._names, self._params):
            shape = (-1,) + (1,) * (p.dim() - 1) if not p.is_contiguous() else (-1, 1)
            a_n, b_n = self.noise_mode.coefficients(rec, n, kappa)
            a.append(None if a_n is None else a_n.to(device, p.dtype).reshape(shape))
            b.append(b_n.to(device, p.dtype).reshape(shape))
        snap = _Snapshot(step, kappa, a, b)
        self._coef_cache = (key, snap)
        return snap

    # the in-place updates ------------------------------------------------------------------------------------
    def _target(self, p: Tensor) -> Tensor:
        return p.data.view(p.shape[0], -1) if p.is_contiguous() else p.data

    @torch.no_grad()
    def _add(self, snap: _Snapshot, sign: float, into: dict[int, Tensor] | None = None) -> None:
        """``tensor += sign · δ(snap)`` for every layer's weight, or only for the tensors in ``into``
        (layer index → a tensor shaped like that weight)."""
        if snap.kappa == 0.0:
            return
        if into is None and sign > 0:
            self._noised = True
        src = self._source
        assert src is not None
        items = into.items() if into is not None else enumerate(self._params)
        for i, p in items:
            t = self._target(p)
            if t.dim() == 2:
                for r0, r1, eps in src.chunks((snap.step, i), t.shape[0], t.shape[1], p.device, p.dtype):
                    t[r0:r1].addcmul_(snap.b[i][r0:r1], eps, value=sign)
            else:
                t.addcmul_(snap.b[i], src.full((snap.step, i), t.shape, p.device, p.dtype), value=sign)
            if snap.a[i] is not None:
                t.add_(snap.a[i], alpha=sign)

    @torch.no_grad()
    def _swap(self, new: _Snapshot, old: _Snapshot) -> None:
        """params += δ(new) − δ(old) in one pass per layer (the differential increment P_t)."""
        if old.kappa == 0.0:
            return self._add(new, 1.0)
        if new.kappa == 0.0:
            return self._add(old, -1.0)
        self._noised = True
        src = self._source
        assert src is not None
        for i, p in enumerate(self._params):
            t = self._target(p)
            if t.dim() == 2:
                rows, cols = t.shape
                for (r0, r1, e_new), (s0, s1, e_old) in zip(
                    src.chunks((new.step, i), rows, cols, p.device, p.dtype),
                    src.chunks((old.step, i), rows, cols, p.device, p.dtype),
                ):
                    t[r0:r1].addcmul_(new.b[i][r0:r1], e_new).addcmul_(old.b[i][s0:s1], e_old, value=-1.0)
            else:
                t.addcmul_(new.b[i], src.full((new.step, i), t.shape, p.device, p.dtype))
                t.addcmul_(old.b[i], src.full((old.step, i), t.shape, p.device, p.dtype), value=-1.0)
            if new.a[i] is not None and not (new.a[i] is old.a[i] and new.kappa == old.kappa):
                t.add_(new.a[i]).sub_(old.a[i])

    def _apply_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Move the parameters from W + δ_old to W + δ_step (refreshing weight statistics on clean W if due)."""
        rec = self.recorder
        old = self._applied
        refresh = rec.is_refresh_step(step) and step != rec.weight_refreshed_at
        if refresh:
            if old is not None:
                self._add(old, -1.0)
                self._applied = None
            rec.refresh_weight_stats(step)
            rec.log_stats(trainer)
            old = None
        new = self._coefficients(step, pl_module.device)
        if old is None:
            self._add(new, 1.0)
        else:
            self._swap(new, old)
        self._applied = new

    def _remove(self) -> None:
        if self._applied is not None:
            self._add(self._applied, -1.0)
            self._applied = None

    # public helpers ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def clean_weights(self) -> Iterator[None]:
        """Inside the block the parameters hold the clean weights; the noise is restored afterwards."""
        snap = self._applied
        self._remove()
        try:
            yield
        finally:
            if snap is not None:
                self._add(snap, 1.0)
                self._applied = snap

    def current_noise(self, name: str) -> Tensor | None:
        """δ currently inside the named layer's weight (regenerated; None when no noise is applied or the layer
        is a weightless point)."""
        if self._applied is None or self._applied.kappa == 0.0:
            return None
        if name not in self._layer_index:
            if name in self.recorder.layers:
                return None  # a weightless point: nothing in its weight
            raise ValueError(f"{name!r} is not one of the recorder's layers")
        i = self._layer_index[name]
        delta = torch.zeros_like(self._params[i])
        self._add(self._applied, 1.0, into={i: delta})
        return delta

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
        self.warmup_steps = resolve_warmup(self.warmup_steps, self.warmup_fraction, trainer)
        log_settings(trainer, self.settings())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.warmup_steps = resolve_warmup(self.warmup_steps, self.warmup_fraction, trainer)
        self._prepare(pl_module)
        self.noisy_bn_state = None
        resume_bn, self._resume_bn = self._resume_bn, None
        self._noised = resume_bn is not None
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
            self._add(snap, 1.0)
            self._applied = snap
            # the live run reuses these very coefficient tensors until the next refresh (and skips a's add/sub
            # when they are the same objects): so must the resumed one, or it rounds differently
            if snap.kappa == self.kappa(trainer.global_step):
                self._coef_cache = ((rec.weight_refreshed_at, snap.kappa), snap)
            residual, self._resume_residual = self._resume_residual, None
            if residual is not None and len(residual) == len(self._params):
                for (idx, vals), p in zip(residual, self._params):
                    if idx.numel() and vals.numel() == idx.numel() and int(idx.max()) < p.numel():
                        flat = p.data.reshape(-1).clone()
                        flat[idx.to(p.device)] = vals.to(p.device, p.dtype)
                        p.data.copy_(flat.view(p.shape))
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
            snap = self._coefficients(step, pl_module.device)
            self._add(snap, 1.0)
            self._applied = snap

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
            self._add(snap, 1.0)
            self._applied = snap

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
        # exact copies put back afterwards: removing and re-adding the noise would leave float rounding behind
        # and make a run with checkpoints differ from one without
        saved = [p.detach().clone() for p in self._params]
        snap = self._applied
        try:
            self._remove()
            n = reestimate_bn_on_training_data(trainer, pl_module, self.clean_bn_batches)
        finally:
            for p, v in zip(self._params, saved):
                p.data.copy_(v)
            self._applied = snap
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
    @torch.no_grad()
    def _rounding_residual(self, snap: _Snapshot) -> list[tuple[Tensor, Tensor]]:
        """Per parameter, the elements where re-applying δ to the checkpoint's clean weight (``W + δ − δ``, float
        rounded) would not give back the current ``W + δ`` bit for bit: their flat indices and exact values. A
        resume writes them back, so it continues exactly (usually a small fraction of the elements)."""
        out = []
        for i, p in enumerate(self._params):
            delta = torch.zeros_like(p)
            self._add(snap, 1.0, into={i: delta})
            sim = p.detach().clone().sub_(delta)  # the clean weight on_save_checkpoint writes
            self._add(snap, 1.0, into={i: sim})  # what the resume re-applies
            idx = (sim != p.detach()).reshape(-1).nonzero().squeeze(1)
            out.append((idx.cpu(), p.detach().reshape(-1)[idx].cpu()))
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        snap = self._applied
        return {
            "seed": self.seed,
            "residual": None if snap is None or snap.kappa == 0.0 else self._rounding_residual(snap),
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
        self._resume = None if a is None else _Snapshot(a["step"], a["kappa"], list(a["a"]), list(a["b"]))
        self._resume_residual = state_dict.get("residual") if a is not None else None
