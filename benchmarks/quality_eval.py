"""The quality benchmark's evaluation side: PTQ of a fitted or saved model under the benchmark's recipes, and the
flatness measures (``benchmarks/quality.py`` is the entry point)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.quality_train import VARIANTS, fit_variant, load_saved, make_datamodule, saved_models
from flatq_lightning.app.data import CIFAR10DataModule
from flatq_lightning.callbacks.flatness import (
    classification_loss,
    hessian_trace,
    loss_landscape_1d,
    top_eigenvalue,
)
from flatq_lightning.ptq.recipe import PTQRecipe
from flatq_lightning.ptq.runner import run_ptq

BITS = ("w8a8", "w4a8", "w4a4", "w3a3", "w2a4")


#: calibration images of the PTQ step (the reference's 1,024)
CALIB_IMAGES = 1024


def calib_batches(size: dict[str, Any]) -> int:
    return max(1, CALIB_IMAGES // size["batch_size"])


#: training batches (of 128) for the clean BN re-estimation and for PTQ's per-bit-width BN re-estimation
BN_BATCHES = 16
#: the PTQ recipes every saved model is evaluated under (``--evaluate``): name -> (the library's recipe, the BN
#: statistics PTQ starts from: "clean" re-estimated on the clean weights, as fit returns them, or "trained")
PTQ_RECIPES: dict[str, tuple[PTQRecipe, str]] = {
    # min-max PTQ as the project always ran it, from the model with clean BN statistics (what fit returns now)
    "minmax": (PTQRecipe.preset("minmax", bn_batches=BN_BATCHES), "clean"),
    # the same, from the BN statistics as training left them (gathered under noise for DNQ)
    "minmax_trainbn": (PTQRecipe.preset("minmax", name="minmax_trainbn", bn_batches=BN_BATCHES), "trained"),
    # min-max + BN re-estimation per bit-width on the quantized network
    "minmax_bnre": (PTQRecipe("minmax_bnre", bn_reestimate=True, bn_batches=BN_BATCHES), "clean"),
    # the practitioner's PTQ: MSE-optimal per-channel weight clipping, percentile activations, BN re-estimation
    "practical": (PTQRecipe.preset("practical", bn_batches=BN_BATCHES), "clean"),
    # practical + block reconstruction (learned rounding and activation step sizes, QDrop), the library defaults
    "reconstruct": (PTQRecipe.preset("reconstruct", bn_batches=BN_BATCHES), "clean"),
    # minmax and practical with the quantizers ONNX Runtime needs for integer kernels (issue 21): residual adds,
    # branch outputs and pooling inputs quantized too
    "minmax_ort": (PTQRecipe.preset("minmax", name="minmax_ort", bn_batches=BN_BATCHES, placement="onnxruntime"),
                   "clean"),
    "practical_ort": (PTQRecipe.preset("practical", name="practical_ort", bn_batches=BN_BATCHES,
                                       placement="onnxruntime"), "clean"),
}


def recipe_for(name: str, args: argparse.Namespace) -> tuple[PTQRecipe, str]:
    """A recipe of ``PTQ_RECIPES`` with the command line's reconstruction overrides (``--recon-iters``)."""
    recipe, bn = PTQ_RECIPES[name]
    if recipe.reconstruction is not None and getattr(args, "recon_iters", None) is not None:
        recipe = recipe.replace(iters=args.recon_iters)
    return recipe, bn

#: bit-widths of the recipe evaluation
EVAL_BITS = ("w4a4", "w3a3")
#: the recipes --evaluate runs by default (minmax_trainbn on request: it only shows where the trained BN stands)
DEFAULT_RECIPES = ("minmax", "minmax_bnre", "practical")


def _augmented(dm: CIFAR10DataModule, seed: int):
    """Seeded training batches through the training augmentation (crop with black padding, flip)."""
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dm.train_dataset, batch_size=dm.batch_size, shuffle=True, generator=g)
    return loader, dm.augment_batch


