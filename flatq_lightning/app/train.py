"""``flatq-train``: the Hydra application (configs in the repository's ``conf/``).

One job fits the configured network (or several *variants* of it with the same seed, data and budget), runs
post-training quantization at ``ptq.bits`` on the test split after each fit, and writes
``results.json``/``results.md``/``results.csv`` into the run directory. With no arguments it runs the
``quickstart`` experiment: digits, a small CNN, plain vs DNQ at W4A4, and prints the comparison table.

Examples::

    flatq-train                                               # quickstart, < 3 min on 2 CPU cores
    flatq-train experiment=cifar10_resnet20_dnq trainer=gpu data.train_subset=10000 trainer.max_epochs=30
    flatq-train -m experiment=cifar10_resnet20_dnq quant=w8a8,w4a4 trainer=gpu   # + multirun/.../summary.md
    flatq-train ptq/recipe=reconstruct +ptq.recipe.iters=200      # the PTQ recipe (conf/ptq/recipe), one field
    python -m flatq_lightning.app.train --cfg job                 # print the composed config

A multirun ends with ``summary.md`` and ``summary.csv`` in the sweep directory (:class:`MultirunSummary`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger("flatq_lightning.app.train")

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "MultirunSummary",
    "comparison_table",
    "group_options",
    "instantiate_callbacks",
    "main",
    "model_kwargs",
    "ptq_recipe",
    "run",
    "seed_aggregate",
    "summarize_sweep",
    "validate_config",
    "variant_fingerprint",
]


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


# ---------------------------------------------------------------------------------------------------------
# validation and instantiation
# ---------------------------------------------------------------------------------------------------------
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


def _check_quant_specs(quant: DictConfig, weight_bits: int, act_bits: int) -> None:
    """``quant.weight`` / ``quant.act`` (QuantSpec fields) build, and their bits are the ones ``quant.preset`` names
    (so that ``quant.preset=w3a3`` alone cannot label a W4A4 run as W3A3)."""
    for side, bits in (("weight", weight_bits), ("act", act_bits)):
        node = quant.get(side)
        if node is None:
            continue
        try:
            spec = hydra.utils.instantiate(node)
        except Exception as err:  # noqa: BLE001 - the QuantSpec's own message names the field
            cause = err.__cause__ or err
            raise ConfigError(f"quant.{side}: {cause}") from None
        if getattr(spec, "bits", bits) != bits:
            raise ConfigError(
                f"quant.preset={quant.preset!r} names {bits}-bit {side}s but quant.{side}.bits={spec.bits}: choose "
                f"the target with quant=<preset> (the config group 'quant' has {group_options('quant')}), or set "
                "quant.preset, quant.weight.bits and quant.act.bits together"
            )


def validate_config(cfg: DictConfig) -> None:
    """Check the values a typo would make fail late (model name, presets, bits) with a clear message.

    Raises:
        ConfigError: naming the key, the value and the choices.
    """
    from ..quant.spec import parse_bits
    from .models import LOCAL_MODELS, is_model

    name = cfg.model.get("name")
    if not isinstance(name, str) or not is_model(name):
        raise ConfigError(
            f"model.name={name!r} is not a known model: the config group 'model' has {group_options('model')} "
            f"(model=<option>); model.name may be a local network {sorted(LOCAL_MODELS)} or any timm "
            "architecture (timm.list_models())"
        )
    try:
        wb, ab = parse_bits(str(cfg.quant.preset))
    except ValueError as err:
        raise ConfigError(
            f"quant.preset: {err}; the config group 'quant' has {group_options('quant')}"
        ) from None
    _check_quant_specs(cfg.quant, wb, ab)
    bits = cfg.ptq.get("bits") or []
    if isinstance(bits, str):
        raise ConfigError(f"ptq.bits must be a list like [w8a8,w4a4], got the string {bits!r}")
    for b in bits:
        try:
            parse_bits(str(b))
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
    from ..ptq.callback import plain_recipe
    from ..ptq.recipe import resolve_recipe

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


def _instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with errors turned into a :class:`ConfigError` naming ``key``."""
    from hydra.errors import InstantiationException

    from .data.base import DataNotFoundError
    from .models import PretrainedWeightsError

    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, PretrainedWeightsError):
            raise ConfigError(f"{cause}") from None
        if isinstance(cause, DataNotFoundError):
            raise cause from None
        target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
        raise ConfigError(f"{key} ({target}): {type(cause).__name__}: {cause}") from err


