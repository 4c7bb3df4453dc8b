"""Quality benchmark: does pre-conditioning make plain PTQ work at low bits, and what does it cost?

Trains the same network on the same data and budget as each variant, then runs the project's PTQ
(BN folded, per-channel min-max weights, per-tensor min-max activations, first/last layer at 8 bit) at
W8A8, W4A8, W4A4, W3A3 and W2A4 on the test set, and measures flatness (Hessian trace, top eigenvalue,
a 1-D filter-normalised loss slice) on clean weights.

Each variant is an experiment of the app (``conf/experiment/<name>.yaml``, what ``flatq-train experiment=<name>``
runs) with Hydra overrides (``VARIANTS``), under the benchmark's own training schedule (``recipe_overrides``:
CIFAR ResNet-20, one-cycle to lr 0.2, the size's epochs and data subset, no validation or checkpoints):

    plain            cifar10_resnet20_plain: SGD, no callbacks
    sam              cifar10_resnet20_sam: SAM (rho 0.05) around the same SGD
    dnq_w            cifar10_resnet20_dnq callbacks.dnq.act_noise=false: recorder + differential weight noise
    dnq_wa           cifar10_resnet20_dnq: + activation noise (p = 0.5)
    dnq_wa_mse       + the FP-vs-quantized MSE term (module.mse_weight)
    dnq_wa_addrem    weight noise in add_remove mode instead of differential
    dnq_uniform      DiffQ-style uniform pseudo-quantization weight noise (weights only)
    dnq_wa_trap      dnq_wa with the noise ramped in over the first 20% of the steps and cooled down over the last 20%
    dnq_wa_late      cifar10_resnet20_dnq_w3a3: dnq_wa with no noise in the first half of the steps
    dnq_wa_late_k05  dnq_wa_late at half the noise scale (κ = 0.5 for weights and activations)

A DNQ variant takes its noise statistics from the W4A4 quantizer (``quant=w4a4``) unless a target follows an
``@``: ``dnq_wa@w3a3`` trains with the statistics of the W3A3 quantizer it will meet (``quant=w3a3``; what a user
sweeping bit-widths does: one run per target), so ``dnq_wa_late@w3a3`` is the ``cifar10_resnet20_dnq_w3a3``
experiment as it is. ``--show-config VARIANT`` prints a variant's experiment, overrides and composed config.

Sizes: ``--size cpu`` (CIFAR ResNet-20 on a 10,000-image subset, 10 epochs, batch 128, float32, one seed) and
``--size gpu`` (full CIFAR-10, 30 epochs, batch 256, bf16, 3 seeds). Each finished variant is appended to
``<out>/quality.json`` at once, and a rerun skips what is there (``--fresh`` to start over); the Markdown table
(mean ± std over seeds) and the plots are rebuilt from the JSON.

    python benchmarks/quality.py --size cpu --data ../shared/data/cifar10-jpeg.zip
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import Timer  # noqa: E402
from flatq_lightning.app.data import CIFAR10DataModule  # noqa: E402
from flatq_lightning.app.models import create_model  # noqa: E402
from flatq_lightning.app.train import (  # noqa: E402
    CONF_DIR,
    group_options,
    instantiate_callbacks,
    model_kwargs,
    validate_config,
    wire_quant_stats,
)
from flatq_lightning.callbacks.flatness.measures import (  # noqa: E402
    classification_loss,
    hessian_trace,
    loss_landscape_1d,
    plot_landscape_1d,
    top_eigenvalue,
)
from flatq_lightning.ptq.recipe import PTQRecipe  # noqa: E402
from flatq_lightning.ptq.runner import run_ptq  # noqa: E402
from flatq_lightning.quant.spec import parse_bits  # noqa: E402

BITS = ("w8a8", "w4a8", "w4a4", "w3a3", "w2a4")
#: λ of the MSE variant (λ = 1 destabilised DNQ training on the digits quickstart; --mse-weight sets it)
MSE_WEIGHT = 0.1
#: the noise scale of dnq_wa_trap: 0 -> 1 over the first 20 % of the steps, 1 -> 0 over the last 20 %
TRAPEZOID = "{_target_:flatq_lightning.callbacks.schedules.trapezoid,total_steps:TOTAL_STEPS,up:0.2,down:0.2}"
#: each variant: (the experiment it runs, its overrides of that experiment). RHO, MSE_WEIGHT and TOTAL_STEPS are
#: filled in from --rho, --mse-weight and the fit's optimizer steps; the target quantizer (``@``) is ``quant=``.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "plain": ("cifar10_resnet20_plain", ()),
    "dnq_wa": ("cifar10_resnet20_dnq", ()),
    "sam": ("cifar10_resnet20_sam", ("module.sam_rho=RHO",)),
    "dnq_w": ("cifar10_resnet20_dnq", ("callbacks.dnq.act_noise=false",)),
    "dnq_wa_trap": ("cifar10_resnet20_dnq", (f"callbacks.dnq.noise_scale={TRAPEZOID}",
                                             f"callbacks.dnq.act_noise_scale={TRAPEZOID}")),
    "dnq_wa_mse": ("cifar10_resnet20_dnq", ("module.mse_weight=MSE_WEIGHT",)),
    "dnq_uniform": ("cifar10_resnet20_dnq", ("callbacks.dnq.mode=uniform", "callbacks.dnq.act_noise=false")),
    "dnq_wa_addrem": ("cifar10_resnet20_dnq", ("callbacks.dnq.mode=add_remove",)),
    "dnq_wa_late": ("cifar10_resnet20_dnq_w3a3", ()),
    "dnq_wa_late_k05": ("cifar10_resnet20_dnq_w3a3", ("callbacks.dnq.noise_scale=0.5", "callbacks.dnq.act_noise_scale=0.5")),
}
#: the target quantizer of a variant without ``@<bits>``
DEFAULT_TARGET = "w4a4"
SIZES: dict[str, dict[str, Any]] = {
    "cpu": {"train_subset": 10_000, "epochs": 10, "batch_size": 128, "precision": "32-true", "seeds": [0], "accelerator": "cpu"},
    "gpu": {"train_subset": None, "epochs": 30, "batch_size": 256, "precision": "bf16-mixed", "seeds": [0, 1, 2], "accelerator": "gpu"},
}


#: calibration images of the PTQ step (the reference's 1,024)
CALIB_IMAGES = 1024


def _hydra(value: Any) -> str:
    """A value as a Hydra override writes it (``null``, ``true``, numbers as Python prints them: exact floats)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def data_overrides(size: dict[str, Any]) -> list[str]:
    """The size's data: the seeded training subset is the same for every variant and seed (``data.seed=0``)."""
    return [f"data.batch_size={size['batch_size']}", f"data.train_subset={_hydra(size['train_subset'])}",
            f"data.test_subset={_hydra(size.get('test_subset'))}", "data.num_workers=0", "data.seed=0"]


