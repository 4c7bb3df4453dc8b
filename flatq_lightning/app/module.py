"""A ready image classifier LightningModule with the FP-vs-quantized MSE term built in."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ..callbacks.mse import QuantMSEMixin
from ..callbacks.sam import SAM
from ..quant.targets import QuantTarget, as_target
from .models import create_model

__all__ = ["ImageClassifier", "OPTIMIZERS", "SCHEDULERS"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("onecycle", "cosine", "none")


class ImageClassifier(QuantMSEMixin, L.LightningModule):
    """Classifier around ``self.model`` (built by :func:`~flatq_lightning.app.models.create_model` or given).

    The loss is ``cross_entropy(logits, y, label_smoothing) + quant_mse_loss(x, logits)``; the second term
    (:class:`~flatq_lightning.callbacks.mse.QuantMSEMixin`) is zero unless ``mse_weight > 0``. Top-1 (and top-5 when
    there are at least 5 classes) accuracy are torchmetrics objects, one per stage, logged as ``train/acc``,
    ``val/acc``, ``val/acc5``, ``test/acc``, ``test/acc5``.

    Hyperparameters are saved, so ``ImageClassifier.load_from_checkpoint(path)`` rebuilds the network from
    its name. When an ``nn.Module`` is passed as ``model`` it is not saved: pass it again to
    ``load_from_checkpoint(path, model=net)``.

    Args:
        model: a :func:`create_model` name (``"cifar_resnet20"``, ``"resnet50"``, …) or an ``nn.Module``.
        num_classes: classes of the classifier head (ignored when ``model`` is a module).
        pretrained: load timm's pretrained weights (needs them cached or network access; offline it fails at
            once, naming ``pretrained_file``).
        pretrained_file: a local timm checkpoint (state dict, ``.pth``/``.safetensors``) to start from instead
            of the hub (implies ``pretrained``; timm re-initialises a classifier of another size).
        model_kwargs: extra keyword arguments for :func:`create_model` (``in_chans``, ``img_size``, …).
        optimizer: ``"sgd"`` (momentum, optional Nesterov) or ``"adamw"``.
        lr, momentum, nesterov, weight_decay, betas: optimizer settings.
        sam_rho: when > 0, the optimizer is wrapped in :class:`~flatq_lightning.callbacks.sam.SAM` with this radius
            (the SAM baseline from the same configs: ``module.sam_rho=0.05``); two forward/backward passes
            per step, running BN statistics updated once.
        sam_adaptive: ASAM (scale-invariant radius) instead of SAM.
        decay_norm_and_bias: apply weight decay to 1-d parameters (norm scales, biases) too.
        scheduler: ``"onecycle"``, ``"cosine"`` (linear warmup then cosine to ``min_lr_ratio·lr``) or
            ``"none"``; stepped every optimizer step.
        warmup_fraction: fraction of the optimizer steps spent warming up (``pct_start`` of one-cycle).
        label_smoothing: cross-entropy label smoothing.
        mse_weight, mse_every, mse_target: the MSE term's λ, period in steps and target quantizer (a
            :class:`~flatq_lightning.quant.targets.QuantTarget` or a preset string; a target object is not saved
            with the hyperparameters, a string is).

    Example:
        >>> import torch
        >>> clf = ImageClassifier("small_cnn", num_classes=10, model_kwargs={"in_chans": 1}, lr=0.05)
        >>> clf(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 10])
        >>> clf.hparams.optimizer, clf.mse_weight
        ('sgd', 0.0)
    """

    def __init__(
        self,
        model: str | nn.Module,
        num_classes: int = 10,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        pretrained_file: str | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        sam_rho: float = 0.0,
        sam_adaptive: bool = False,
        decay_norm_and_bias: bool = False,
        scheduler: str = "onecycle",
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        mse_weight: float = 0.0,
        mse_every: int = 1,
        mse_target: QuantTarget | str = "w4a4",
    ) -> None:
        super().__init__()
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("warmup_fraction", warmup_fraction), ("min_lr_ratio", min_lr_ratio),
                            ("label_smoothing", label_smoothing), ("mse_weight", mse_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        for name, flag in (("pretrained", pretrained), ("nesterov", nesterov), ("sam_adaptive", sam_adaptive),
                           ("decay_norm_and_bias", decay_norm_and_bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r} ({type(flag).__name__})")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if isinstance(sam_rho, bool) or not isinstance(sam_rho, (int, float)) or not 0.0 <= float(sam_rho) < math.inf:
            raise ValueError(f"sam_rho must be a finite number >= 0 (0 = no SAM), got {sam_rho!r}")
        if not float(lr) > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0.0 <= float(warmup_fraction) < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if float(mse_weight) < 0:
            raise ValueError(f"mse_weight must be >= 0, got {mse_weight!r}")
        if isinstance(mse_every, bool) or not isinstance(mse_every, int) or mse_every < 1:
            raise ValueError(f"mse_every must be a positive int (optimizer steps), got {mse_every!r}")
        target = as_target(mse_target, "mse_target")  # ValueError naming the expected form
        # hyperparameters stay plain values (flatq-ptq reads checkpoints with weights_only=True)
        ignore = [k for k, v in (("model", model), ("mse_target", mse_target)) if not isinstance(v, str)]
        self.save_hyperparameters(ignore=ignore)
        if isinstance(model, nn.Module):
            self.model = model
        else:
            self.model = create_model(
                model, num_classes, pretrained=pretrained, pretrained_file=pretrained_file, **dict(model_kwargs or {})
            )
        num_classes = self._infer_num_classes(num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 for classification accuracy, got {num_classes}")
        self.num_classes = num_classes
        self.mse_weight = float(mse_weight)
        self.mse_every = int(mse_every)
        self.mse_target = target

        def acc(k: int) -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro")

        self.train_acc = acc(1)
        self.val_acc, self.test_acc = acc(1), acc(1)
        self.top5 = num_classes >= 5
        if self.top5:
            self.val_acc5, self.test_acc5 = acc(5), acc(5)

    def _infer_num_classes(self, default: int) -> int:
        head = self.model.get_classifier() if hasattr(self.model, "get_classifier") else None
        head = head if isinstance(head, nn.Linear) else getattr(self.model, "fc", None)
        return int(head.out_features) if isinstance(head, nn.Linear) else int(default)

    # the MSE mixin quantizes the network, not the LightningModule (metrics, etc.)
    def quant_mse_network(self) -> nn.Module:
        return self.model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # steps -------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        loss = ce + self.quant_mse_loss(x, logits)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/ce", ce.detach(), on_step=True, on_epoch=False)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        acc = self.val_acc if stage == "val" else self.test_acc
        acc(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_step=False, on_epoch=True)
        if self.top5:
            acc5 = self.val_acc5 if stage == "val" else self.test_acc5
            acc5(logits, y)
            self.log(f"{stage}/acc5", acc5, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.model(x).softmax(-1)

    # optimisation ------------------------------------------------------------------------------------------
    def _param_groups(self) -> list[dict[str, Any]]:
        wd = float(self.hparams.weight_decay)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.hparams.decay_norm_and_bias or wd == 0.0:
            return [{"params": params, "weight_decay": wd}]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    def _total_steps(self) -> int:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"scheduler={self.hparams.scheduler!r} needs a finite training length: set trainer.max_epochs "
                "or trainer.max_steps (or use scheduler='none')"
            )
        return int(total)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self._param_groups()
        base: type[torch.optim.Optimizer]
        if hp.optimizer == "sgd":
            base = torch.optim.SGD
            kw: dict[str, Any] = dict(lr=hp.lr, momentum=hp.momentum, nesterov=bool(hp.nesterov and hp.momentum > 0))
        else:
            base, kw = torch.optim.AdamW, dict(lr=hp.lr, betas=tuple(hp.betas))
        rho = float(hp.get("sam_rho", 0.0))
        if rho > 0:
            opt: torch.optim.Optimizer = SAM(groups, base, rho=rho, adaptive=bool(hp.get("sam_adaptive", False)), **kw)
        else:
            opt = base(groups, **kw)
        if hp.scheduler == "none":
            return opt
        total = self._total_steps()
        warmup = int(round(hp.warmup_fraction * total))
        if total < 4:  # too short to schedule (fast_dev_run, smoke runs): constant learning rate
            sched: Any = torch.optim.lr_scheduler.LambdaLR(opt, _constant)
        elif hp.scheduler == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt,
                max_lr=hp.lr,
                total_steps=total,
                # both phases need at least one step
                pct_start=min(max(hp.warmup_fraction, 2.0 / total), 1.0 - 2.0 / total),
                anneal_strategy="cos",
                cycle_momentum=hp.optimizer == "sgd",
            )
        else:
            floor = float(hp.min_lr_ratio)

            def cosine(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                t = min(1.0, (step - warmup) / max(1, total - warmup))
                return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _constant(step: int) -> float:
    return 1.0