def instantiate_callbacks(
    cfg_callbacks: DictConfig | None, checkpoint_dir: Path | None = None, report_dir: Path | None = None
) -> list[Any]:
    """Instantiate every callback config (entries set to null are skipped; a list result is flattened).

    A ``ModelCheckpoint`` whose ``dirpath`` is null gets ``checkpoint_dir``; a ``PostTrainingQuantization``
    whose ``save_dir`` is null gets ``report_dir`` (its report is then the job's, written once).
    """
    out: list[Any] = []
    keys: list[str] = []
    if not cfg_callbacks:
        return out
    for key, node in cfg_callbacks.items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"callbacks.{key} must be a config with a _target_, got {node!r}")
        kwargs: dict[str, Any] = {}
        if str(node._target_).endswith("ModelCheckpoint") and node.get("dirpath") is None and checkpoint_dir:
            kwargs["dirpath"] = str(checkpoint_dir)
        if str(node._target_).endswith("PostTrainingQuantization") and node.get("save_dir") is None and report_dir:
            kwargs["save_dir"] = str(report_dir)
        obj = _instantiate(node, f"callbacks.{key}", **kwargs)
        objs = list(obj) if isinstance(obj, (list, tuple)) else [obj]
        out.extend(objs)
        keys.extend([str(key)] * len(objs))
    _refuse_same_state_key(out, keys)
    return out