def recipe_overrides(args: argparse.Namespace, size: dict[str, Any]) -> list[str]:
    """The benchmark's training schedule, the same for every variant, as overrides of the experiments: the size's
    trainer, epochs and data, one-cycle to ``--lr`` with 15 % warm-up, no validation, logger or checkpoints."""
    trainer = ["trainer=gpu", "trainer.benchmark=null"] if size["accelerator"] == "gpu" else ["trainer=cpu"]
    return [
        *trainer, f"trainer.precision={size['precision']}", f"trainer.max_epochs={size['epochs']}",
        f"trainer.enable_progress_bar={_hydra(args.progress)}", "++trainer.logger=false",
        "++trainer.enable_checkpointing=false", "++trainer.limit_val_batches=0", "~callbacks.checkpoint",
        f"model.name={args.model}", *data_overrides(size),
        f"module.lr={args.lr}", "module.scheduler=onecycle", "module.warmup_fraction=0.15",
    ]


def variant_overrides(name: str, args: argparse.Namespace, total_steps: int | None = None) -> tuple[str, list[str]]:
    """``(experiment, overrides)`` of a variant (``dnq_wa``, ``dnq_wa_late@w3a3``, …), without the recipe's."""
    base, _, target = name.partition("@")
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)} (and <variant>@<bits>)")
    experiment, overrides = VARIANTS[base]
    target = target or DEFAULT_TARGET
    if target in group_options("quant"):
        quant = [f"quant={target}"]
    else:  # any other preset (e.g. w4a3): the quantizer's bits on the method's specs
        wb, ab = parse_bits(target)  # a clear error for a bad target before any training
        quant = [f"quant.preset={target}", f"quant.weight.bits={wb}", f"quant.act.bits={ab}"]
    fill = {"RHO": str(args.rho), "MSE_WEIGHT": str(args.mse_weight)}
    if total_steps is not None:  # known once the data is loaded (--show-config leaves the name)
        fill["TOTAL_STEPS"] = str(int(total_steps))
    out = []
    for o in overrides:
        for key, value in fill.items():
            o = o.replace(key, value)
        out.append(o)
    return experiment, [*quant, *out]