def evaluate_saved(path: Path, args: argparse.Namespace, size: dict[str, Any], dm: CIFAR10DataModule,
                   recipes: list[str], bits: tuple[str, ...]) -> dict[str, Any]:
    """FP (as trained, clean BN) and every PTQ recipe on one saved model; training is not repeated."""
    from flatq_lightning.ptq.runner import evaluate_topk
    from flatq_lightning.quant import reestimate_bn

    device = "cuda" if size["accelerator"] == "gpu" else "cpu"  # PTQ runs where the model is
    trained = load_saved(path, args.model).to(device)
    clean = load_saved(path, args.model).to(device)
    torch.manual_seed(0)
    loader, augment = _augmented(dm, seed=0)
    reestimate_bn(clean, loader, max_batches=BN_BATCHES, transform=augment)
    test = dm.test_dataloader()
    out: dict[str, Any] = {"fp": {}, "ptq": {}, "seconds": {}}
    for name, net in (("trained_bn", trained), ("clean_bn", clean)):
        t0 = time.perf_counter()
        acc, n, _ = evaluate_topk(net, test, device)
        out["fp"][name] = acc[1]
        out["seconds"][f"fp_{name}"] = time.perf_counter() - t0
    out["num_test"] = n
    out["reconstruction"] = {}
    for r in recipes:
        recipe, bn = recipe_for(r, args)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        bn_loader, augment = _augmented(dm, seed=1)
        report = run_ptq(
            clean if bn == "clean" else trained, dm.calib_dataloader(size["batch_size"]), test, bits=bits,
            calib_batches=calib_batches(size), recipe=recipe, bn_loader=bn_loader, bn_transform=augment,
            progress=args.progress, evaluate_fp=False,
        )
        out["ptq"][r] = {row.bits: row.top1 for row in report.rows}
        out["seconds"][r] = time.perf_counter() - t0
        if recipe.reconstruction is not None:  # per bit-width: seconds and the blocks' output MSE before/after
            out["reconstruction"][r] = {row.bits: [{k: b[k] for k in ("name", "seconds", "loss_rtn", "loss", "flipped", "weights")}
                                                   for b in row.reconstruction] for row in report.rows}
    return out


