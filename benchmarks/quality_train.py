"""The quality benchmark's training side: each variant as an app experiment with overrides, the benchmark's
training schedule, one fit, and the models it saves (``benchmarks/quality.py`` is the entry point)."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks._common import Timer
from flatq_lightning.app.data import CIFAR10DataModule
from flatq_lightning.app.models import create_model
from flatq_lightning.app.train import (
    CONF_DIR,
    group_options,
    instantiate_callbacks,
    model_kwargs,
    validate_config,
    wire_quant_stats,
)
from flatq_lightning.quant.targets import QuantTarget

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
        t = QuantTarget.preset(target)  # a clear error for a bad target before any training
        wb, ab = (spec.bits if spec is not None else 16 for spec in (t.weight, t.act))
        quant = [f"quant.weight.bits={wb}", f"quant.act.bits={ab}"]
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
