"""The FP-vs-quantized MSE term as a LightningModule mixin."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..quant.hooks import hooks_suspended
from ..quant.ops import compute_qparams, fake_quantize
from ..quant.spec import QuantSpec
from ..quant.targets import QuantTarget, as_target, has_weight
from .dnq import DNQ
from .recorder import QuantErrorRecorder
from .weight_noise import DifferentialNoiseInjection

__all__ = ["QuantMSEMixin"]


class QuantMSEMixin:
    """Adds ``λ·MSE(f_Q(x), stopgrad(f(x)))`` to a LightningModule's loss.

    ``f_Q`` is the same network with the target weight quantizer applied to the clean weights and the
    activation quantizer to the selected layer inputs, rounding passed straight through (STE), so the
    gradient reaches the full-precision weights. Weightless selected points (the attention operands the
    recorder attaches to timm ViTs) get their input quantized, no weight.
    Given the DNQ statistics (:meth:`use_quant_stats` with a :class:`~flatq_lightning.DNQ`, or a
    :class:`~flatq_lightning.QuantErrorRecorder` and its weight-noise callback) the term uses the recorder's
    layers, specs and EMA activation ranges and the clean weights under the noise; without them layers are
    selected by ``mse_target`` (a :class:`~flatq_lightning.quant.targets.QuantTarget` or a preset string) and
    activation ranges are taken from the batch. The term costs one extra
    forward and backward on the steps where it is on.

    Example:
        >>> import lightning.pytorch as pl
        >>> class Net(QuantMSEMixin, pl.LightningModule):
        ...     mse_weight, mse_every, mse_target = 0.5, 1, "w4a4"
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        ...     def quant_mse_network(self):
        ...         return self.model
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         logits = self.model(x)
        ...         return F.cross_entropy(logits, y) + self.quant_mse_loss(x, logits)
    """

    #: λ: a float or a callable of the global step
    mse_weight: float | Callable[[int], float] = 0.0
    #: compute the term every this many optimizer steps (0 elsewhere)
    mse_every: int = 1
    #: the target quantizer when no recorder is attached (a QuantTarget, or a preset string)
    mse_target: QuantTarget | str = "w4a4"

    def use_quant_stats(self, stats: Any, weight_noise: Any = None) -> None:
        """Take the target quantizer from the DNQ statistics: a :class:`~flatq_lightning.DNQ` (its recorder and
        weight noise), or a :class:`~flatq_lightning.QuantErrorRecorder` with the weight-noise callback that
        reads it (``None`` when there is none); ``stats=None`` goes back to ``mse_target``."""

        if isinstance(stats, DNQ):
            if weight_noise is not None:
                raise ValueError("a DNQ carries its own weight noise: pass the DNQ alone")
            stats, weight_noise = stats.recorder, stats.weight_noise
        if stats is not None and not isinstance(stats, QuantErrorRecorder):
            raise ValueError(f"use_quant_stats takes a DNQ or a QuantErrorRecorder, got {type(stats).__name__}")
        if weight_noise is not None and (
            not isinstance(weight_noise, DifferentialNoiseInjection) or weight_noise.recorder is not stats
        ):
            raise ValueError("weight_noise must be the DifferentialNoiseInjection that reads this recorder")
        self._quant_mse_stats = stats
        self._quant_mse_noise = weight_noise

    def quant_mse_network(self) -> nn.Module:
        """The network whose quantized copy is compared with ``fp_outputs`` (override to return e.g. ``self.model``)."""
        return self  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------------------------------
    def _quant_mse_targets(self) -> tuple[list[tuple[str, nn.Module]], dict[str, tuple[QuantSpec, QuantSpec]], Any, Any]:
        recorder = getattr(self, "_quant_mse_stats", None)
        if recorder is not None and recorder.layers:
            noise = getattr(self, "_quant_mse_noise", None)
            return [(n, recorder.modules[n]) for n in recorder.layers], recorder.specs, recorder, noise
        cache = getattr(self, "_quant_mse_cache", None)
        if cache is None:
            target = as_target(self.mse_target, "mse_target")
            selected = target.select(self.quant_mse_network())
            if not selected:
                raise ValueError("quant_mse_loss: the network has no quantizable layers (Conv/Linear)")
            cache = (selected, target.layer_specs(selected))
            self._quant_mse_cache = cache
        return cache[0], cache[1], None, None

    def _mse_lambda(self, step: int) -> float:
        lam = self.mse_weight
        return float(lam(step) if callable(lam) else lam)

    def quant_mse_loss(self, inputs: Tensor, fp_outputs: Tensor) -> Tensor:
        """``λ·MSE(f_Q(inputs), stopgrad(fp_outputs))``; a zero tensor on steps where the term is off."""
        trainer = getattr(self, "_trainer", None)
        step = trainer.global_step if trainer is not None else 0
        lam = self._mse_lambda(step)
        zero = fp_outputs.new_zeros(())
        if lam == 0.0 or not self.training or (self.mse_every > 1 and step % self.mse_every != 0):  # type: ignore[attr-defined]
            return zero
        net = self.quant_mse_network()
        layers, specs, recorder, noise = self._quant_mse_targets()
        names_in_net = {id(m): n for n, m in net.named_modules()}
        weights: dict[str, Tensor] = {}
        handles = []
        bn_momentum: list[tuple[nn.Module, float | None]] = []
        try:
            for name, mod in layers:
                local = names_in_net.get(id(mod))
                if local is None:
                    continue
                w_spec, a_spec = specs[name]
                if w_spec is not None and has_weight(mod):  # weightless points (attention operands): input only
                    w = noise.clean_weight(name) if noise is not None else mod.weight
                    scale, zp = compute_qparams(w.detach(), w_spec, check=False)
                    weights[f"{local}.weight" if local else "weight"] = fake_quantize(w, w_spec, scale, zp, check_scale=False)
                if a_spec is not None:  # None: the activations stay float (a16 preset)
                    qp = recorder.act_qparams(name) if recorder is not None else None
                    handles.append(mod.register_forward_pre_hook(_act_quant_hook(a_spec, qp)))
            for m in net.modules():  # keep BN running statistics from seeing the quantized forward
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    bn_momentum.append((m, m.momentum))
                    m.momentum = 0.0
            with hooks_suspended():
                out = functional_call(net, weights, (inputs,), strict=False)
        finally:
            for h in handles:
                h.remove()
            for m, mom in bn_momentum:
                m.momentum = mom
        mse = F.mse_loss(out.float(), fp_outputs.detach().float())
        if trainer is not None:
            self.log("train/quant_mse", mse.detach(), on_step=True, on_epoch=False)  # type: ignore[attr-defined]
        return lam * mse


def _act_quant_hook(spec: QuantSpec, qparams: tuple[Tensor, Tensor] | None):
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        scale, zp = qparams if qparams is not None else compute_qparams(x.detach(), spec, check=False)
        return (fake_quantize(x, spec, scale, zp, check_scale=False), *args[1:])

    return hook