def _refuse_same_state_key(callbacks: list[Any], keys: list[str]) -> None:
    """Two stateful callbacks with one state key: Lightning refuses them when the Trainer is built, with a
    message that names no config entry; say which entries and what to change instead."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from ..callbacks import DNQ

    seen: dict[str, str] = {}
    for cb, key in zip(callbacks, keys):
        if not isinstance(cb, Callback) or not is_overridden("state_dict", instance=cb, parent=Callback):
            continue
        if cb.state_key in seen:
            hint = (
                f"give one its own name (++callbacks.{key}.name=...); a second DNQ with weight noise is refused "
                "even then: keep one DNQ and watch other bit-widths with flatq_lightning.QuantErrorRecorder "
                "(preset, name=...) callbacks"
                if isinstance(cb, DNQ) else "give one of them other settings, or keep one"
            )
            raise ConfigError(
                f"callbacks.{seen[cb.state_key]} and callbacks.{key} are two {type(cb).__name__} callbacks with the "
                f"same state key {cb.state_key!r}, which Lightning refuses in one Trainer: {hint}"
            )
        seen[cb.state_key] = key


def wire_quant_stats(module: Any, callbacks: list[Any]) -> None:
    """Give the module's FP-vs-quantized MSE term the DNQ statistics of this fit (the config's one DNQ)."""
    from ..callbacks import DNQ
    from ..callbacks.mse import QuantMSEMixin

    dnqs = [c for c in callbacks if isinstance(c, DNQ)]
    if isinstance(module, QuantMSEMixin) and len(dnqs) == 1:
        module.use_quant_stats(dnqs[0])


def model_kwargs(cfg: DictConfig, dm: Any) -> dict[str, Any]:
    """``model.kwargs`` as a dict, with ``in_chans`` from the data module unless set there."""
    kw = cfg.model.get("kwargs")
    extra = OmegaConf.to_container(kw, resolve=True) if isinstance(kw, DictConfig) else dict(kw or {})
    return {"in_chans": dm.in_chans, **extra}


def _output_dir(output_dir: str | os.PathLike[str] | None) -> Path:
    if output_dir is not None:
        return Path(output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


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


# ---------------------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------------------
def _run_ptq(cfg: DictConfig, module: Any, dm: Any, trainer: Any, vdir: Path) -> tuple[Any, dict[str, Path]]:
    """``(report, files)`` of this fit: the PostTrainingQuantization callback's (already written), else
    ``run_ptq`` on the test split, written into ``vdir`` by the one report writer."""
    from ..ptq.callback import PostTrainingQuantization

    for cb in trainer.callbacks:
        if isinstance(cb, PostTrainingQuantization) and cb.report is not None:
            return cb.report, dict(cb.files or {}) or cb.report.write(vdir)
    from ..ptq import runner  # runner.run_ptq: looked up at call time (tests replace it)

    p = cfg.ptq
    calib = dm.calib_dataloader(p.get("calib_batch_size") or None)
    augment = getattr(dm, "augment_batch", None) if getattr(dm, "augment", False) else None
    report = runner.run_ptq(
        module,
        calib,
        dm.test_dataloader(),
        bits=list(p.bits),
        calib_batches=int(p.calib_batches),
        recipe=ptq_recipe(cfg),
        keep_first_last_8bit=bool(p.keep_first_last_8bit),
        include=OmegaConf.to_object(p.include) if isinstance(p.include, ListConfig) else p.include,
        exclude=OmegaConf.to_object(p.exclude) if isinstance(p.exclude, ListConfig) else p.exclude,
        device=trainer.strategy.root_device,
        progress=bool(p.get("progress", False)),
        bn_loader=dm.train_dataloader(),
        bn_transform=augment,
    )
    files = report.write(vdir)
    report.log_to(trainer.loggers, step=trainer.global_step, image_path=files.get("png"))
    return report, files


def _ptq_settings(cfg: DictConfig) -> dict[str, Any]:
    """The PTQ settings known before the fit, under the keys of :meth:`PTQReport.settings` (the report, written
    after the fit, adds what it measured: the batches it calibrated on, the layers kept at 8 bits, …)."""

    def joined(v: Any) -> str:
        return ",".join(str(x) for x in v) if isinstance(v, (list, tuple, ListConfig)) else str(v or "")

    from ..ptq.callback import recipe_settings

    p = cfg.ptq
    return {
        "ptq/bits": joined(p.bits),
        **recipe_settings(ptq_recipe(cfg)),
        "ptq/keep_first_last_8bit": bool(p.keep_first_last_8bit),
        "ptq/calib_batches_requested": int(p.calib_batches),
        "ptq/include": joined(p.get("include")),
        "ptq/exclude": joined(p.get("exclude")),
    }


def _settings_callback(settings: dict[str, Any]) -> Any:
    """A callback that adds ``settings`` to the loggers' hyperparameters at fit start (with the module's)."""
    from lightning.pytorch.callbacks import Callback

    from ..utils.logging import log_settings

    class LogSettings(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            log_settings(trainer, settings)

    return LogSettings()


def _resume_from(resume: str | None, vdir: Path, name: str) -> str | None:
    """The checkpoint a fit resumes from: ``resume=last`` takes ``<vdir>/checkpoints/last.ckpt`` when it exists
    (the run was stopped; without it the fit starts afresh, said in one line), a path is taken as it is."""
    if resume is None:
        return None
    if resume != "last":
        return str(resume)
    last = vdir / "checkpoints" / "last.ckpt"
    if last.is_file():
        print(f"[{name}] resuming from {last}", file=sys.stderr)
        return str(last)
    print(f"[{name}] resume=last: no {last} yet, starting from the beginning", file=sys.stderr)
    return None


def _fit_variant(name: str, cfg: DictConfig, dm: Any, vdir: Path) -> dict[str, Any] | None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ..utils.progress import progress_bar_callback

    L.seed_everything(int(cfg.seed), workers=True)
    module = _instantiate(
        cfg.module, "module", num_classes=dm.num_classes, model_kwargs=model_kwargs(cfg, dm)
    )
    callbacks = instantiate_callbacks(cfg.get("callbacks"), checkpoint_dir=vdir / "checkpoints", report_dir=vdir)
    wire_quant_stats(module, callbacks)
    extra: dict[str, Any] = {}
    if "logger" not in cfg.trainer:  # CSV logs beside the results (set trainer.logger to change)
        from lightning.pytorch.loggers import CSVLogger

        extra["logger"] = CSVLogger(save_dir=str(vdir), name="lightning_logs")
    if "enable_checkpointing" not in cfg.trainer:  # the callbacks group decides: checkpoint or none
        extra["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    from ..ptq.callback import PostTrainingQuantization

    extra_callbacks = []
    if cfg.ptq.get("bits") and not any(isinstance(c, PostTrainingQuantization) for c in callbacks):
        # PTQ runs after the fit (no PostTrainingQuantization callback): its settings go to the loggers with the
        # module's hyperparameters at fit start, as the callback's would (TensorBoard's HPARAMS shows that set)
        extra_callbacks.append(_settings_callback(_ptq_settings(cfg)))
    # in a log (not a terminal) Lightning's tqdm bar is replaced by plain lines, one per epoch and a few within
    bar = progress_bar_callback(bool(cfg.trainer.get("enable_progress_bar", True)), callbacks)
    if bar is not None:
        extra_callbacks.append(bar)
    trainer = _instantiate(
        cfg.trainer, "trainer", callbacks=[*callbacks, *extra_callbacks], default_root_dir=str(vdir), **extra
    )
    log.info(
        "[%s] fitting %s on %s with %d callback(s)", name, cfg.model.name, type(dm).__name__, len(callbacks)
    )
    ckpt_path = _resume_from(cfg.get("resume"), vdir, name)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    fit_s = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return None
    ckpt = trainer.checkpoint_callback
    result: dict[str, Any] = {
        "model": str(cfg.model.name),
        "callbacks": [type(c).__name__ for c in callbacks],
        "mse_weight": float(cfg.module.mse_weight),
        "quant_preset": str(cfg.quant.preset),
        "fit_seconds": round(fit_s, 2),
        "resumed_from": ckpt_path,
        "epochs": int(trainer.current_epoch),
        "steps": int(trainer.global_step),
        "checkpoint": (ckpt.best_model_path or ckpt.last_model_path or None)
        if isinstance(ckpt, ModelCheckpoint)
        else None,
        "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }
    if cfg.ptq.get("bits"):
        t0 = time.perf_counter()
        report, files = _run_ptq(cfg, module, dm, trainer, vdir)
        result.update(
            ptq_report=str(files["json"]) if "json" in files else None,
            fp_top1=report.fp_top1,
            fp_top5=report.fp_top5,
            ptq={r.bits: {"top1": r.top1, "top5": r.top5, "drop_top1": r.drop_top1} for r in report.rows},
            ptq_seconds=round(time.perf_counter() - t0, 2),
        )
    else:
        metrics = trainer.test(module, datamodule=dm, verbose=False)
        test = {k: float(v) for k, v in (metrics[0] if metrics else {}).items()}
        result.update(fp_top1=100.0 * test.get("test/acc", float("nan")), test=test, ptq={})
    return result


#: callback targets that make a fit depend on ``quant.preset`` (DNQ); without them (and with mse_weight 0) the
#: preset does not change the fit, so a sweep over ``quant`` can reuse it
_QUANT_CALLBACKS = ("dnq_callbacks", ".DNQ", "QuantErrorRecorder", "NoiseInjection")
_NOT_RESULTS = ("experiment_name", "print_table", "reuse_variants", "variants")


def variant_fingerprint(vcfg: DictConfig) -> str:
    """A hash of everything a variant's fit and PTQ depend on (its resolved config).

    Left out: the names and printing (``experiment_name``, ``print_table``), and ``quant`` (preset and QuantSpec
    fields)/``module.mse_preset`` when nothing uses them (no DNQ callback, ``module.mse_weight`` 0): the plain baseline of a sweep over
    ``quant`` has the same fingerprint in every job.
    """
    import hashlib

    c = OmegaConf.to_container(vcfg, resolve=True)
    assert isinstance(c, dict)
    for k in _NOT_RESULTS:
        c.pop(k, None)
    cbs = c.get("callbacks") or {}
    uses_quant = float((c.get("module") or {}).get("mse_weight") or 0.0) > 0.0 or any(
        isinstance(n, dict) and any(t in str(n.get("_target_", "")) for t in _QUANT_CALLBACKS) for n in cbs.values()
    )
    if not uses_quant:
        c.pop("quant", None)
        (c.get("module") or {}).pop("mse_preset", None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sweep_cache_dir(out: Path) -> Path | None:
    """``<sweep dir>/.fits`` in a Hydra multirun (where jobs may share fits), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(hc.sweep.dir) / ".fits"


