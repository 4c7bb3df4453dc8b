"""WQER and AQER: the target quantizer's weight and activation error statistics, recorded during fit."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from ..quant.attention import attach_attention_points, detach_attention_points
from ..quant.hooks import hooks_are_suspended
from ..quant.observers import RangeObserver, make_observer
from ..quant.ops import (
    compute_qparams,
    mean_square,
    qparams_from_range,
    quant_error_stats,
    sqnr_db_from_error_stats,
)
from ..quant.placement import (
    SharedInputProbe,
    attach_placement_points,
    check_placement,
    detach_placement_points,
)
from ..quant.spec import QuantSpec
from ..quant.targets import QuantTarget, as_target, has_weight
from ..utils.checks import check_bool

__all__ = ["QuantErrorRecorder", "training_target"]


def training_target(target: QuantTarget | str, owner: str = "target") -> QuantTarget:
    """``target`` as a :class:`QuantTarget` that quantizes both sides (what training-time noise needs): a preset
    string becomes one; a float side is refused with the way out."""
    t = as_target(target, owner)
    if t.weight is None or t.act is None:
        raise ValueError(
            f"{t.name!r}: DNQ trains against a quantizer on both sides, and a 16-bit side stays float. "
            "Give the bits the network will be quantized to (e.g. 'w4a8'); for weight noise only, keep a "
            "quantized activation side and pass act_noise=False"
        )
    return t


class QuantErrorRecorder(Callback):
    """Records the target quantizer's errors on the live model (WQER and AQER of the method).

    ``target``: the quantizer the network will meet (a :class:`~flatq_lightning.quant.targets.QuantTarget`, or a
    preset string like ``"w4a4"``): which layers, at which widths, with which observers. Both sides must be
    quantized. Per selected layer (Conv/Linear, first/last at 8 bit by default) it keeps EMAs of
    - the per-output-channel mean and variance of ``Q_w(W) - W`` on the clean weight, plus the channel scale;
    - the per-tensor input range ``[lo, hi]`` and the mean and variance of ``Q_a(x) - x`` for the training
      inputs under that range. The range comes from the activation spec's own observer
      (:func:`~flatq_lightning.quant.make_observer`, ``momentum`` as its EMA momentum): the class PTQ
      calibration uses, so min-max, percentile or MSE ranges are the same in training and in PTQ.
    Statistics refresh every ``stats_every`` optimizer steps (the first measurement initialises the EMA),
    activation statistics are averaged over DDP ranks, and per-layer SQNR (dB) plus model means go to the
    Trainer's loggers on each refresh. ``refresh_weights=False`` leaves the weight measurement to the caller
    (:meth:`refresh_weight_stats`): a weight-noise callback does it, when the weights are clean.

    With the target's ``attention_points`` (default) every timm ``Attention`` of the LightningModule gets quantization
    points on Q, K, V and the softmax output for the duration of ``fit`` (attached in ``setup``, removed at
    the end of training, in ``teardown`` and on exceptions; see
    :func:`~flatq_lightning.quant.attention.attach_attention_points`): they are recorded like layer inputs
    (activation statistics only: a point has no weight) and so get activation noise too. While attached the
    attention runs timm's explicit (non-fused) math; ``state_dict`` keys never change.

    Example:
        >>> rec = QuantErrorRecorder("w4a4", stats_every=16)
        >>> # trainer = Trainer(callbacks=[rec]); trainer.fit(model)
        >>> # rec.weight_mean["layer1.0.conv1"] → per-channel mean of the weight error
    """

    def __init__(
        self,
        target: QuantTarget | str = "w4a4",
        stats_every: int = 16,
        momentum: float = 0.9,
        record_activations: bool = True,
        log_sqnr: bool = True,
        name: str | None = None,
        check_finite: bool = True,
        refresh_weights: bool = True,
        placement: str = "layer_inputs",
    ) -> None:
        #: what is quantized, and how (the layers, their widths and quantizers)
        self.target = training_target(target)
        #: where the activation quantizers are (:mod:`~flatq_lightning.quant.placement`): with ``"onnxruntime"``
        #: the fit records (and the noise perturbs) the residual and pooling points PTQ will quantize too
        self.placement = check_placement(placement, "placement")
        if isinstance(stats_every, bool) or not isinstance(stats_every, int) or stats_every < 1:
            raise ValueError(f"stats_every must be an int >= 1, got {stats_every!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1) (a float), got {momentum!r}")
        for flag, value in (("record_activations", record_activations), ("log_sqnr", log_sqnr)):
            check_bool(flag, value)
        self.stats_every = stats_every
        self.momentum = float(momentum)
        self.record_activations = record_activations
        self.log_sqnr = log_sqnr
        self.check_finite = check_bool("check_finite", check_finite)
        #: False: the weight error is measured only when :meth:`refresh_weight_stats` is called, by the owner of
        #: the weights' timing (a weight-noise callback, which knows when they are clean)
        self.refresh_weights = check_bool("refresh_weights", refresh_weights)
        self.name = name or self.target.name

        self.layers: list[str] = []
        #: the selected layers that have a weight (weight statistics and weight noise apply to these only)
        self.weight_layers: list[str] = []
        self.modules: dict[str, nn.Module] = {}
        self.specs: dict[str, tuple[QuantSpec, QuantSpec]] = {}
        # weight statistics per layer: per-channel tensors (C,)
        self.weight_mean: dict[str, Tensor] = {}
        self.weight_var: dict[str, Tensor] = {}
        self.weight_scale: dict[str, Tensor] = {}
        self.weight_sqnr_db: dict[str, Tensor] = {}
        # activation statistics per layer: 0-d tensors
        self.act_lo: dict[str, Tensor] = {}
        self.act_hi: dict[str, Tensor] = {}
        self.act_mean: dict[str, Tensor] = {}
        self.act_var: dict[str, Tensor] = {}
        self.act_sqnr_db: dict[str, Tensor] = {}
        #: one range observer per layer input (``make_observer(act_spec, momentum)``), seeded from act_lo/act_hi
        self.act_observers: dict[str, RangeObserver] = {}
        self.weight_refreshed_at = -1
        self.act_refreshed_at = -1
        self._handles: list[RemovableHandle] = []
        self._measuring = False
        self._measure_step = -1
        self._pending: dict[str, tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = {}
        # (module, point names) of the attention points this recorder attached, removed at the end of fit
        self._attached: tuple[nn.Module, list[str]] | None = None
        # the model the placement points were attached to (removed at the end of fit)
        self._placed: nn.Module | None = None
        #: layer -> the placement point whose output is this layer's input (the same tensor, which PTQ quantizes
        #: once): not recorded, so not perturbed twice; found on the first training batch of a fit
        self.shared_inputs: dict[str, str] = {}
        self._probe: SharedInputProbe | None = None
        self._probe_done = False

    # the target's parts ----------------------------------------------------------------------------------------
    @property
    def weight_spec(self) -> QuantSpec:
        """The target's weight quantizer (before the first/last policy and per-layer widths: :attr:`specs`)."""
        return self.target.weight

    @property
    def act_spec(self) -> QuantSpec:
        """The target's activation quantizer (before the first/last policy and per-layer widths)."""
        return self.target.act

    # identity -----------------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # setup --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        fit = stage == "fit"
        if self.layers and not fit:
            return
        if fit:  # a new fit starts with no statistics (a resume restores them right after this hook)
            self.reset_stats()
        # every fit selects afresh: attention points are new modules each time they are attached
        if fit and self.target.attention_points:
            self.detach_attention_points()
            self._attached = (pl_module, attach_attention_points(pl_module))
        placed = self.placement != "layer_inputs"
        if fit and placed:
            self.detach_placement_points()
            attach_placement_points(pl_module, self.placement)
            self._placed = pl_module
        if fit:
            self.shared_inputs = {}
            self._probe_done = False
        selected = self.target.select(pl_module, points=self.target.attention_points or placed)
        if not any(has_weight(m) for _, m in selected):  # points alone are no target
            self.detach_attention_points()
            self.detach_placement_points()
            raise ValueError(
                f"{type(self).__name__}: {type(pl_module).__name__} has no quantizable layers (Conv1d/2d/3d, "
                f"Linear) matching include={list(self.target.include)!r} exclude={list(self.target.exclude)!r}"
            )
        self.layers = [n for n, _ in selected]
        self.weight_layers = [n for n, m in selected if has_weight(m)]
        self.modules = dict(selected)
        try:
            self.specs = self.target.layer_specs(selected)
        except ValueError:  # e.g. a per-layer width for a layer this model does not have
            self.detach_attention_points()
            self.detach_placement_points()
            raise
        if fit:
            rank_zero_info(self.summary())

    def reset_stats(self) -> None:
        """Forget every recorded statistic (a callback re-used on another model or fit starts afresh)."""
        for d in self._stat_dicts().values():
            d.clear()
        self.weight_refreshed_at = self.act_refreshed_at = -1
        self._pending.clear()
        self._measuring = False

    def detach_attention_points(self) -> None:
        """Remove the attention points this recorder attached (restoring timm's attention); idempotent."""
        attached, self._attached = self._attached, None
        if attached is not None and attached[1]:
            detach_attention_points(*attached)

    def detach_placement_points(self) -> None:
        """Remove the placement points this recorder attached; idempotent."""
        placed, self._placed = self._placed, None
        if placed is not None:
            detach_placement_points(placed)

    # one quantizer per tensor: the layers whose input a placement point's output is ---------------------------
    def _start_sharing_probe(self) -> None:
        """Watch one training forward (``SharedInputProbe``, what ``share_quantizers`` runs at PTQ)."""
        points = [n for n in self.layers if not has_weight(self.modules[n])]
        self._probe = SharedInputProbe(self.modules, points, lambda n: self.specs[n][1]).__enter__()

    def _end_sharing_probe(self) -> None:
        probe, self._probe = self._probe, None
        probe.__exit__(None, None, None)
        self.shared_inputs = dict(probe.shared)
        for n in self.shared_inputs:
            self._pending.pop(n, None)  # measured in this batch before the probe knew
        if self.shared_inputs:
            rank_zero_info(f"{type(self).__name__} [{self.name}]: {len(self.shared_inputs)} layer input(s) are a "
                           "placement point's output and are recorded there only: "
                           + ", ".join(f"{k} <- {v}" for k, v in list(self.shared_inputs.items())[:6])
                           + (" …" if len(self.shared_inputs) > 6 else ""))

    def summary(self) -> str:
        """A table of the selected layers and their target bit-widths."""
        lines = [f"{type(self).__name__} [{self.name}]: {len(self.layers)} layers, refresh every "
                 f"{self.stats_every} steps, EMA {self.momentum}",
                 f"  {'layer':<40} {'type':<10} {'weight shape':<20} {'W bits':>6} {'A bits':>6}"]
        for n in self.layers:
            m = self.modules[n]
            w, a = self.specs[n]
            if has_weight(m):
                shape, wbits = str(tuple(m.weight.shape)), str(w.bits)
            else:
                shape, wbits = "-", "-"
            lines.append(f"  {n:<40} {type(m).__name__:<10} {shape:<20} {wbits:>6} {a.bits:>6}")
        return "\n".join(lines)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._move_stats(pl_module.device)
        if self.record_activations and not self._handles:
            for n in self.layers:
                self._handles.append(
                    self.modules[n].register_forward_pre_hook(self._make_hook(n), prepend=True)
                )
        if self.refresh_weights and not self.weight_mean:
            self.refresh_weight_stats(trainer.global_step)

    def _move_stats(self, device: torch.device) -> None:
        for d in self._stat_dicts().values():
            for k, v in d.items():
                d[k] = v.to(device)
        self.act_observers.clear()  # re-seeded (on the device) from act_lo/act_hi on first use

    # weights ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_weight_stats(self, step: int, weights: dict[str, Tensor] | None = None) -> None:
        """Measure the weight error on the given (clean) weights, default the layers' own, and update the EMAs."""
        first = not self.weight_mean
        m = self.momentum
        for n in self.weight_layers:
            w = (weights or {}).get(n, self.modules[n].weight).detach()
            spec = self.specs[n][0]
            scale, zp = compute_qparams(w, spec, check=False)
            mean, var = quant_error_stats(w, spec, scale, zp)
            sqnr = sqnr_db_from_error_stats(mean_square(w), mean, var)
            if first or n not in self.weight_mean:
                self.weight_mean[n], self.weight_var[n], self.weight_scale[n] = mean, var, scale
            else:
                self.weight_mean[n] = m * self.weight_mean[n] + (1 - m) * mean
                self.weight_var[n] = m * self.weight_var[n] + (1 - m) * var
                self.weight_scale[n] = m * self.weight_scale[n] + (1 - m) * scale
            self.weight_sqnr_db[n] = sqnr
        self.weight_refreshed_at = step
        if self.check_finite:
            self._raise_if_not_finite(
                "weight", step, {n: torch.stack([self.weight_mean[n].sum(), self.weight_var[n].sum(),
                                                 self.weight_scale[n].sum()]) for n in self.weight_layers}
            )

    def _raise_if_not_finite(self, kind: str, step: int, stats: dict[str, Tensor]) -> None:
        """One host sync per refresh: stop the fit, naming the step and the first layer with NaN/inf statistics."""
        if not stats:
            return
        finite = torch.stack([torch.isfinite(t).all() for t in stats.values()])
        if bool(finite.all()):
            return
        bad = [n for n, ok in zip(stats, finite.tolist()) if not ok]
        what = "weights" if kind == "weight" else "inputs"
        raise FloatingPointError(
            f"{type(self).__name__} [{self.name}]: non-finite {kind} statistics at step {step} in layer {bad[0]!r}"
            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: its {what} hold NaN or inf (did the loss "
            "diverge? lower the learning rate or the noise scale); stopping the fit"
        )

    def is_refresh_step(self, step: int) -> bool:
        return step % self.stats_every == 0

    # activations --------------------------------------------------------------------------------------------
    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self._measuring or not module.training or hooks_are_suspended() or name in self._pending:
                return
            if name in self.shared_inputs:
                return
            x = args[0]
            if not isinstance(x, Tensor):
                return
            self._pending[name] = self._measure_input(name, x.detach())

        return hook

    def act_observer(self, name: str) -> RangeObserver:
        """The range observer of a layer input: the act spec's observer with ``momentum`` as its EMA."""
        obs = self.act_observers.get(name)
        if obs is None:
            obs = self.act_observers[name] = make_observer(self.specs[name][1], self.momentum)
            if name in self.act_lo:  # restored from a checkpoint: continue its EMA
                obs.lo, obs.hi, obs.count = self.act_lo[name], self.act_hi[name], 1
        return obs

    @torch.no_grad()
    def _measure_input(self, name: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        spec = self.specs[name][1]
        xf = x.float()
        obs = self.act_observer(name)
        # the observer's running range after this batch (committed, averaged over ranks, at batch end)
        lo, hi = obs.merged(*obs.batch_range(xf))
        scale, zp = qparams_from_range(lo, hi, spec)
        mean, var = quant_error_stats(xf, spec, scale, zp)
        sig = mean_square(xf)
        return lo, hi, mean, var, sig

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._measuring = (
            self.record_activations and self.is_refresh_step(step) and step != self.act_refreshed_at
        )
        self._measure_step = step  # global_step moves on with the optimizer step before batch end
        if self._placed is not None and self._probe is None and not self._probe_done:
            self._start_sharing_probe()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._probe is not None:
            self._end_sharing_probe()
            self._probe_done = True
        if self._measuring and self._pending:
            self._commit_activation_stats(trainer)
            self._measuring = False
        step = trainer.global_step
        if (
            self.refresh_weights
            and self.is_refresh_step(step)
            and step != self.weight_refreshed_at
        ):
            self.refresh_weight_stats(step)
            self.log_stats(trainer)

    def _commit_activation_stats(self, trainer: pl.Trainer) -> None:
        names = [n for n in self.layers if n in self._pending]
        packed = torch.stack([torch.stack(self._pending[n]) for n in names])  # (L, 5)
        self._pending.clear()
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed, reduce_op="mean")
        if self.check_finite:
            self._raise_if_not_finite("activation", trainer.global_step, dict(zip(names, packed[:, :3].unbind(0))))
        m = self.momentum
        for i, n in enumerate(names):
            lo, hi, mean, var, sig = packed[i].unbind()
            self.act_observer(n).assign(lo, hi)  # the observer's merge, computed in _measure_input
            self.act_lo[n], self.act_hi[n] = lo, hi
            if n in self.act_mean:
                mean = m * self.act_mean[n] + (1 - m) * mean
                var = m * self.act_var[n] + (1 - m) * var
            self.act_mean[n], self.act_var[n] = mean, var
            self.act_sqnr_db[n] = sqnr_db_from_error_stats(sig, mean, var)
        self.act_refreshed_at = self._measure_step
        self.log_stats(trainer)

    def log_stats(self, trainer: pl.Trainer) -> None:
        """Per-layer and mean SQNR (dB) to every logger: one host sync per refresh, none per step."""
        if not self.log_sqnr or not trainer.loggers or not trainer.is_global_zero:
            return
        metrics: dict[str, float] = {}
        for kind, d in (("w", self.weight_sqnr_db), ("a", self.act_sqnr_db)):
            if not d:
                continue
            names = list(d)
            vals = torch.stack([d[n].float() for n in names]).tolist()
            finite = [v for v in vals if math.isfinite(v)]
            for n, v in zip(names, vals):
                metrics[f"quant_{self.name}/{kind}_sqnr_db/{n}"] = v
            if finite:
                metrics[f"quant_{self.name}/{kind}_sqnr_db_mean"] = sum(finite) / len(finite)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # accessors used by the noise callbacks and the MSE term ----------------------------------------------------
    def act_qparams(self, name: str) -> tuple[Tensor, Tensor] | None:
        """The activation qparams of a layer from the EMA range, or None before the first measurement."""
        if name not in self.act_lo:
            return None
        return qparams_from_range(self.act_lo[name], self.act_hi[name], self.specs[name][1])

    # lifecycle ----------------------------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._probe is not None:
            self._probe.__exit__(None, None, None)
            self._probe = None
        self._measuring = False
        self._pending.clear()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.remove_hooks()
        self.detach_attention_points()
        self.detach_placement_points()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.remove_hooks()
        self.detach_attention_points()
        self.detach_placement_points()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_hooks()
        self.detach_attention_points()
        self.detach_placement_points()

    # state --------------------------------------------------------------------------------------------------
    def _stat_dicts(self) -> dict[str, dict[str, Tensor]]:
        return {
            "weight_mean": self.weight_mean,
            "weight_var": self.weight_var,
            "weight_scale": self.weight_scale,
            "weight_sqnr_db": self.weight_sqnr_db,
            "act_lo": self.act_lo,
            "act_hi": self.act_hi,
            "act_mean": self.act_mean,
            "act_var": self.act_var,
            "act_sqnr_db": self.act_sqnr_db,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: {n: v.detach().cpu() for n, v in d.items()} for k, d in self._stat_dicts().items()}
        state["weight_refreshed_at"] = self.weight_refreshed_at
        state["act_refreshed_at"] = self.act_refreshed_at
        state["specs"] = (self.weight_spec.to_dict(), self.act_spec.to_dict())
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k, d in self._stat_dicts().items():
            d.clear()
            d.update(state_dict.get(k, {}))
        self.act_observers.clear()  # re-seeded from act_lo/act_hi on first use
        self.weight_refreshed_at = state_dict.get("weight_refreshed_at", -1)
        self.act_refreshed_at = state_dict.get("act_refreshed_at", -1)
