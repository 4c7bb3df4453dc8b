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
from ..quant.targets import has_weight, layer_specs, select_modules

__all__ = ["QuantMSEMixin"]


class QuantMSEMixin:
    """Adds ``λ·MSE(f_Q(x), stopgrad(f(x)))`` to a LightningModule's loss.

    ``f_Q`` is the same network with the target weight quantizer applied to the clean weights and the
    activation quantizer to the selected layer inputs, rounding passed straight through (STE), so the
    gradient reaches the full-precision weights. Weightless selected points (the attention operands the
    recorder attaches to timm ViTs) get their input quantized, no weight.
    When a :class:`~flatq_lightning.QuantErrorRecorder` is among
    the Trainer's callbacks its layers, specs and EMA activation ranges are used (and the clean weights come
    from its weight-noise callback); otherwise layers are selected from ``mse_preset`` and activation ranges
    are taken from the batch. The term costs one extra forward and backward on the steps where it is on.

    Example:
        >>> import lightning.pytorch as pl
        >>> class Net(QuantMSEMixin, pl.LightningModule):
        ...     mse_weight, mse_every, mse_preset = 0.5, 1, "w4a4"
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
    #: the target quantizer when no recorder is attached
    mse_preset: str = "w4a4"
    mse_keep_first_last_8bit: bool = True

    def quant_mse_network(self) -> nn.Module:
        """The network whose quantized copy is compared with ``fp_outputs`` (override to return e.g. ``self.model``)."""
        return self  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------------------------------
    def _quant_mse_targets(self) -> tuple[list[tuple[str, nn.Module]], dict[str, tuple[QuantSpec, QuantSpec]], Any, Any]:
        from .noise import DifferentialNoiseInjection
        from .recorder import QuantErrorRecorder

        trainer = getattr(self, "_trainer", None)
        callbacks = list(trainer.callbacks) if trainer is not None else []
        recorder = next((c for c in callbacks if isinstance(c, QuantErrorRecorder) and c.layers), None)
        if recorder is not None:
            noise = next(
                (c for c in callbacks if isinstance(c, DifferentialNoiseInjection) and c.recorder is recorder), None
            )
            return [(n, recorder.modules[n]) for n in recorder.layers], recorder.specs, recorder, noise
        cache = getattr(self, "_quant_mse_cache", None)
        if cache is None:
            w, a = QuantSpec.parse(self.mse_preset)
            selected = select_modules(self.quant_mse_network())
            if not selected:
                raise ValueError("quant_mse_loss: the network has no quantizable layers (Conv/Linear)")
            cache = (selected, layer_specs(selected, w, a, self.mse_keep_first_last_8bit))
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
                if has_weight(mod):  # weightless points (attention operands): input quantization only
                    w = noise.clean_weight(name) if noise is not None else mod.weight
                    scale, zp = compute_qparams(w.detach(), w_spec, check=False)
                    weights[f"{local}.weight" if local else "weight"] = fake_quantize(w, w_spec, scale, zp, check_scale=False)
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
