"""The composed ``flatq-train`` config: where the Hydra configs are, the checks that fail a bad override with one
line before anything is built, the PTQ recipe a config names, and the variants of a job."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ..ptq.callback import plain_recipe
from ..ptq.recipe import resolve_recipe
from ..quant.targets import QuantTarget
from .models import LOCAL_MODELS, is_model

__all__ = ["CONF_DIR", "ConfigError", "group_options", "ptq_recipe", "quant_target", "validate_config"]


def _conf_dir() -> Path:
    """``$FLATQ_CONF_DIR``, else the ``conf/`` folder beside the package (repository root)."""
    env = os.environ.get("FLATQ_CONF_DIR")
    if env:
        return Path(env).expanduser().resolve()
    package = Path(__file__).resolve().parent.parent
    for cand in (package.parent / "conf", package / "conf"):  # a checkout / editable install, then a wheel
        if (cand / "train.yaml").is_file():
            return cand
    return package.parent / "conf"


#: the Hydra config directory used by :func:`main`
CONF_DIR: Path = _conf_dir()


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the allowed choices."""


def group_options(group: str) -> list[str]:
    """The options of a config group (``"model"`` → ``['cifar_resnet20', …]``)."""
    d = CONF_DIR / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


#: Trainer options that must be whole numbers (None allowed), and those that may be any number
_TRAINER_INTS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "log_every_n_steps", "num_sanity_val_steps",
                 "accumulate_grad_batches", "check_val_every_n_epoch", "num_nodes")


_TRAINER_NUMBERS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "val_check_interval",
                    "gradient_clip_val", "overfit_batches")


def _check_trainer_numbers(trainer: Any) -> None:
    """``trainer.max_epochs=abc`` and the like fail here, before any data or model is built."""
    if not isinstance(trainer, DictConfig):
        return
    for key in (*_TRAINER_INTS, *_TRAINER_NUMBERS):
        v = trainer.get(key)
        if v is None:
            continue
        ok = isinstance(v, int) if key in _TRAINER_INTS else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok:
            kind = "an integer" if key in _TRAINER_INTS else "a number"
            raise ConfigError(f"trainer.{key} must be {kind} (or null), got {v!r}")


def _accelerator_names() -> list[str]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})


def _check_trainer_values(trainer: Any) -> None:
    """The training length and the accelerator, before any data or model is built.

    flatq-train quantizes after the fit ends, so the fit must end: ``max_epochs=-1`` (Lightning's endless
    training) needs ``max_steps``, and ``max_steps`` is -1 (no step limit) or positive. These used to fail late,
    inside the fit (a traceback from the learning-rate schedule), or with Lightning's message after the data
    was prepared.
    """
    if not isinstance(trainer, DictConfig):
        return
    epochs = trainer.get("max_epochs")
    steps = trainer.get("max_steps", -1)
    if steps is None or steps == 0 or steps < -1:
        raise ConfigError(
            f"trainer.max_steps must be -1 (no step limit) or a positive number of optimizer steps, got {steps!r}"
        )
    if epochs is not None and epochs < -1:
        raise ConfigError(
            f"trainer.max_epochs must be a number of epochs >= 0, or null (or -1 with trainer.max_steps), got {epochs!r}"
        )
    if epochs == -1 and steps == -1:
        raise ConfigError(
            "trainer.max_epochs=-1 is Lightning's endless training, and flatq-train quantizes the network after the "
            "fit ends: give a number of epochs (trainer.max_epochs=N), or a number of optimizer steps "
            "(+trainer.max_steps=N with trainer.max_epochs=-1 or null)"
        )
    acc = trainer.get("accelerator")
    if isinstance(acc, str) and acc.lower() not in _accelerator_names():
        raise ConfigError(
            f"trainer.accelerator={acc!r} is not an accelerator Lightning knows: choose one of {_accelerator_names()} "
            f"(or trainer=<option>: the config group 'trainer' has {group_options('trainer')})"
        )


def _check_batch_sizes(data: Any) -> None:
    if not isinstance(data, DictConfig):
        return
    for key in ("batch_size", "eval_batch_size"):
        v = data.get(key)
        if v is None and key == "eval_batch_size":
            continue  # null: data.batch_size
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            extra = " (or null: data.batch_size)" if key == "eval_batch_size" else ""
            raise ConfigError(f"data.{key} must be a positive integer{extra}, got {v!r}")


#: the PTQ settings that moved into the quant group's target (``ptq.<key>`` is now ``quant.<key>``)
_MOVED_TO_QUANT = ("keep_first_last_8bit", "include", "exclude", "attention_points")