def compose_config(overrides: list[str]) -> Any:
    """The app's config (``conf/train.yaml``) composed with these overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def variant_config(name: str, seed: int, args: argparse.Namespace, size: dict[str, Any],
                   total_steps: int | None = None) -> tuple[Any, list[str]]:
    """The composed, validated config one fit of a variant runs, and its command-line overrides."""
    experiment, overrides = variant_overrides(name, args, total_steps)
    overrides = [f"experiment={experiment}", f"seed={seed}", *recipe_overrides(args, size), *overrides]
    cfg = compose_config(overrides)
    validate_config(cfg)
    return cfg, overrides


def make_datamodule(data: str, size: dict[str, Any]) -> CIFAR10DataModule:
    """The CIFAR-10 data of a size (the experiments' ``data`` node with ``data_overrides``): its seeded training
    subset (the same for every variant), set up for fit."""
    import hydra

    cfg = compose_config(["experiment=cifar10_resnet20_plain", *data_overrides(size)])
    dm = hydra.utils.instantiate(cfg.data, _convert_="all", path=data)
    dm.setup("fit")
    return dm


def calib_batches(size: dict[str, Any]) -> int:
    return max(1, CALIB_IMAGES // size["batch_size"])


def saved_models(out: Path) -> list[Path]:
    """The models ``run_variant`` saved under ``<out>/models`` (``<variant>_seed<seed>.pt``)."""
    return sorted((Path(out) / "models").glob("*_seed*.pt"))


def load_saved(path: Path, model: str) -> torch.nn.Module:
    net = create_model(model, num_classes=10)
    net.load_state_dict(torch.load(path, map_location="cpu"))
    return net.eval()


class StopOnDivergence(pl.Callback):
    """Stop the run with a clear message when the training loss is NaN or inf (checked every ``every`` steps,
    one host sync each time), instead of training on and failing at PTQ."""

    def __init__(self, label: str, every: int = 16) -> None:
        self.label, self.every = label, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if trainer.global_step % self.every == 0 and loss is not None and not bool(torch.isfinite(loss)):
            raise RuntimeError(
                f"{self.label}: the training loss is {float(loss)} at step {trainer.global_step}: the run diverged "
                "(lower --lr, or check the variant's noise settings); nothing was saved for it"
            )


def fit_variant(name: str, seed: int, args: argparse.Namespace, size: dict[str, Any]):
    """Seed, build (from the variant's composed config: the app's nodes) and fit one variant:
    ``(module, trainer, timer, datamodule, callbacks, overrides)``."""
    import hydra

    pl.seed_everything(seed, workers=True)
    dm = make_datamodule(args.data, size)
    steps = size["epochs"] * math.ceil(len(dm.train_dataset) / size["batch_size"])
    cfg, overrides = variant_config(name, seed, args, size, total_steps=steps)
    cbs = instantiate_callbacks(cfg.callbacks)
    module = hydra.utils.instantiate(cfg.module, _convert_="all", num_classes=dm.num_classes,
                                     model_kwargs=model_kwargs(cfg, dm))
    wire_quant_stats(module, cbs)  # the MSE term (dnq_wa_mse) on the DNQ's statistics, as flatq-train does
    timer = Timer()
    trainer = hydra.utils.instantiate(cfg.trainer, _convert_="all",
                                      callbacks=[*cbs, timer, StopOnDivergence(f"{name} seed {seed}")])
    if size["accelerator"] == "gpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=dm)
    return module, trainer, timer, dm, cbs, overrides


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


def run_dir(out: Path, name: str) -> Path:
    """The folder of one variant's runs: ``<out>/<variant>/`` (``seed<k>.pt``, ``seed<k>.json``)."""
    return Path(out) / name


def train_and_save(name: str, seed: int, args: argparse.Namespace, size: dict[str, Any]) -> Path:
    """Train one variant on one seed and save its weights and training record; no PTQ (see ``--evaluate``).

    Writes ``<out>/<variant>/seed<k>.pt`` (the state dict with the BatchNorm statistics training left: for DNQ
    those gathered under noise, put back from ``noisy_bn_state``; ``--evaluate`` re-estimates the clean ones as
    the end of fit does) and ``seed<k>.train.json`` with the training time and settings.
    """
    from flatq_lightning.quant import load_bn_state

    module, trainer, timer, _, cbs, overrides = fit_variant(name, seed, args, size)
    for part in (p for cb in cbs for p in getattr(cb, "parts", (cb,))):  # the DNQ's weight noise keeps them
        if getattr(part, "noisy_bn_state", None):
            load_bn_state(module, part.noisy_bn_state)
    d = run_dir(args.out, name)
    d.mkdir(parents=True, exist_ok=True)
    net = module.model.eval()
    tmp = d / f".seed{seed}.pt.tmp"
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    tmp.replace(d / f"seed{seed}.pt")
    record = {
        "variant": name, "seed": seed, "train_s": timer.seconds, "train_cpu_s": timer.cpu_seconds,
        "steps": trainer.global_step, "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python " + " ".join(sys.argv),
        "settings": {**size, "model": args.model, "lr": args.lr, "rho": args.rho}, "overrides": overrides,
        "machine": f"CPU {platform.machine()}, {torch.get_num_threads()} threads" if size["accelerator"] == "cpu" else torch.cuda.get_device_name(),
    }
    tmpj = d / f".seed{seed}.train.json.tmp"
    tmpj.write_text(json.dumps(record, indent=1))
    tmpj.replace(d / f"seed{seed}.train.json")
    return d / f"seed{seed}.pt"


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


#: two-sided 95 % Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def mean_ci95(vals: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student t; 0 for one value)."""
    m = statistics.mean(vals)
    if len(vals) < 2:
        return m, float("nan")
    df = len(vals) - 1
    t = _T95.get(df) or _T95[max(k for k in _T95 if k <= df)]
    return m, t * statistics.stdev(vals) / math.sqrt(len(vals))


def summarize_runs(out: Path, baseline: str = "plain") -> tuple[str, dict[str, Any]]:
    """The generated summary of ``<out>/<variant>/seed<k>.json``: per variant and recipe, mean ± std, and the
    paired difference to ``baseline`` of the same seed as mean ± 95 % CI with the per-seed values."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for f in sorted(out.glob("*/seed*.json")):
        r = json.loads(f.read_text())
        if "evaluation" in r:
            runs.setdefault(r["variant"], {})[r["seed"]] = r

    def cells(r: dict[str, Any]) -> dict[str, float]:
        ev = r["evaluation"]
        c = {"FP (as trained)": ev["fp"]["trained_bn"], "FP (clean BN)": ev["fp"]["clean_bn"]}
        for rec, bits in ev["ptq"].items():
            for b, v in bits.items():
                c[f"{b.upper()} {rec}"] = v
        return c

    columns: list[str] = []
    for rs in runs.values():
        for r in rs.values():
            for k in cells(r):
                if k not in columns:
                    columns.append(k)
    doc: dict[str, Any] = {"absolute": {}, "paired": {}}
    lines = ["## Top-1 (%), mean ± std over seeds", "", "| training | seeds | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for v, rs in runs.items():
        vals = {c: [cells(r)[c] for r in rs.values() if c in cells(r)] for c in columns}
        doc["absolute"][v] = {c: {"mean": statistics.mean(x), "std": statistics.stdev(x) if len(x) > 1 else None,
                                  "n": len(x)} for c, x in vals.items() if x}
        lines.append(f"| {v} | {','.join(map(str, sorted(rs)))} | " + " | ".join(
            (f"{statistics.mean(x):.2f} ± {statistics.stdev(x):.2f}" if len(x) > 1 else f"{x[0]:.2f}") if x else "—"
            for x in vals.values()) + " |")
    base = runs.get(baseline, {})
    lines += ["", f"## Paired difference to `{baseline}` (same seed, data and budget): mean ± 95 % CI [per-seed values]", "",
              "| training | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for v, rs in runs.items():
        if v == baseline:
            continue
        row, drow = [], {}
        for c in columns:
            seeds = sorted(s for s in rs if s in base and c in cells(rs[s]) and c in cells(base[s]))
            d = [cells(rs[s])[c] - cells(base[s])[c] for s in seeds]
            if not d:
                row.append("—")
                continue
            m, h = mean_ci95(d)
            drow[c] = {"mean": m, "ci95": h, "per_seed": dict(zip(seeds, d))}
            row.append(f"{m:+.2f} ± {h:.2f} [{', '.join(f'{x:+.1f}' for x in d)}]" if len(d) > 1 else f"{m:+.2f} [1 seed]")
        doc["paired"][v] = drow
        lines.append(f"| {v} | " + " | ".join(row) + " |")
    lines += _seconds_table(runs, doc)
    return "\n".join(lines) + "\n", doc


def _seconds_table(runs: dict[str, dict[int, dict[str, Any]]], doc: dict[str, Any]) -> list[str]:
    """Seconds per model of each recipe (all its bit-widths: BN re-estimation, calibration, reconstruction and the
    test-set evaluations) and, for reconstruction, the seconds of reconstruction alone per bit-width."""
    secs: dict[str, list[float]] = {}
    recon: dict[str, list[float]] = {}
    for rs in runs.values():
        for r in rs.values():
            ev = r["evaluation"]
            for rec in ev["ptq"]:
                if rec in ev.get("seconds", {}):
                    secs.setdefault(rec, []).append(ev["seconds"][rec])
            for rec, per_bits in ev.get("reconstruction", {}).items():
                for b, blocks in per_bits.items():
                    recon.setdefault(f"{rec} {b.upper()}", []).append(sum(x["seconds"] for x in blocks))
    doc["seconds"] = {k: statistics.median(v) for k, v in secs.items()}
    doc["reconstruction_seconds"] = {k: statistics.median(v) for k, v in recon.items()}
    out = ["", "## Seconds per model (median over the runs; one intra-op thread, see the command for the load)", "",
           "| recipe | runs | seconds (all its bit-widths, with the test-set evaluations) |", "|---|---:|---:|"]
    out += [f"| {k} | {len(v)} | {statistics.median(v):.0f} |" for k, v in secs.items()]
    if recon:
        out += ["", "| reconstruction alone | runs | seconds |", "|---|---:|---:|"]
        out += [f"| {k} | {len(v)} | {statistics.median(v):.0f} |" for k, v in recon.items()]
    return out


def plot_paired(doc: dict[str, Any], path: Path) -> None:
    """Paired differences to plain with 95 % CI bars, one group per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(doc["paired"])
    if not variants:
        return
    cols = [c for c in next(iter(doc["paired"].values()))]
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(cols)), 4.2))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(cols))]
        ms = [doc["paired"][v].get(c, {}).get("mean", float("nan")) for c in cols]
        hs = [doc["paired"][v].get(c, {}).get("ci95", 0.0) for c in cols]
        ax.bar(xs, ms, width, yerr=hs, capsize=3, label=v)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("top-1 minus plain, same seed (points)")
    ax.set_title("Paired difference to plain training (mean ± 95 % CI over seeds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(out: Path) -> str:
    text, doc = summarize_runs(out)
    header = (f"# Quality benchmark summary: `{out}`\n\nGenerated by `python benchmarks/quality.py --summarize "
              f"--out {out}` on {time.strftime('%Y-%m-%d %H:%M')} from the per-run files `<variant>/seed<k>.json` "
              "beside it (each holds its training record, commit, command and machine).\n\n")
    for name, body in (("summary.md", header + text), ("summary.json", json.dumps(doc, indent=1))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(body)
        tmp.replace(out / name)
    plot_paired(doc, out / "paired_difference.png")
    return text


def measure_flatness(net: torch.nn.Module, probe: list[Any], n_probes: int) -> dict[str, Any]:
    return {
        "hessian_trace": hessian_trace(net, classification_loss, probe, n_probes=n_probes, seed=0),
        "top_eig": top_eigenvalue(net, classification_loss, probe, iters=8, seed=0),
        "batches": len(probe),
        "probes": n_probes,
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


def summarize(results: list[dict[str, Any]], bits: tuple[str, ...]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    plain_t = statistics.mean(r["train_s"] for r in by.get("plain", [])) if "plain" in by else None

    def ms(vals: list[float]) -> str:
        if len(vals) == 1:
            return f"{vals[0]:.2f}"
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"

    head = "| training | seeds | train s | vs plain | FP | " + " | ".join(b.upper() for b in bits) + " | Hessian trace | top eig |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in [v for v in VARIANTS if v in by] + [v for v in by if v not in VARIANTS]:
        rs = by[v]
        t = statistics.mean(r["train_s"] for r in rs)
        ratio = f"{t / plain_t:.2f}x" if plain_t else "-"
        cells = [ms([r["ptq"].get(b, float("nan")) for r in rs]) for b in bits]
        lines.append(
            f"| {v} | {len(rs)} | {t:.0f} | {ratio} | {ms([r['fp_top1'] for r in rs])} | " + " | ".join(cells)
            + f" | {ms([r['flatness']['hessian_trace'] for r in rs])} | {ms([r['flatness']['top_eig'] for r in rs])} |"
        )
    return "\n".join(lines)


def plots(results: list[dict[str, Any]], bits: tuple[str, ...], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    # the methods run on several seeds (mean ± std as error bars); all of them when none has several
    multi = {v: rs for v, rs in by.items() if len(rs) > 1} or by
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(len(bits) + 1))
    colors = plt.get_cmap("tab20").colors
    for i, (v, rs) in enumerate(multi.items()):
        cols = [[r["fp_top1"] for r in rs]] + [[r["ptq"][b] for r in rs] for b in bits]
        ys = [statistics.mean(c) for c in cols]
        err = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors[i % len(colors)], label=f"{v} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
    ax.set_xticks(xs, ["FP", *[b.upper() for b in bits]])
    ax.set_ylabel("top-1 (%)")
    ax.set_title("PTQ accuracy per training method (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_accuracy_vs_bits.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    names = list(by)
    for ax, key in zip(axes, ("hessian_trace", "top_eig")):
        ax.bar(range(len(names)), [statistics.mean(r["flatness"][key] for r in by[n]) for n in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(key.replace("_", " "))
    fig.tight_layout()
    fig.savefig(out / "quality_sharpness.png", dpi=120)
    plt.close(fig)

    slices = {v: (rs[0]["landscape"]["alphas"], rs[0]["landscape"]["losses"]) for v, rs in by.items() if v in ("plain", "sam", "dnq_wa", "dnq_wa_trap")}
    if slices:
        plot_landscape_1d(slices, out / "quality_landscape_1d.png", title="1-D loss slice (filter-normalised direction)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="cpu")
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default=None, help="comma list (default per size)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=None, help="evaluate on a seeded subset of the test set")
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--mse-weight", type=float, default=MSE_WEIGHT, help="λ of the dnq_wa_mse variant")
    ap.add_argument("--bits", default=",".join(BITS))
    ap.add_argument("--out", default="benchmarks/results/quality/cpu")
    ap.add_argument("--flat-batches", type=int, default=1, help="training batches for the Hessian measures")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--merge", action="append", default=[], help="another run's out dir whose results to merge in")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table and plots from the JSON, train nothing")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--train-only", action="store_true",
                    help="train and save <out>/<variant>/seed<k>.pt and .train.json; no PTQ")
    ap.add_argument("--evaluate", action="store_true",
                    help="train nothing: evaluate every saved <out>/<variant>/seed<k>.pt under --recipes "
                         "(results in seed<k>.json), then write the summary")
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                    help=f"PTQ recipes for --evaluate, from {list(PTQ_RECIPES)}")
    ap.add_argument("--eval-bits", default=",".join(EVAL_BITS), help="bit-widths for --evaluate")
    ap.add_argument("--recon-iters", type=int, default=None,
                    help="steps per block of the reconstruct recipe (default: the library's Reconstruction.iters)")
    ap.add_argument("--summarize", action="store_true", help="only rebuild <out>/summary.{md,json} and the plot")
    ap.add_argument("--remeasure-flatness", action="store_true",
                    help="train nothing: measure Hessian trace and top eigenvalue again on <out>/models/*.pt "
                         "with --flat-batches and --flat-probes")
    ap.add_argument("--flat-probes", type=int, default=16, help="Hutchinson probes for --remeasure-flatness")
    ap.add_argument("--show-config", metavar="VARIANT", default=None,
                    help="print the variant's experiment, overrides and composed config (under the size), train nothing")
    args = ap.parse_args()
    args.bits = tuple(args.bits.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    size = dict(SIZES[args.size])
    if args.epochs:
        size["epochs"] = args.epochs
    if args.train_subset:
        size["train_subset"] = args.train_subset
    if args.test_subset:
        size["test_subset"] = args.test_subset
    if args.seeds:
        size["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.show_config:
        from omegaconf import OmegaConf

        seed = size["seeds"][0]
        cfg, overrides = variant_config(args.show_config, seed, args, size)
        import shlex

        print(f"# {args.show_config}, seed {seed}: flatq-train \\\n#   " + " \\\n#   ".join(map(shlex.quote, overrides)))
        print(f"# data.path: {args.data}; TOTAL_STEPS: the fit's optimizer steps\n")
        print(OmegaConf.to_yaml(cfg))
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.eval_bits = tuple(args.eval_bits.split(","))
    if args.evaluate or args.summarize:
        if args.evaluate:
            evaluate_all(args, size, out)
        print(write_summary(out))
        return
    if args.train_only:
        for seed in size["seeds"]:
            for v in args.variants.split(","):
                if (run_dir(out, v) / f"seed{seed}.pt").exists() and not args.fresh:
                    continue
                t0 = time.time()
                path = train_and_save(v, seed, args, size)
                print(f"[{v} seed {seed}] trained in {time.time() - t0:.0f}s -> {path}", flush=True)
        return
    store = out / "quality.json"
    doc: dict[str, Any] = json.loads(store.read_text()) if store.exists() and not args.fresh else {}
    doc.setdefault("results", [])
    if not args.report_only:
        doc.update(
        {
            "command": "python " + " ".join(sys.argv),
            "size": args.size,
            "settings": {**size, "model": args.model, "lr": args.lr, "rho": args.rho, "bits": list(args.bits)},
            "machine": torch.cuda.get_device_name() if size["accelerator"] == "gpu" else f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
        }
        )
    for other in args.merge:
        have = {(r["variant"], r["seed"]) for r in doc["results"]}
        extra = json.loads((Path(other) / "quality.json").read_text())["results"]
        doc["results"].extend(r for r in extra if (r["variant"], r["seed"]) not in have)
        store.write_text(json.dumps(doc, indent=1))
    if args.remeasure_flatness:
        remeasure(args, size, doc, out)
        return
    done = {(r["variant"], r["seed"]) for r in doc["results"]}
    for seed in [] if args.report_only else size["seeds"]:
        for v in args.variants.split(","):
            if (v, seed) in done:
                continue
            t0 = time.time()
            r = run_variant(v, seed, args, size)
            r["date"] = time.strftime("%Y-%m-%d")
            doc["results"].append(r)
            store.write_text(json.dumps(doc, indent=1))
            print(
                f"[{v} seed {seed}] {time.time() - t0:.0f}s  train {r['train_s']:.0f}s  FP {r['fp_top1']:.2f}  "
                + "  ".join(f"{b} {r['ptq'][b]:.2f}" for b in args.bits)
                + f"  trace {r['flatness']['hessian_trace']:.1f}  eig {r['flatness']['top_eig']:.2f}",
                flush=True,
            )
    table = summarize(doc["results"], args.bits)
    remeasured = ""
    if doc.get("flatness_remeasured"):
        remeasured = "\n\nFlatness measured again on the saved models (`--remeasure-flatness`):\n\n" + "\n".join(
            ["| training | seed | Hessian trace | top eig | batches | probes | date |", "|---|---|---|---|---|---|---|"]
            + [f"| {r['variant']} | {r['seed']} | {r['hessian_trace']:.1f} | {r['top_eig']:.1f} | {r['batches']} | "
               f"{r['probes']} | {r['date']} |" for r in sorted(doc["flatness_remeasured"], key=lambda r: (r["variant"], r["seed"]))]
        )
    (out / "quality.md").write_text(
        f"Command: `{doc['command']}`\n\nMachine: {doc['machine']}; date {time.strftime('%Y-%m-%d')}\n\n{table}{remeasured}\n"
    )
    plots(doc["results"], args.bits, out)
    print(table)


if __name__ == "__main__":
    main()
