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

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..callbacks import DNQ
from ..callbacks.mse import QuantMSEMixin
from ..ptq import runner
from ..ptq.callback import PostTrainingQuantization, recipe_settings
from ..ptq.mixed_precision import plan_mixed_precision
from ..ptq.runner import ptq_target
from ..ptq.sensitivity import take_images
from ..utils.io import numbered_paths, write_file_atomic
from ..utils.logging import log_settings
from ..utils.progress import progress_bar_callback
from .config import (  # noqa: F401  (re-exported: the app's API)
    CONF_DIR,
    ConfigError,
    _variants,
    group_options,
    ptq_recipe,
    quant_target,
    validate_config,
)
from .data.base import DataNotFoundError
from .models import PretrainedWeightsError
from .results import _results_csv, comparison_table, seed_aggregate, summarize_sweep  # noqa: F401

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


# ---------------------------------------------------------------------------------------------------------
# validation and instantiation
# ---------------------------------------------------------------------------------------------------------


def _instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with errors turned into a :class:`ConfigError` naming ``key``."""
    from hydra.errors import InstantiationException

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


# ---------------------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------------------
def _run_ptq(cfg: DictConfig, module: Any, dm: Any, trainer: Any, vdir: Path) -> tuple[Any, dict[str, Path]]:
    """``(report, files)`` of this fit: the PostTrainingQuantization callback's (already written), else
    ``run_ptq`` on the test split, written into ``vdir`` by the one report writer."""

    for cb in trainer.callbacks:
        if isinstance(cb, PostTrainingQuantization) and cb.report is not None:
            return cb.report, dict(cb.files or {}) or cb.report.write(vdir)

    p = cfg.ptq
    calib = dm.calib_dataloader(p.get("calib_batch_size") or None)
    augment = getattr(dm, "augment_batch", None) if getattr(dm, "augment", False) else None
    plan = None
    if p.get("budget") is not None:  # predicted on held-out images: the validation split (the test split without one)
        plan = plan_mixed_precision(module, take_images(dm.val_dataloader(), int(p.get("plan_images", 1024))),
                                    float(p.budget), list(p.get("bits_choices") or (2, 3, 4, 8)), ptq_recipe(cfg),
                                    ptq_target(quant_target(cfg)))
    report = runner.run_ptq(
        module,
        calib,
        dm.test_dataloader(),
        bits=list(p.bits),
        calib_batches=int(p.calib_batches),
        recipe=ptq_recipe(cfg),
        target=quant_target(cfg),
        device=trainer.strategy.root_device,
        progress=bool(p.get("progress", False)),
        bn_loader=dm.train_dataloader(),
        bn_transform=augment,
        plan=plan,
    )
    files = report.write(vdir)
    report.log_to(trainer.loggers, step=trainer.global_step, image_path=files.get("png"))
    return report, files


def _ptq_settings(cfg: DictConfig) -> dict[str, Any]:
    """The PTQ settings known before the fit, under the keys of :meth:`PTQReport.settings` (the report, written
    after the fit, adds what it measured: the batches it calibrated on, the layers kept at 8 bits, …)."""

    def joined(v: Any) -> str:
        return ",".join(str(x) for x in v) if isinstance(v, (list, tuple, ListConfig)) else str(v or "")

    p = cfg.ptq
    target = ptq_target(quant_target(cfg))
    return {
        "ptq/bits": joined(p.bits),
        **recipe_settings(ptq_recipe(cfg)),
        "ptq/keep_first_last_8bit": target.keep_first_last_8bit,
        "ptq/calib_batches_requested": int(p.calib_batches),
        "ptq/include": joined(target.include),
        "ptq/exclude": joined(target.exclude),
    }


def _settings_callback(settings: dict[str, Any]) -> Any:
    """A callback that adds ``settings`` to the loggers' hyperparameters at fit start (with the module's)."""
    from lightning.pytorch.callbacks import Callback

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
        "quant_preset": _quant_name(cfg),
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


#: callback targets that make a fit depend on the ``quant`` target (DNQ); without them (and with mse_weight 0) the
#: target does not change the fit, so a sweep over ``quant`` can reuse it
_QUANT_CALLBACKS = ("dnq_callbacks", ".DNQ", "QuantErrorRecorder", "NoiseInjection")
_NOT_RESULTS = ("experiment_name", "print_table", "reuse_variants", "variants")
#: the fields of the quant target that PTQ reads (its layers and policy; the widths come from ptq.bits)
_PTQ_SCOPE = ("include", "exclude", "keep_first_last_8bit", "attention_points", "layer_bits")


def _quant_name(cfg: DictConfig) -> str | None:
    """The name of the config's quant target (``"w4a4"``), ``None`` without a quant group."""
    target = quant_target(cfg)
    return target.name if target is not None else None


def variant_fingerprint(vcfg: DictConfig) -> str:
    """A hash of everything a variant's fit and PTQ depend on (its resolved config).

    Left out: the names and printing (``experiment_name``, ``print_table``), and ``quant`` (the target's fields)/
    ``module.mse_target`` when nothing uses them (no DNQ callback, ``module.mse_weight`` 0): the plain baseline of a
    sweep over ``quant`` has the same fingerprint in every job. PTQ's scope (``quant.include``, ``quant.exclude``,
    ``quant.keep_first_last_8bit``, ``quant.attention_points``, ``quant.layer_bits``) is kept whenever PTQ runs.
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
        quant = c.pop("quant", None)
        (c.get("module") or {}).pop("mse_target", None)
        if isinstance(quant, dict) and (c.get("ptq") or {}).get("bits"):  # PTQ quantizes the target's layers
            c["quant_scope"] = {k: quant.get(k) for k in _PTQ_SCOPE if k in quant}
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
        "quant_preset": _quant_name(cfg),
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