def _cached_fit(cache: Path | None, fp: str) -> dict[str, Any] | None:
    if cache is None or not (cache / f"{fp}.json").is_file():
        return None
    return json.loads((cache / f"{fp}.json").read_text())


def _store_fit(cache: Path | None, fp: str, result: dict[str, Any], where: Path) -> None:
    if cache is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{fp}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**result, "fit_dir": str(where)}, indent=2, allow_nan=True))
    os.replace(tmp, cache / f"{fp}.json")


def run(cfg: DictConfig, output_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run the job described by ``cfg`` (a composed ``train`` config) and return the results dict.

    Writes ``results.json``, ``results.md`` and ``results.csv`` (and each variant's ``ptq_report.*``,
    logs and checkpoints in a subfolder) into ``output_dir`` (default: Hydra's run directory).

    Example:
        >>> from hydra import compose, initialize_config_dir                        # doctest: +SKIP
        >>> with initialize_config_dir(str(CONF_DIR), version_base="1.3"):           # doctest: +SKIP
        ...     cfg = compose("train", overrides=["++trainer.fast_dev_run=true"])
        >>> run(cfg, "outputs/smoke")["variants"]["dnq"]["ptq"]["w4a4"]["top1"]      # doctest: +SKIP
    """
    import lightning as L

    validate_config(cfg)
    threads = cfg.get("torch_threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    out = _output_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    dm = _instantiate(cfg.data, "data")
    dm.prepare_data()  # a missing path fails here, before any model is built
    dm.setup("fit")
    variants = _variants(cfg)
    results: dict[str, Any] = {
        "experiment": str(cfg.get("experiment_name", "default")),
        "overrides": _overrides(),
        "seed": int(cfg.seed),
        "data": type(dm).__name__,
        "quant_preset": str(cfg.quant.preset),
        "bits": [str(b) for b in (cfg.ptq.get("bits") or [])],
        "variants": {},
    }
    t_job = time.perf_counter()
    cache = _sweep_cache_dir(out) if cfg.get("reuse_variants", True) else None
    for name, vcfg in variants:
        vdir = out / name if len(variants) > 1 else out
        fp = variant_fingerprint(vcfg)
        res = _cached_fit(cache, fp)
        if res is not None:  # an earlier job of this sweep fitted exactly this (e.g. the plain baseline)
            res["reused_from"] = res.pop("fit_dir")
            log.info("[%s] not refitted: same config as %s (reuse_variants=false to refit)", name, res["reused_from"])
            print(f"[{name}] reused from {res['reused_from']} (nothing it depends on changed)", file=sys.stderr)
        else:
            res = _fit_variant(name, vcfg, dm, vdir)
            if res is not None:
                _store_fit(cache, fp, res, vdir)
        if res is not None:
            res["fingerprint"] = fp
            results["variants"][name] = res
    results["job_seconds"] = round(time.perf_counter() - t_job, 2)
    if results["variants"]:
        from ..utils.io import numbered_paths, write_file_atomic

        # atomic, and an earlier job's results in the same directory (a rerun, a resume) are kept: results_2.*
        paths = numbered_paths(out, "results", ("json", "md", "csv"))
        table = comparison_table(results)
        write_file_atomic(paths["json"], json.dumps(results, indent=2, allow_nan=True) + "\n")
        write_file_atomic(paths["md"], f"# {results['experiment']}\n\n{table}\n")
        write_file_atomic(paths["csv"], _results_csv([results]))
        results["results_files"] = {k: str(v) for k, v in paths.items()}
        if cfg.get("print_table", True):
            print(f"\n{results['experiment']}: top-1 accuracy (%) on the test split after PTQ\n")
            print(table)
            print(f"\nresults in {out}" + (f" ({paths['json'].name})" if paths["json"].name != "results.json" else ""))
    return results


# ---------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return "—" if f != f else f"{f:.2f}"


def comparison_table(results: dict[str, Any]) -> str:
    """Markdown: one row per bit-width (FP first), one column per variant (top-1 %), then fit times.

    Example:
        >>> r = {"bits": ["w4a4"], "variants": {"plain": {"fp_top1": 97.0, "ptq": {"w4a4": {"top1": 60.0}},
        ...      "fit_seconds": 9.5}, "dnq": {"fp_top1": 96.5, "ptq": {"w4a4": {"top1": 90.0}}, "fit_seconds": 12.0}}}
        >>> print(comparison_table(r))
        | bits | plain | dnq |
        |---|---:|---:|
        | FP | 97.00 | 96.50 |
        | W4A4 | 60.00 | 90.00 |
        | fit time (s) | 9.5 | 12.0 |
    """
    names = list(results["variants"])
    vs = [results["variants"][n] for n in names]
    lines = ["| bits | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines.append("| FP | " + " | ".join(_fmt(v.get("fp_top1")) for v in vs) + " |")
    for b in results.get("bits", []):
        lines.append(
            f"| {b.upper()} | " + " | ".join(_fmt(v.get("ptq", {}).get(b, {}).get("top1")) for v in vs) + " |"
        )
    lines.append("| fit time (s) | " + " | ".join(f"{v.get('fit_seconds', 0):.1f}" for v in vs) + " |")
    return "\n".join(lines)


def _summary_rows(all_results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    bits: list[str] = []
    for r in all_results:
        bits += [b for b in r.get("bits", []) if b not in bits]
    # only the overrides that tell the jobs apart (the swept ones), unless there is a single job
    common = (
        set.intersection(*(set(r.get("overrides", [])) for r in all_results))
        if len(all_results) > 1
        else set()
    )
    header = ["job", "overrides", "variant", "fp_top1", *[f"{b}_top1" for b in bits], "fit_seconds"]
    rows = []
    for r in all_results:
        for name, v in r.get("variants", {}).items():
            rows.append(
                [
                    str(r.get("job", "")),
                    " ".join(o for o in r.get("overrides", []) if o not in common),
                    name,
                    _fmt(v.get("fp_top1")),
                    *[_fmt(v.get("ptq", {}).get(b, {}).get("top1")) for b in bits],
                    f"{v.get('fit_seconds', 0):.1f}",
                ]
            )
    return header, rows


def _results_csv(all_results: Sequence[dict[str, Any]]) -> str:
    header, rows = _summary_rows(all_results)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _is_seed(override: str) -> bool:
    return override.lstrip("+~").split("=", 1)[0] == "seed"


def seed_aggregate(all_results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """Mean ± sample std and n over seeds, per (other swept overrides, variant); None unless seeds were swept.

    Columns: overrides, variant, n, seeds, then ``mean ± std`` of FP top-1, each bit-width's top-1 and fit time.

    Example:
        >>> r = lambda seed, acc: {"overrides": [f"seed={seed}", "quant=w4a4"], "bits": ["w4a4"],
        ...     "variants": {"dnq": {"fp_top1": 90.0, "ptq": {"w4a4": {"top1": acc}}, "fit_seconds": 2.0}}}
        >>> header, rows = seed_aggregate([r(0, 80.0), r(1, 84.0)])
        >>> rows[0][:5]
        ['', 'dnq', '2', '0,1', '90.00 ± 0.00']
        >>> rows[0][5]
        '82.00 ± 2.83'
    """
    import statistics

    seeds = {o for r in all_results for o in r.get("overrides", []) if _is_seed(o)}
    if len(seeds) < 2:
        return None
    bits: list[str] = []
    for r in all_results:
        bits += [b for b in r.get("bits", []) if b not in bits]
    others = [[o for o in r.get("overrides", []) if not _is_seed(o)] for r in all_results]
    common = set.intersection(*(set(o) for o in others)) if len(others) > 1 else set()
    groups: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for r, over in zip(all_results, others):
        seed = next((o.split("=", 1)[1] for o in r.get("overrides", []) if _is_seed(o)), str(r.get("seed", "")))
        key_over = " ".join(o for o in over if o not in common)
        for name, v in r.get("variants", {}).items():
            groups.setdefault((key_over, name), []).append((seed, v))

    def stat(vals: list[float]) -> str:
        vals = [x for x in vals if x == x]  # NaN: a failed or skipped measurement
        if not vals:
            return "—"
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        return f"{statistics.fmean(vals):.2f} ± {_fmt(sd)}"

    def num(x: Any) -> float:
        try:
            return float(x)
        except (TypeError, ValueError):
            return float("nan")

    header = ["overrides", "variant", "n", "seeds", "fp_top1", *[f"{b}_top1" for b in bits], "fit_seconds"]
    rows = []
    for (over, name), items in groups.items():
        vs = [v for _, v in items]
        rows.append(
            [over, name, str(len(items)), ",".join(sd for sd, _ in items), stat([num(v.get("fp_top1")) for v in vs])]
            + [stat([num(v.get("ptq", {}).get(b, {}).get("top1")) for v in vs]) for b in bits]
            + [stat([num(v.get("fit_seconds")) for v in vs])]
        )
    return header, rows


def summarize_sweep(sweep_dir: str | os.PathLike[str]) -> tuple[Path, Path] | None:
    """Collect ``*/results.json`` below ``sweep_dir`` into ``summary.md`` and ``summary.csv`` there.

    When the sweep ran over ``seed``, ``summary.md`` also has a table of mean ± std (sample) and n over the
    seeds for each setting and variant, also written as ``summary_seeds.csv``. Returns the two paths, or None
    when no job wrote results.
    """
    sweep = Path(sweep_dir)
    found = sorted(sweep.glob("*/results.json"), key=lambda p: (len(p.parent.name), p.parent.name))  # 2 < 10
    all_results = []
    for f in found:
        r = json.loads(f.read_text())
        r["job"] = f.parent.name.split("_", 1)[0]
        all_results.append(r)
    if not all_results:
        return None
    header, rows = _summary_rows(all_results)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    title = all_results[0].get("experiment", "sweep")
    md_path, csv_path = sweep / "summary.md", sweep / "summary.csv"
    agg = seed_aggregate(all_results)
    if agg is not None:
        h, rs = agg
        md += ["", "## Mean ± std over seeds (sample std; n seeds)", "",
               "| " + " | ".join(h) + " |", "|" + "---|" * 2 + "---:|" * (len(h) - 2)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rs]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(h)
        w.writerows(rs)
        (sweep / "summary_seeds.csv").write_text(buf.getvalue())
    else:
        (sweep / "summary_seeds.csv").unlink(missing_ok=True)  # from an earlier summary of this directory
    md_path.write_text(f"# {title}: multirun summary (top-1 %, test split)\n\n" + "\n".join(md) + "\n")
    csv_path.write_text(_results_csv(all_results))
    return md_path, csv_path


class MultirunSummary(HydraCallback):
    """Hydra callback: at the end of a multirun, write ``summary.md``/``summary.csv`` in the sweep directory.

    Registered in ``conf/hydra/default.yaml`` under ``hydra.callbacks``.

    Example:
        >>> MultirunSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": "/nonexistent"}}}))
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        paths = summarize_sweep(config.hydra.sweep.dir)
        if paths is not None:
            print(f"\nmultirun summary: {paths[0]}\n")
            print(paths[0].read_text())


# ---------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------
def _task(cfg: DictConfig) -> None:
    from .data.base import DataNotFoundError

    try:
        run(cfg)
    except (ConfigError, DataNotFoundError) as err:
        print(f"flatq-train: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console script ``flatq-train`` (also ``python -m flatq_lightning.app.train``): Hydra CLI over ``conf/``."""
    if not (CONF_DIR / "train.yaml").is_file():
        print(
            f"flatq-train: error: no Hydra configs at {CONF_DIR} (expected conf/train.yaml beside the package; "
            "install from a checkout with `pip install -e .` or set FLATQ_CONF_DIR)",
            file=sys.stderr,
        )
        sys.exit(2)
    hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
