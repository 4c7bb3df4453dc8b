"""DNQ pre-conditioning of a timm ResNet-50 or ViT-B/16 on ImageNet, then PTQ, with your own LightningModule.

Everything here is ordinary Lightning and timm code: a small LightningModule around ``timm.create_model``, torchvision
``ImageFolder`` datasets with the standard transforms, and a ``lightning.Trainer``. flatq_lightning adds two
callbacks to the Trainer's list and nothing else:

    DNQ("w4a4")                                   # train flat for the W4A4 quantizer
    PostTrainingQuantization(bits=[...])          # after fit: fold BN, calibrate, quantize, report

The output is an ordinary FP checkpoint (clean weights, clean BatchNorm statistics) plus a PTQ report.
No weights are downloaded: start from scratch, or from a local timm checkpoint with --pretrained-file.

    # one GPU, fine-tuning a local copy of timm's ResNet-50 weights
    python examples/imagenet_dnq.py --arch resnet50 --data-root /data/imagenet --pretrained-file resnet50.safetensors
    # all 8 GPUs of a node with DDP (--batch-size is per GPU)
    python examples/imagenet_dnq.py --arch vit_b16 --data-root /data/imagenet --pretrained-file vit_b16.pth \
        --devices 8 --strategy ddp
    # the plain baseline with the same recipe
    python examples/imagenet_dnq.py --arch resnet50 --data-root /data/imagenet --pretrained-file resnet50.safetensors --no-dnq
    # a quick check on any small ImageFolder: timm's tiny test network at 32 px on the CPU
    python examples/imagenet_dnq.py --arch resnet50 --model test_resnet --image-size 32 --data-root ./tiny \
        --epochs 1 --batch-size 4 --num-workers 0 --accelerator cpu --ptq-bits w4a4 --calib-batches 1
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from flatq_lightning import DNQ, PostTrainingQuantization

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: per architecture: the timm network and the fine-tuning recipe (each value can be overridden on the command line)
ARCHS: dict[str, dict[str, Any]] = {
    "resnet50": dict(
        model="resnet50", optimizer="sgd", lr=0.01, weight_decay=1e-4, warmup=0.01, min_lr_ratio=0.0, epochs=10,
        batch_size=128, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", crop_pct=0.875,
        gradient_clip_val=None, model_kwargs={},
    ),
    # timm's ViT preprocessing (mean = std = 0.5, bicubic, crop 0.9), AdamW, cosine with warmup, stochastic depth
    "vit_b16": dict(
        model="vit_base_patch16_224", optimizer="adamw", lr=2e-5, weight_decay=0.05, warmup=0.05, min_lr_ratio=0.01,
        epochs=5, batch_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.9,
        gradient_clip_val=1.0, model_kwargs={"drop_path_rate": 0.1},
    ),
}


class TimmClassifier(L.LightningModule):
    """A timm network, cross-entropy, top-1/top-5 accuracy, SGD or AdamW with warmup and a cosine schedule."""

    def __init__(
        self,
        model: str,
        num_classes: int,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        warmup: float = 0.01,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.1,
        pretrained_file: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # pretrained=False: nothing is downloaded; a local checkpoint is loaded below
        self.model = timm.create_model(model, pretrained=False, num_classes=num_classes, **(model_kwargs or {}))
        if pretrained_file:
            load_local_weights(self.model, pretrained_file)
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes)
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.val_acc5(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
        self.log("val/acc5", self.val_acc5)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # no weight decay on norm scales and biases
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, nesterov=True)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.999))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(hp.warmup * total)

        def factor(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio * lr
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def load_local_weights(model: nn.Module, path: str) -> None:
    """A timm state dict (``.pth``/``.safetensors``) into ``model``; a classifier of another size stays new."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(kept, strict=False)
    skipped = sorted(set(own) - set(kept))
    if skipped:
        print(f"{path}: {len(kept)} tensors loaded; left as initialised: {', '.join(skipped[:4])}"
              f"{' …' if len(skipped) > 4 else ''}", file=sys.stderr)


