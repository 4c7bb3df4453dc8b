"""ViT benchmark (issue #7): does quantizing attention's operands change the PTQ picture, and does DNQ help?

Trains the CIFAR ViT (``vit_cifar``: timm ViT-Tiny layout, 32×32 px, patch 4, depth 6, width 192, 3 heads)
on a CIFAR-10 subset twice with the same data, budget and seed (AdamW, linear warmup + cosine):

    plain   no callbacks
    dnq     ``dnq_callbacks("w4a4")``: recorder, differential weight noise, activation noise; the recorder also
            attaches the attention points, so Q, K, V and the softmax output get activation noise too

then runs plain round-to-nearest PTQ (per-channel min-max weights, per-tensor min-max activations, first/last
layer at 8 bit, calibration on un-augmented training images) at W8A8, W6A6 and W4A4, twice per bit-width:

    linear     only the inputs of the Linear/Conv layers are quantized (``QuantTarget(attention_points=False)``)
    +attn      Q, K, V and the softmax output too (``attention_points=True``, the ViT PTQ papers' W4A4)

and reports top-1 on the test subset. Prints a Markdown table and writes JSON (``--out``).

    python benchmarks/vit_attention.py --data ../shared/data/cifar10-jpeg.zip --train-subset 10000 --epochs 30
    python benchmarks/vit_attention.py --train-subset 512 --test-subset 256 --epochs 1 --out /tmp/vit_smoke.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks._common import Timer  # noqa: E402
from flatq_lightning import dnq_callbacks  # noqa: E402
from flatq_lightning.app.data import CIFAR10DataModule  # noqa: E402
from flatq_lightning.app.models.vit import vit_cifar  # noqa: E402
from flatq_lightning.app.module import ImageClassifier  # noqa: E402
from flatq_lightning.ptq.runner import evaluate_topk  # noqa: E402
from flatq_lightning.quant import QuantPoint, QuantTarget, batch_inputs, quantize_model  # noqa: E402

BITS = ("w8a8", "w6a6", "w4a4")
VARIANTS = ("plain", "dnq")
MODES = {"linear": False, "attn": True}


def train(variant: str, args: argparse.Namespace, dm: CIFAR10DataModule) -> tuple[nn.Module, dict[str, Any]]:
    """Train one variant; returns the (clean, eval-mode) network and training facts."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    pl.seed_everything(args.seed, workers=True)
    module = ImageClassifier(
        vit_cifar(num_classes=dm.num_classes, depth=args.depth),
        optimizer="adamw", lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999),
        scheduler="cosine", warmup_fraction=args.warmup_fraction, label_smoothing=0.1,
    )
    cbs: list[pl.Callback] = dnq_callbacks("w4a4", stats_every=args.stats_every, seed=args.seed) if variant == "dnq" else []
    timer = Timer()
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, max_epochs=args.epochs, precision=args.precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=args.progress, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[*cbs, timer],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=dm)
    facts: dict[str, Any] = {"train_s": timer.seconds, "steps": trainer.global_step}
    if cbs:  # the recorder's activation SQNR of the attention points at the end of training (W4A4 target)
        rec = cbs[0]
        pts = {n: float(v) for n, v in rec.act_sqnr_db.items() if isinstance(rec.modules.get(n), QuantPoint)}
        facts["point_act_sqnr_db_mean"] = sum(pts.values()) / len(pts) if pts else None
    return module.model.eval(), facts


def ptq_table(net: nn.Module, calib: list[Tensor], test_loader: Any, bits: tuple[str, ...], device: torch.device) -> dict[str, Any]:
    """FP top-1 and, per bit-width and mode, the top-1 of the quantized copy."""
    net = net.to(device)
    fp, n_eval, _ = evaluate_topk(net, test_loader, device, ks=(1,))
    out: dict[str, Any] = {"fp_top1": fp[1], "num_eval": n_eval, "ptq": {}}
    for b in bits:
        row = {}
        for mode, points in MODES.items():
            q = quantize_model(net, QuantTarget.preset(b, attention_points=points), calib_batches=calib).to(device)
            row[mode] = evaluate_topk(q, test_loader, device, ks=(1,))[0][1]
            del q
        out["ptq"][b] = row
    return out


def markdown(results: list[dict[str, Any]], bits: tuple[str, ...]) -> str:
    plain_s = next((r["train_s"] for r in results if r["variant"] == "plain"), None)
    head = "| training | train s | vs plain | FP | " + " | ".join(f"{b.upper()} {m}" for b in bits for m in ("linear", "+attn")) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = [f"{r['ptq'][b][m]:.2f}" for b in bits for m in MODES]
        ratio = f"{r['train_s'] / plain_s:.2f}x" if plain_s else "-"
        lines.append(f"| {r['variant']} | {r['train_s']:.0f} | {ratio} | {r['fp_top1']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.zip", help="CIFAR-10 zip/folder")
    ap.add_argument("--train-subset", type=int, default=10_000, help="training images (seeded subset)")
    ap.add_argument("--test-subset", type=int, default=None, help="test images (default: all 10,000)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-fraction", type=float, default=0.1)
    ap.add_argument("--depth", type=int, default=6, help="transformer blocks")
    ap.add_argument("--stats-every", type=int, default=16)
    ap.add_argument("--calib-images", type=int, default=1024, help="calibration images for PTQ")
    ap.add_argument("--bits", default=",".join(BITS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/vit_attention/<cpu|gpu>/"
                    "<date>_vit-cifar-depth<d>_<variants>.json)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bits = tuple(b.strip().lower() for b in args.bits.split(",") if b.strip())
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    for b in bits:
        QuantTarget.preset(b)  # ValueError naming the allowed form

    dm = CIFAR10DataModule(
        args.data, batch_size=args.batch_size, eval_batch_size=256, train_subset=args.train_subset,
        test_subset=args.test_subset, seed=0, num_workers=args.num_workers,
    )
    dm.setup("fit")
    n_calib = max(1, math.ceil(args.calib_images / args.batch_size))
    calib = [batch_inputs(b) for _, b in zip(range(n_calib), dm.calib_dataloader(args.batch_size))]

    results: list[dict[str, Any]] = []
    for v in variants:
        t0 = time.perf_counter()
        net, facts = train(v, args, dm)
        device = next(net.parameters()).device
        table = ptq_table(net, [c.to(device) for c in calib], dm.test_dataloader(), bits, device)
        results.append({"variant": v, **facts, **table, "device": str(device), "total_s": time.perf_counter() - t0})
        print(f"[{v}] FP {table['fp_top1']:.2f}  " + "  ".join(
            f"{b}: {table['ptq'][b]['linear']:.2f}/{table['ptq'][b]['attn']:.2f}" for b in bits), flush=True)

    table_md = markdown(results, bits)
    print()
    print(table_md)
    payload = {
        "benchmark": "vit_attention",
        "config": {k: v for k, v in vars(args).items() if k not in ("progress",)},
        "model": "vit_cifar",
        "bits": list(bits),
        "modes": {"linear": "Linear/Conv inputs only", "attn": "plus Q, K, V and softmax output"},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "device": str(results[0].get("device", "")) if results else "",
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "threads": torch.get_num_threads()},
        "results": results,
        "markdown": table_md,
    }
    folder = "gpu" if args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available()) else "cpu"
    out = Path(args.out or f"benchmarks/results/vit_attention/{folder}/{time.strftime('%Y-%m-%d')}_vit-cifar-depth"
                           f"{args.depth}_{args.variants.replace(',', '+')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    return payload


if __name__ == "__main__":
    main()