def evaluate_all(args: argparse.Namespace, size: dict[str, Any], out: Path) -> None:
    """``--evaluate``: every ``<out>/<variant>/seed<k>.pt`` under every recipe; results in ``seed<k>.json``."""
    import subprocess

    dm = make_datamodule(args.data, size)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in PTQ_RECIPES]
    if unknown:
        raise SystemExit(f"unknown PTQ recipe(s) {unknown}; choose from {list(PTQ_RECIPES)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    wanted = set(args.variants.split(",")) if args.variants != ",".join(VARIANTS) else None
    for pt in sorted(out.glob("*/seed*.pt")):
        variant, seed = pt.parent.name, int(pt.stem.removeprefix("seed"))
        if (wanted and variant not in wanted) or (args.seeds and seed not in [int(s) for s in args.seeds.split(",")]):
            continue
        rec_path = pt.with_suffix(".json")
        record = json.loads(rec_path.read_text()) if rec_path.exists() else {}
        train_path = pt.parent / f"seed{seed}.train.json"
        if "train" not in record and train_path.exists():
            record["train"] = json.loads(train_path.read_text())
        have = record.get("evaluation", {}).get("ptq", {})
        todo = [r for r in recipes if args.fresh or r not in have or any(b not in have[r] for b in args.eval_bits)]
        if not todo and "fp" in record.get("evaluation", {}):
            continue
        t0 = time.time()
        ev = evaluate_saved(pt, args, size, dm, todo, args.eval_bits)
        old = record.get("evaluation", {})
        ev["ptq"] = {**old.get("ptq", {}), **ev["ptq"]}
        ev["seconds"] = {**old.get("seconds", {}), **ev["seconds"]}
        ev["reconstruction"] = {**old.get("reconstruction", {}), **ev["reconstruction"]}
        record.update(variant=variant, seed=seed, evaluation={
            **ev, "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit, "command": "python " + " ".join(sys.argv),
            "settings": {"calib_images": CALIB_IMAGES, "bn_batches": BN_BATCHES, "recipes": {
                **old.get("settings", {}).get("recipes", {}),
                **{r: {**recipe_for(r, args)[0].to_dict(), "bn": recipe_for(r, args)[1]} for r in todo}}},
        })
        tmp = rec_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(rec_path)
        if train_path.exists():
            train_path.unlink()  # folded into seed<k>.json
        print(f"[{variant} seed {seed}] {time.time() - t0:.0f}s FP {ev['fp']['trained_bn']:.2f} -> clean BN "
              f"{ev['fp']['clean_bn']:.2f}  " + "  ".join(f"{r}: " + "/".join(f"{v:.2f}" for v in ev['ptq'][r].values())
                                                         for r in ev["ptq"]), flush=True)


def measure_flatness(net: torch.nn.Module, probe: list[Any], n_probes: int) -> dict[str, Any]:
    return {
        "hessian_trace": hessian_trace(net, classification_loss, probe, n_probes=n_probes, seed=0),
        "top_eig": top_eigenvalue(net, classification_loss, probe, iters=8, seed=0),
        "batches": len(probe),
        "probes": n_probes,
    }


def run_variant(name: str, seed: int, args: argparse.Namespace, size: dict[str, Any]) -> dict[str, Any]:
    module, trainer, timer, dm, _, overrides = fit_variant(name, seed, args, size)
    peak = torch.cuda.max_memory_allocated() / 2**20 if size["accelerator"] == "gpu" else None
    net = module.model.eval()
    report = run_ptq(
        net, dm.train_dataloader(), dm.test_dataloader(), bits=args.bits, calib_batches=calib_batches(size),
        progress=args.progress,
    )
    device = next(net.parameters()).device
    models = Path(args.out) / "models"
    models.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, models / f"{name}_seed{seed}.pt")  # see load_saved
    probe = [b for _, b in zip(range(args.flat_batches), dm.train_dataloader())]
    flat = measure_flatness(net, probe, n_probes=4)
    alphas, losses = loss_landscape_1d(net, classification_loss, probe[:1], steps=21, span=1.0, seed=0)
    return {
        "variant": name,
        "seed": seed,
        "train_s": timer.seconds,
        "train_cpu_s": timer.cpu_seconds,
        "steps": trainer.global_step,
        "peak_mem_mb": peak,
        "fp_top1": report.fp_top1,
        "ptq": {r.bits: r.top1 for r in report.rows},
        "flatness": flat,
        "landscape": {"alphas": [float(a) for a in alphas], "losses": [float(v) for v in losses]},
        "device": str(device),
        "overrides": overrides,
    }


def remeasure(args: argparse.Namespace, size: dict[str, Any], doc: dict[str, Any], out: Path) -> None:
    """Flatness again on the saved models, with more batches and probes: ``doc["flatness_remeasured"]``."""
    dm = make_datamodule(args.data, size)
    pl.seed_everything(0)
    probe = [b for _, b in zip(range(args.flat_batches), dm.train_dataloader())]
    rows = doc.setdefault("flatness_remeasured", [])
    for path in saved_models(out):
        variant, seed = path.stem.rsplit("_seed", 1)
        net = load_saved(path, args.model)
        flat = measure_flatness(net, probe, n_probes=args.flat_probes)
        rows[:] = [r for r in rows if (r["variant"], r["seed"]) != (variant, int(seed))]
        rows.append({"variant": variant, "seed": int(seed), **flat, "date": time.strftime("%Y-%m-%d")})
        print(f"[{variant} seed {seed}] trace {flat['hessian_trace']:.1f}  eig {flat['top_eig']:.2f}  "
              f"({flat['batches']} batches, {flat['probes']} probes)", flush=True)
        (out / "quality.json").write_text(json.dumps(doc, indent=1))