def image_folders(root: str, size: int, mean: Sequence[float], std: Sequence[float], interpolation: str,
                  crop_pct: float) -> tuple[ImageFolder, ImageFolder]:
    """``root/train`` and ``root/val`` with the standard ImageNet training and evaluation transforms."""
    interp = T.InterpolationMode(interpolation)
    train_tf = T.Compose([T.RandomResizedCrop(size, interpolation=interp), T.RandomHorizontalFlip(),
                          T.ToTensor(), T.Normalize(mean, std)])
    eval_tf = T.Compose([T.Resize(int(math.floor(size / crop_pct)), interpolation=interp), T.CenterCrop(size),
                         T.ToTensor(), T.Normalize(mean, std)])
    return ImageFolder(str(Path(root) / "train"), train_tf), ImageFolder(str(Path(root) / "val"), eval_tf)


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default; on/off switches say what they do instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.nargs == 0 else super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpWithDefaults)
    p.add_argument("--arch", choices=sorted(ARCHS), default="resnet50", help="network and fine-tuning recipe")
    p.add_argument("--data-root", required=True, help="ImageFolder root with train/ and val/ class folders")
    p.add_argument("--model", default=None, help="another timm network with the arch's recipe (e.g. test_resnet, "
                   "test_vit); default: the arch's (resnet50, vit_base_patch16_224)")
    p.add_argument("--pretrained-file", default=None, help="a local timm checkpoint (.pth/.safetensors) to start from")
    p.add_argument("--image-size", type=int, default=224, help="training crop / evaluation size in pixels")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: resnet50 10, vit_b16 5)")
    p.add_argument("--batch-size", type=int, default=None, help="per device (default: resnet50 128, vit_b16 64)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: resnet50 0.01 with SGD, "
                   "vit_b16 2e-5 with AdamW)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: resnet50 1e-4, vit_b16 0.05")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    p.add_argument("--bits", default="w4a4", help="the DNQ target quantizer, e.g. w4a4, w3a3")
    p.add_argument("--no-dnq", dest="dnq", action="store_false", help="plain training (the baseline)")
    p.add_argument("--ptq-bits", default="w8a8,w4a8,w4a4,w3a3,w2a4", help="bit-widths reported after fit")
    p.add_argument("--ptq-recipe", default="minmax", help="PTQ recipe: minmax, practical, reconstruct")
    p.add_argument("--calib-batches", type=int, default=32, help="PTQ calibration batches (training batches)")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    p.add_argument("--devices", default="auto", help="number of devices, a list like 0,1, or auto")
    p.add_argument("--strategy", default="auto", help="auto, ddp, …")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (with --strategy ddp)")
    p.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32-true on CPU")
    p.add_argument("--num-workers", type=int, default=8, help="dataloader workers per device")
    p.add_argument("--out", default="runs/imagenet_dnq", help="logs, checkpoints and the PTQ report")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, initialisation and the injected noise")
    return p.parse_args(argv)


def _devices(value: str) -> Any:
    if value == "auto":
        return "auto"
    return [int(v) for v in value.split(",") if v] if "," in value else int(value)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, quantize, report; returns the PTQ metrics (``ptq/<bits>/top1`` …) on rank zero."""
    args = parse_args(argv)
    recipe = ARCHS[args.arch]
    L.seed_everything(args.seed, workers=True)

    train_set, val_set = image_folders(args.data_root, args.image_size, recipe["mean"], recipe["std"],
                                       recipe["interpolation"], recipe["crop_pct"])
    batch_size = args.batch_size or recipe["batch_size"]
    loader_kw = dict(batch_size=batch_size, num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(train_set, shuffle=True, drop_last=False, **loader_kw)
    val_loader = DataLoader(val_set, shuffle=False, **loader_kw)

    model_kwargs = dict(recipe["model_kwargs"])
    if args.arch == "vit_b16":
        model_kwargs["img_size"] = args.image_size  # the position embedding follows the resolution
    model = TimmClassifier(
        args.model or recipe["model"],
        num_classes=len(train_set.classes),
        model_kwargs=model_kwargs,
        optimizer=recipe["optimizer"],
        lr=args.lr or recipe["lr"],
        weight_decay=recipe["weight_decay"] if args.weight_decay is None else args.weight_decay,
        warmup=recipe["warmup"],
        min_lr_ratio=recipe["min_lr_ratio"],
        label_smoothing=args.label_smoothing,
        pretrained_file=args.pretrained_file,
    )

    out = Path(args.out)
    ptq = PostTrainingQuantization(
        bits=[b for b in args.ptq_bits.split(",") if b],
        calib_batches=args.calib_batches,
        recipe=args.ptq_recipe,
        stage="validate",  # evaluate the quantized copies on val_loader
        save_dir=out / "ptq",
    )
    callbacks: list[Any] = [
        *([DNQ(args.bits, seed=args.seed)] if args.dnq else []),
        ptq,
        ModelCheckpoint(dirpath=out / "checkpoints", monitor="val/acc", mode="max", save_last=True),
        LearningRateMonitor("step"),
    ]
    on_gpu = args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=_devices(str(args.devices)),
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        precision=args.precision or ("bf16-mixed" if on_gpu else "32-true"),
        sync_batchnorm=args.strategy.startswith("ddp"),
        max_epochs=args.epochs or recipe["epochs"],
        gradient_clip_val=recipe["gradient_clip_val"],
        callbacks=callbacks,
        default_root_dir=out,
        log_every_n_steps=min(50, max(1, len(train_loader))),
        num_sanity_val_steps=0,
        enable_progress_bar=sys.stdout.isatty(),  # in a log file: no tqdm bar (metrics go to the logger)
    )
    trainer.fit(model, train_loader, val_loader)
    return ptq.report.metrics() if ptq.report is not None else {}


if __name__ == "__main__":
    metrics = main()
    if metrics:
        print({k: round(v, 2) for k, v in metrics.items()})
