"""Differential weight noise and stochastic activation noise with the recorded quantization-error statistics."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..quant.bn import bn_state, load_bn_state
from ..quant.hooks import hooks_are_suspended
from ._common import (
    check_int,
    check_scale_value,
    describe,
    log_every_n_steps,
    log_settings,
    recorder_settings,
    reestimate_bn_on_training_data,
    splitmix64,
)
from .recorder import QuantErrorRecorder

__all__ = ["DifferentialNoiseInjection", "ActivationNoiseInjection", "NoiseSource", "Ramp", "NOISY_BN_KEY"]

#: checkpoint key holding the BatchNorm statistics gathered under noise (the state_dict holds clean ones)
NOISY_BN_KEY = "flatq_noisy_bn"

NOISE_MODES = ("differential", "add_remove", "uniform", "off")
NOISE_SOURCES = ("auto", "generator", "pool")
#: below this many noisy elements the exact generator is cheap enough everywhere
POOL_MIN_NUMEL = 1 << 21


class Ramp:
    """A picklable schedule: ``start`` → ``end`` linearly over ``steps`` optimizer steps, then ``end``.

    Example:
        >>> kappa = Ramp(end=1.0, steps=100)
        >>> kappa(0), kappa(50), kappa(500)
        (0.0, 0.5, 1.0)
    """

    def __init__(self, end: float = 1.0, steps: int = 1000, start: float = 0.0) -> None:
        if steps < 1:
            raise ValueError(f"Ramp steps must be >= 1, got {steps}")
        for name, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Ramp {name} must be a finite float >= 0 (a noise scale), got {v!r}")
        self.start, self.end, self.steps = float(start), float(end), int(steps)

    def __call__(self, step: int) -> float:
        f = min(max(step / self.steps, 0.0), 1.0)
        return self.start + (self.end - self.start) * f

    def __repr__(self) -> str:
        return f"Ramp(start={self.start}, end={self.end}, steps={self.steps})"


class NoiseSource:
    """Standard noise ε (N(0, 1) or U(-½, ½)) that can be regenerated exactly from a key.

    ``generator``: fresh values from a torch generator seeded by ``(seed, *key)``: exact i.i.d. noise.
    ``pool``: a random window (offset drawn from the key on the host) into a fixed pool of i.i.d. values,
    so regenerating noise costs no random-number generation at all; the pool is a few percent of the
    noisy tensors' size. Large rows are served in chunks, each with its own offset.
    """

    def __init__(self, kind: str, dist: str, seed: int, pool_numel: int = 0) -> None:
        if kind not in ("generator", "pool"):
            raise ValueError(f"noise source must be 'generator' or 'pool', got {kind!r}")
        if dist not in ("normal", "uniform"):
            raise ValueError(f"noise distribution must be 'normal' or 'uniform', got {dist!r}")
        self.kind, self.dist, self.seed = kind, dist, int(seed)
        self.pool_numel = int(pool_numel)
        self._pools: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def _fill(self, t: Tensor, g: torch.Generator) -> Tensor:
        if self.dist == "normal":
            return t.normal_(generator=g)
        return t.uniform_(-0.5, 0.5, generator=g)

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    def pool(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        if key not in self._pools:
            g = self._generator(device, splitmix64(self.seed, 0x5EED))
            self._pools[key] = self._fill(torch.empty(self.pool_numel, device=device, dtype=dtype), g)
        return self._pools[key]

    def chunks(self, key: tuple[int, ...], rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(r0, r1, eps)`` covering a (rows, cols) tensor with ε of shape (r1 - r0, cols)."""
        if self.kind == "generator":
            g = self._generator(device, splitmix64(self.seed, *key))
            yield 0, rows, self._fill(torch.empty(rows, cols, device=device, dtype=dtype), g)
            return
        pool = self.pool(device, dtype)
        window = self.pool_numel // 2
        rng = random.Random(splitmix64(self.seed, *key))
        if cols > window:  # a single row larger than a window: concatenate windows (rare, transient)
            for r in range(rows):
                parts, left = [], cols
                while left > 0:
                    n = min(left, window)
                    o = rng.randrange(self.pool_numel - n + 1)
                    parts.append(pool[o : o + n])
                    left -= n
                yield r, r + 1, torch.cat(parts).view(1, cols)
            return
        per = max(1, window // cols)
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            n = (r1 - r0) * cols
            o = rng.randrange(self.pool_numel - n + 1)
            yield r0, r1, pool[o : o + n].view(r1 - r0, cols)

    def full(self, key: tuple[int, ...], shape: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
        """ε of any shape: a view into the pool where one window holds it, otherwise a new tensor."""
        n = int(torch.Size(shape).numel())
        if self.kind == "generator":
            g = self._generator(device, splitmix64(self.seed, *key))
            return self._fill(torch.empty(shape, device=device, dtype=dtype), g)
        window = self.pool_numel // 2
        rows = -(-n // window)  # ceil: one window per row of a (rows, window) cover of the flat tensor
        parts = [e.reshape(-1) for _, _, e in self.chunks(key, rows, window, device, dtype)]
        flat = parts[0][:n] if len(parts) == 1 else torch.cat(parts)[:n]
        return flat.view(shape)


@dataclass
class _Snapshot:
    """The noise currently inside the parameters: δ_i = a_i + b_i ⊙ ε(step, i)."""

    step: int
    kappa: float
    a: list[Tensor | None]
    b: list[Tensor]

    def to(self, device: torch.device) -> _Snapshot:
        return _Snapshot(self.step, self.kappa, [None if t is None else t.to(device) for t in self.a], [t.to(device) for t in self.b])


def _check_warmup(warmup_steps: int, warmup_fraction: float) -> None:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if isinstance(warmup_fraction, bool) or not isinstance(warmup_fraction, (int, float)) or not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be a float in [0, 1), got {warmup_fraction!r}")
    if warmup_steps and warmup_fraction:
        raise ValueError(f"give warmup_steps ({warmup_steps}) or warmup_fraction ({warmup_fraction}), not both")


def _resolve_warmup(warmup_steps: int, warmup_fraction: float, trainer: pl.Trainer) -> int:
    """The noise-free steps: ``warmup_steps``, or ``warmup_fraction`` of the fit's optimizer steps."""
    if not warmup_fraction:
        return warmup_steps
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("warmup_fraction needs a finite run (max_epochs or max_steps); give warmup_steps instead")
    return int(warmup_fraction * total)


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
    others = [c for c in trainer.callbacks if isinstance(c, DifferentialNoiseInjection) and c is not cb and c.active]
    if others:
        raise ValueError(
            f"two weight-noise callbacks in one Trainer ({cb.state_key} and {others[0].state_key}): each would "
            "measure the other's noise as part of the clean weights. Give the Trainer one dnq_callbacks(...) set; "
            "to monitor other bit-widths add QuantErrorRecorder(preset, name=...) instances alone"
        )


def _refuse_weight_averaging(trainer: pl.Trainer, cb: DifferentialNoiseInjection) -> None:
    """SWA/EMA would average W + δ: the parameters hold the noise between steps in this mode."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging
    from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

    avg = [c for c in trainer.callbacks if isinstance(c, (StochasticWeightAveraging, WeightAveraging))]
    if avg:
        raise ValueError(
            f"{type(avg[0]).__name__} next to {type(cb).__name__}(mode={cb.mode!r}) would average the noisy weights "
            "W + δ (in this mode the parameters hold the noise between optimizer steps), and its checkpoints and "
            "final weights would be noisy. Use mode='add_remove' (the noise is removed before every optimizer "
            "step, so the averaging sees the clean weights), or drop the weight-averaging callback"
        )


def _kappa_value(noise_scale: float | Callable[[int], float], warmup_steps: int, step: int) -> float:
    if step < warmup_steps:
        return 0.0
    k = noise_scale(step) if callable(noise_scale) else noise_scale
    k = float(k)
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"noise_scale must be finite and >= 0, the schedule {noise_scale!r} returned {k} at step {step}")
    return k


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
        >>> rec = QuantErrorRecorder("w4a4")
        >>> noise = DifferentialNoiseInjection(rec, noise_scale=1.0)
        >>> # Trainer(callbacks=[rec, noise]).fit(model)
    """

    def __init__(
        self,
        recorder: QuantErrorRecorder,
        noise_scale: float | Callable[[int], float] = 1.0,
        mode: str = "differential",
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
        if mode not in NOISE_MODES:
            raise ValueError(f"mode must be one of {NOISE_MODES}, got {mode!r}")
        check_scale_value("noise_scale", noise_scale)
        check_int("seed", seed)
        _check_warmup(warmup_steps, warmup_fraction)
        if noise_source not in NOISE_SOURCES:
            raise ValueError(f"noise_source must be one of {NOISE_SOURCES}, got {noise_source!r}")
        if not 0.0 < pool_fraction <= 1.0:
            raise ValueError(f"pool_fraction must be in (0, 1], got {pool_fraction}")
        if recorder.weight_refresh_owner is not None:
            raise ValueError("this recorder already feeds a weight-noise callback: use one recorder per noise callback")
        recorder.weight_refresh_owner = self
        self.recorder = recorder
        self.noise_scale = noise_scale
        self.mode = mode
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

    @property
    def state_key(self) -> str:
        return self._generate_state_key(recorder=self.recorder.name)

    @property
    def active(self) -> bool:
        return self.mode != "off"

    # setup --------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _refuse_sharded_strategy(trainer, self)
        if self.active:
            _refuse_other_weight_noise(trainer, self)
            if self.mode != "add_remove":
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
        self._source = NoiseSource(kind, "uniform" if self.mode == "uniform" else "normal", self.seed, pool)

    def kappa(self, step: int) -> float:
        return _kappa_value(self.noise_scale, self.warmup_steps, step)

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
            if self.mode == "uniform":
                a.append(None)
                b.append((kappa * rec.weight_scale[n]).to(device, p.dtype).reshape(shape))
            else:
                a.append((kappa * rec.weight_mean[n]).to(device, p.dtype).reshape(shape))
                b.append((kappa * rec.weight_var[n].clamp_min(0).sqrt()).to(device, p.dtype).reshape(shape))
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
            "dnq/weight_noise/noise_scale": describe(self.noise_scale),
            "dnq/weight_noise/warmup_steps": self.warmup_steps,
            "dnq/weight_noise/warmup_fraction": self.warmup_fraction,
            "dnq/weight_noise/seed": self.seed,
            "dnq/weight_noise/noise_source": self.noise_source,
            "dnq/weight_noise/clean_bn_batches": self.clean_bn_batches,
        }

    def _log_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if log_every_n_steps(trainer, step):
            pl_module.log("dnq/kappa", self.kappa(step), on_step=True, on_epoch=False)
            pl_module.log("dnq/warmup", float(step < self.warmup_steps), on_step=True, on_epoch=False)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.warmup_steps = _resolve_warmup(self.warmup_steps, self.warmup_fraction, trainer)
        log_settings(trainer, self.settings())  # warmup_steps resolved from warmup_fraction by now
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
        if not self.active or self.mode == "add_remove":
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

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._log_state(trainer, pl_module)
        if self.mode == "add_remove" and self._applied is None:
            step = trainer.global_step
            rec = self.recorder
            if rec.is_refresh_step(step) and step != rec.weight_refreshed_at:
                rec.refresh_weight_stats(step)
                rec.log_stats(trainer)
            snap = self._coefficients(step, pl_module.device)
            self._add(snap, 1.0)
            self._applied = snap

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.mode == "add_remove":
            self._remove()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.active or self.mode == "add_remove" or self._applied is None:
            return
        step = trainer.global_step
        if step != self._applied.step:  # the optimizer stepped (not on accumulation-only batches)
            self._apply_step(trainer, pl_module, step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before_eval = self._applied
        self._remove()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snap, self._before_eval = self._before_eval, None
        if snap is not None and trainer.state.fn == TrainerFn.FITTING and self._applied is None:
            self._add(snap, 1.0)
            self._applied = snap

    def _clean_bn_due(self) -> bool:
        return self.clean_bn_batches > 0 and self._noised

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

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # a resume: train on with the statistics gathered under noise
            self._resume_bn = checkpoint.get(NOISY_BN_KEY)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()
        if self._clean_bn_due():
            noisy = bn_state(pl_module)
            if reestimate_bn_on_training_data(trainer, pl_module, self.clean_bn_batches):
                self.noisy_bn_state = noisy

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove()

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        a = state_dict.get("applied")
        self._resume = None if a is None else _Snapshot(a["step"], a["kappa"], list(a["a"]), list(a["b"]))
        self._resume_residual = state_dict.get("residual") if a is not None else None


class ActivationNoiseInjection(Callback):
    """Stochastic activation noise: on training forwards, each selected layer input ``x`` becomes
    ``x + κ_a·ε`` with ``ε ~ N(μ_a, σ_a²)`` from the recorder's activation-error statistics, with
    probability ``p`` per layer and step (QDrop-style random dropping). Layers without statistics yet are
    left alone. The choice of layers and the noise are seeded from ``(seed, step, batch_idx)``. No noise for the
    first ``warmup_steps`` optimizer steps, or the first ``warmup_fraction`` of the fit's steps (resolved at train
    start into ``warmup_steps``).

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
        warmup_steps: int = 0,
        noise_source: str = "auto",
        pool_numel: int = 1 << 22,
        warmup_fraction: float = 0.0,
    ) -> None:
        if not isinstance(recorder, QuantErrorRecorder):
            raise ValueError(f"recorder must be a QuantErrorRecorder, got {type(recorder).__name__}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        check_scale_value("noise_scale", noise_scale)
        check_int("seed", seed)
        if noise_source not in NOISE_SOURCES:
            raise ValueError(f"noise_source must be one of {NOISE_SOURCES}, got {noise_source!r}")
        _check_warmup(warmup_steps, warmup_fraction)
        if not recorder.record_activations:
            raise ValueError("the recorder was built with record_activations=False: activation noise needs its statistics")
        self.recorder = recorder
        self.p = float(p)
        self.noise_scale = noise_scale
        self.seed = int(seed)
        self.warmup_steps = warmup_steps
        self.warmup_fraction = float(warmup_fraction)
        self.noise_source = noise_source
        self.pool_numel = int(pool_numel)
        self._handles: list[RemovableHandle] = []
        self._active: set[str] = set()
        self._key: tuple[int, int] = (0, 0)
        self._kappa = 0.0
        self._source: NoiseSource | None = None
        self._coef: dict[str, tuple[int, float, Tensor, Tensor]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(recorder=self.recorder.name, p=self.p)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit: no cached coefficients of a previous fit's statistics
            self._coef.clear()
            self._active = set()

    def settings(self) -> dict[str, Any]:
        """The activation noise's settings as ``dnq/act_noise/...`` hyperparameters (with the recorder's)."""
        return {
            **recorder_settings(self.recorder),
            "dnq/act_noise/p": self.p,
            "dnq/act_noise/noise_scale": describe(self.noise_scale),
            "dnq/act_noise/warmup_steps": self.warmup_steps,
            "dnq/act_noise/warmup_fraction": self.warmup_fraction,
            "dnq/act_noise/seed": self.seed,
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.warmup_steps = _resolve_warmup(self.warmup_steps, self.warmup_fraction, trainer)
        log_settings(trainer, self.settings())
        kind = self.noise_source
        if kind == "auto":
            kind = "pool" if pl_module.device.type == "cpu" else "generator"
        self._source = NoiseSource(kind, "normal", splitmix64(self.seed, 0xAC7), self.pool_numel)
        if not self._handles:
            for n in self.recorder.layers:
                self._handles.append(self.recorder.modules[n].register_forward_pre_hook(self._make_hook(n)))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._kappa = _kappa_value(self.noise_scale, self.warmup_steps, step)
        if log_every_n_steps(trainer, step):
            pl_module.log("dnq/act_kappa", self._kappa, on_step=True, on_epoch=False)
            pl_module.log("dnq/act_warmup", float(step < self.warmup_steps), on_step=True, on_epoch=False)
        self._key = (step, batch_idx)
        if self._kappa == 0.0 or self.p == 0.0:
            self._active = set()
            return
        rng = random.Random(splitmix64(self.seed, step, batch_idx))
        self._active = {n for n in self.recorder.layers if rng.random() < self.p}

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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
