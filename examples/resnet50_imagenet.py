"""DNQ pre-conditioning of a ResNet-50 on ImageNet, then plain PTQ, with an ordinary Lightning Trainer.

The DNQ callback (error recorder, differential weight noise, activation noise in one) is added to the Trainer
explicitly, next to the PostTrainingQuantization callback that quantizes the result after fit; nothing else
about the training loop changes. The output is an ordinary FP checkpoint plus a PTQ report.

    # one GPU, fine-tuning timm's pretrained weights (they must be in timm's cache or downloadable)
    python examples/resnet50_imagenet.py --data-root /data/imagenet --pretrained
    # all 8 GPUs of a node with DDP (batch size is per GPU)
    python examples/resnet50_imagenet.py --data-root /data/imagenet --pretrained --devices 8 --strategy ddp
    # the plain baseline with the same recipe
    python examples/resnet50_imagenet.py --data-root /data/imagenet --pretrained --no-dnq
    # smoke test: a few steps on synthetic 32x32 images on the CPU (well under a minute)
    python examples/resnet50_imagenet.py --smoke
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from flatq_lightning import DNQ, PostTrainingQuantization
from flatq_lightning.app.data import ImageNetDataModule, SyntheticDataModule
from flatq_lightning.app.models import PretrainedWeightsError
from flatq_lightning.app.module import ImageClassifier
from flatq_lightning.utils.progress import progress_bar_callback


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default; on/off switches say what they do instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.nargs == 0 else super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=_HelpWithDefaults
    )
    p.add_argument("--data-root", default=None, help="ImageNet folder with train/ and val/ class folders")
    p.add_argument("--pretrained", action="store_true", help="start from timm's pretrained ResNet-50 weights")
    p.add_argument(
        "--pretrained-file",
        default=None,
        help="a local timm checkpoint (state dict .pth/.safetensors) to start from instead of the hub "
        "(implies --pretrained; no network needed)",
    )
    p.add_argument("--model", default="resnet50", help="any timm ResNet name (e.g. resnet18, test_resnet)")
    p.add_argument("--image-size", type=int, default=224, help="training crop / evaluation size in pixels")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="per device")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (SGD, Nesterov, cosine)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (not on norm scales and biases)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    p.add_argument("--bits", default="w4a4", help="the DNQ target quantizer, e.g. w4a4, w3a3")
    p.add_argument("--no-dnq", dest="dnq", action="store_false", help="plain training (the baseline)")
    p.add_argument("--mse-weight", type=float, default=0.0, help="λ of the FP-vs-quantized MSE term")
    p.add_argument("--ptq-bits", default="w8a8,w4a8,w4a4,w3a3,w2a4", help="bit-widths reported after fit")
    p.add_argument("--calib-batches", type=int, default=32, help="PTQ calibration batches (training images, no augmentation)")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    p.add_argument("--devices", default="auto", help="number of devices, a list like 0,1, or auto")
    p.add_argument("--strategy", default="auto", help="auto, ddp, ddp_find_unused_parameters_true, …")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (with --strategy ddp)")
    p.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32-true on CPU")
    p.add_argument("--num-workers", type=int, default=8, help="dataloader workers per device")
    p.add_argument("--out", default="runs/resnet50_imagenet", help="logs, checkpoints and the PTQ report")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, initialisation and the injected noise")
    p.add_argument("--smoke", action="store_true", help="a few CPU steps on synthetic 32x32 data")
    return p.parse_args(argv)


def _devices(value: str) -> Any:
    if value == "auto":
        return "auto"
    return [int(v) for v in value.split(",") if v] if "," in value else int(value)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, quantize, report; returns the PTQ metrics (``ptq/<bits>/top1`` …) on rank zero."""
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True)
    trainer_kw: dict[str, Any] = {}
    ptq_bits = [b for b in args.ptq_bits.split(",") if b]
    if args.smoke:
        dm: L.LightningDataModule = SyntheticDataModule(
            num_samples=8, val_samples=4, num_classes=10, image_size=32, batch_size=4, seed=args.seed
        )
        args.pretrained, args.accelerator, args.devices, args.strategy = False, "cpu", "1", "auto"
        ptq_bits, args.calib_batches = ["w4a4"], 1
        trainer_kw = dict(
            max_epochs=1,
            limit_train_batches=2,
            limit_val_batches=1,
            enable_progress_bar=False,
            enable_checkpointing=False,
        )
    else:
        if not args.data_root:
            sys.exit("resnet50_imagenet.py: error: --data-root is required (or use --smoke)")
        dm = ImageNetDataModule(
            args.data_root,
            image_size=args.image_size,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            path_key="--data-root",
        )
        dm.prepare_data()
        dm.setup("fit")  # the number of classes comes from the folder
        trainer_kw = dict(max_epochs=args.epochs)

    try:  # offline without the weights: one line naming --pretrained-file, not a minute of retries
        model = ImageClassifier(
            args.model,
            num_classes=dm.num_classes,
            pretrained=args.pretrained,
            pretrained_file=args.pretrained_file,
            optimizer="sgd",
            lr=args.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=args.weight_decay,
            scheduler="cosine",
            warmup_fraction=0.01,
            label_smoothing=args.label_smoothing,
            mse_weight=args.mse_weight,
            mse_preset=args.bits,
        )
    except PretrainedWeightsError as err:
        sys.exit(f"resnet50_imagenet.py: error: {err}")
    out = Path(args.out)
    ptq = PostTrainingQuantization(
        bits=ptq_bits,
        calib_batches=args.calib_batches,
        stage="validate",
        save_dir=out / "ptq",
        progress=not args.smoke,
    )
    callbacks: list[Any] = [
        *([DNQ(args.bits, seed=args.seed)] if args.dnq else []),
        ptq,
        LearningRateMonitor("step"),
    ]
    if not args.smoke:  # a ViT-B/16 checkpoint with AdamW state is 1 GB: none in the smoke run
        callbacks.append(
            ModelCheckpoint(dirpath=out / "checkpoints", monitor="val/acc", mode="max", save_last=True)
        )
    # in a log (not a terminal): plain progress lines instead of Lightning's tqdm bar
    bar = progress_bar_callback(trainer_kw.get("enable_progress_bar", True), callbacks)
    if bar is not None:
        callbacks.append(bar)
    on_gpu = args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=_devices(str(args.devices)),
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        precision=args.precision or ("bf16-mixed" if on_gpu else "32-true"),
        sync_batchnorm=args.strategy.startswith("ddp"),
        callbacks=callbacks,
        default_root_dir=out,
        log_every_n_steps=50 if not args.smoke else 1,
        num_sanity_val_steps=0,
        **trainer_kw,
    )
    trainer.fit(model, datamodule=dm)
    return ptq.report.metrics() if ptq.report is not None else {}


if __name__ == "__main__":
    metrics = main()
    if metrics:
        print({k: round(v, 2) for k, v in metrics.items()})