def quant_target(cfg: DictConfig) -> Any:
    """The :class:`~flatq_lightning.quant.targets.QuantTarget` of ``cfg.quant`` (``None`` without a quant group).

    Raises:
        ConfigError: naming ``quant.weight``/``quant.act`` (a QuantSpec field) or ``quant`` (a target field).
    """
    quant = cfg.get("quant")
    if quant is None:
        return None
    if not isinstance(quant, DictConfig) or "_target_" not in quant:
        raise ConfigError(f"quant must be a target config (quant=<preset>: the config group 'quant' has "
                          f"{group_options('quant')}), got {quant!r}")
    if "preset" in quant:
        raise ConfigError(
            "quant.preset is no longer a setting: the name comes from the bits. Choose the target with quant=<preset> "
            f"(the config group 'quant' has {group_options('quant')}), or set quant.weight.bits and quant.act.bits"
        )
    for side in ("weight", "act"):
        node = quant.get(side)
        if not isinstance(node, DictConfig):
            continue
        try:
            hydra.utils.instantiate(node)
        except Exception as err:  # noqa: BLE001 - the QuantSpec's own message names the field
            cause = err.__cause__ or err
            raise ConfigError(f"quant.{side}: {cause}") from None
    try:
        return hydra.utils.instantiate(quant, _convert_="all")
    except Exception as err:  # noqa: BLE001 - the QuantTarget's own message names the field
        cause = err.__cause__ or err
        raise ConfigError(f"quant: {cause}") from None


def validate_config(cfg: DictConfig) -> None:
    """Check the values a typo would make fail late (model name, presets, bits) with a clear message.

    Raises:
        ConfigError: naming the key, the value and the choices.
    """

    name = cfg.model.get("name")
    if not isinstance(name, str) or not is_model(name):
        raise ConfigError(
            f"model.name={name!r} is not a known model: the config group 'model' has {group_options('model')} "
            f"(model=<option>); model.name may be a local network {sorted(LOCAL_MODELS)} or any timm "
            "architecture (timm.list_models())"
        )
    quant_target(cfg)
    moved = [k for k in _MOVED_TO_QUANT if k in (cfg.get("ptq") or {})]
    if moved:
        raise ConfigError(
            f"ptq.{moved[0]} is no longer a PTQ setting: the quant group's target holds it, shared by DNQ and PTQ "
            f"(quant.{moved[0]}=...)"
        )
    bits = cfg.ptq.get("bits") or []
    if isinstance(bits, str):
        raise ConfigError(f"ptq.bits must be a list like [w8a8,w4a4], got the string {bits!r}")
    for b in bits:
        try:
            QuantTarget.preset(str(b))
        except ValueError as err:
            raise ConfigError(f"ptq.bits: {err}") from None
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    _check_trainer_numbers(cfg.get("trainer"))
    _check_trainer_values(cfg.get("trainer"))
    if "batch_size" in (cfg.get("data") or {}):
        _check_batch_sizes(cfg.data)
    resume = cfg.get("resume")
    if resume is not None and (not isinstance(resume, str) or not resume):
        raise ConfigError(f"resume must be null, 'last' or a checkpoint path, got {resume!r}")
    if resume not in (None, "last") and not Path(resume).is_file():
        raise ConfigError(f"resume={resume!r}: no such checkpoint file (resume=last resumes each variant from "
                          "<run dir>/<variant>/checkpoints/last.ckpt)")
    variants = cfg.get("variants")
    if variants is not None and not isinstance(variants, DictConfig):
        raise ConfigError(f"variants must be null or a mapping {{name: overrides}}, got {variants!r}")
    ptq_recipe(cfg)
    # a variant may set ptq.recipe, or its own trainer overrides, too (the base passed above)
    for name, vcfg in _variants(cfg) if variants else []:
        try:
            ptq_recipe(vcfg)
            quant_target(vcfg)
            _check_trainer_numbers(vcfg.get("trainer"))
            _check_trainer_values(vcfg.get("trainer"))
        except ConfigError as err:
            raise ConfigError(f"variants.{name}: {err}") from None


#: the PTQ settings the recipe replaced (``ptq.<key>`` is then the recipe field of that name)
_OLD_PTQ_KEYS = ("observer", "act_observer", "bn_reestimate", "bn_batches")


def ptq_recipe(cfg: DictConfig) -> Any:
    """The :class:`~flatq_lightning.ptq.recipe.PTQRecipe` of ``cfg.ptq.recipe`` (the ``ptq/recipe`` group:
    ``{name: practical}`` plus any field given as ``+ptq.recipe.<field>=value``; missing: ``minmax``).

    Raises:
        ConfigError: a bad field or value, an unknown name, or a pre-recipe key (``ptq.observer``, …).
    """

    p = cfg.get("ptq") or {}
    old = [k for k in _OLD_PTQ_KEYS if k in p]
    if old:
        raise ConfigError(
            f"ptq.{old[0]} is no longer a setting: the PTQ recipe holds it. Choose one with ptq/recipe=<name> (the "
            f"config group 'ptq/recipe' has {group_options('ptq/recipe')}) and replace a field with "
            f"+ptq.recipe.{old[0]}=<value>"
        )
    try:
        return resolve_recipe(plain_recipe(p.get("recipe")))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"ptq.recipe: {err}") from None


def _variants(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """``[(name, config)]``: each variant's overrides merged onto the config (without ``variants``); a variant
    set to null is left out, ``{}`` is the config as it is."""
    base = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "variants"])
    OmegaConf.set_struct(base, False)
    variants = cfg.get("variants")
    if not variants:
        return [("main", base)]
    out = []
    for name, over in variants.items():
        if over is None:  # variants.plain=null leaves that variant out (e.g. a baseline a sweep need not refit)
            continue
        merged = OmegaConf.merge(base, over)
        OmegaConf.set_struct(merged, False)
        out.append((str(name), merged))
    return out
