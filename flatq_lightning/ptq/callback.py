"""``PostTrainingQuantization``: after fit, quantize the network at several bit-widths and report what survives."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from ..quant.targets import QuantTarget
from ..utils.logging import log_settings
from .export import normalize_export_formats
from .mixed_precision import parse_bits_choices, plan_mixed_precision
from .onnx_export import require_onnx
from .recipe import RECIPES, PTQRecipe
from .report import PTQReport
from .runner import DEFAULT_BITS, _recipe_from_args, ptq_network, ptq_target, run_ptq, validate_ptq_args
from .sensitivity import SensitivityReport, analyze_sensitivity, take_images

__all__ = ["PostTrainingQuantization", "STAGES", "recipe_settings"]

#: which dataloader the quantized copies are evaluated on
STAGES = ("validate", "test")
_HOOKS = {"train": "train_dataloader", "validate": "val_dataloader", "test": "test_dataloader"}
_WORDS = {"train": "training", "validate": "validation", "test": "test"}


def _data_source(trainer: pl.Trainer, which: str) -> Any:
    """The loop's dataloader source (loaders passed to ``trainer.fit``); ``None`` if Lightning changed."""
    try:
        loop = {
            "train": lambda: trainer.fit_loop,
            "validate": lambda: trainer.fit_loop.epoch_loop.val_loop,
            "test": lambda: trainer.test_loop,
        }[which]()
        return loop._data_source
    except AttributeError:
        return None


def _first(loaders: Any, what: str) -> Any:
    """One loader out of a list/tuple/dict of loaders (the first, with a warning if there are several)."""
    from lightning.pytorch.utilities import CombinedLoader

    if isinstance(loaders, CombinedLoader):
        loaders = loaders.iterables
    items: list[Any] | None = None
    if isinstance(loaders, dict):
        items = list(loaders.values())
    elif isinstance(loaders, (list, tuple)):
        items = list(loaders)
    if items is None:
        return loaders
    if not items:
        return None
    if len(items) > 1:
        rank_zero_warn(f"PostTrainingQuantization: {len(items)} {what} dataloaders; using the first one")
    return items[0]


def _find_loader(trainer: pl.Trainer, pl_module: pl.LightningModule, which: str, instantiate: bool = True) -> Any:
    """The ``which`` dataloader by Lightning's precedence: passed to fit, datamodule hook, module hook.

    Fresh loaders from the hooks are preferred to the trainer's (possibly distributed-sampled) copies, so
    rank zero sees the whole evaluation set. With ``instantiate=False`` returns ``True`` instead of calling
    a hook (a cheap "is there one?" check).
    """
    hook = _HOOKS[which]
    src = _data_source(trainer, which)
    inst = getattr(src, "instance", None)
    if inst is not None and not isinstance(inst, (pl.LightningModule, pl.LightningDataModule)):
        return _first(inst, _WORDS[which])
    dm = trainer.datamodule
    for owner in (dm, pl_module):
        if owner is not None and is_overridden(hook, owner):
            return _first(getattr(owner, hook)(), _WORDS[which]) if instantiate else True
    attached = {
        "train": lambda: trainer.train_dataloader,
        "validate": lambda: trainer.val_dataloaders,
        "test": lambda: trainer.test_dataloaders,
    }[which]()
    return _first(attached, _WORDS[which]) if attached is not None else None


def _missing(which: str, stage_arg: bool) -> ValueError:
    hook = _HOOKS[which]
    alt = ""
    if stage_arg:
        other = "test" if which == "validate" else "validate"
        alt = f", or use stage={other!r} (allowed stages: {STAGES})"
    passed = {"train": "train_dataloaders", "validate": "val_dataloaders", "test": None}[which]
    via_fit = f", pass {passed}= to trainer.fit()" if passed else ""
    return ValueError(
        "PostTrainingQuantization" + (f"(stage={which!r})" if stage_arg else "")
        + f" needs a {_WORDS[which]} dataloader at the end of fit and found none: define {hook}() on the "
        f"LightningModule or its LightningDataModule{via_fit}{alt}"
    )


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)


def plain_recipe(recipe: Any) -> PTQRecipe | str | dict[str, Any] | None:
    """A ``recipe=`` value checked and in plain Python values: a Hydra/OmegaConf ``DictConfig`` becomes a dict.

    ``ValueError`` for anything but a recipe, a name, a mapping or ``None``, and for a mapping that holds only an
    unknown name (a typo of a preset: :func:`~flatq_lightning.ptq.recipe.resolve_recipe` would make it a
    ``minmax`` recipe of that name; a recipe of your own names its fields too).
    """
    if type(recipe).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        recipe = OmegaConf.to_container(recipe, resolve=True)
    if recipe is not None and not isinstance(recipe, (PTQRecipe, str, Mapping)):
        raise ValueError(f"recipe must be a PTQRecipe, a preset name or a mapping of its fields, got {recipe!r}")
    if isinstance(recipe, Mapping):
        recipe = dict(recipe)
        name = recipe.get("name", "minmax")
        if set(recipe) <= {"name"} and (not isinstance(name, str) or name not in RECIPES):
            raise ValueError(
                f"unknown PTQ recipe {name!r}; the presets are {list(RECIPES)} (a recipe of your own names its "
                "fields too, e.g. {'name': 'mine', 'observer': 'mse'})"
            )
    return recipe


def recipe_settings(recipe: PTQRecipe) -> dict[str, Any]:
    """The recipe as flat logger hyperparameters: :meth:`PTQRecipe.settings`."""
    return recipe.settings()


class PostTrainingQuantization(Callback):
    """After ``trainer.fit``: fold BN, calibrate, quantize at each bit-width, evaluate, report (rank zero).

    The network is the LightningModule's ``model`` attribute when that is an ``nn.Module``, else the module
    itself; it is never mutated (quantization runs on copies, on the trainer's device). Activation ranges come
    from the first ``calib_batches`` batches of the train dataloader; top-1/top-5 of the FP network and of
    every quantized copy are measured on the ``stage`` dataloader (validation or test, from the datamodule, the
    module, or the loaders given to ``fit``). Writes ``ptq_report.{json,md,csv,png}`` (the table, per-layer
    SQNR, and the accuracy plot; :meth:`PTQReport.write`, atomically) to ``save_dir`` (default: the logger's
    ``trainer.log_dir``; with ``logger=False`` ``<default_root_dir>/ptq_reports``); an earlier report there is
    kept and the new one numbered (``ptq_report_2.*``) unless ``overwrite=True``. With
    ``export="onnx"`` (or ``"safetensors"``, ``("onnx", "safetensors")``; ``True`` is ``"safetensors"``) each
    quantized model is written beside the report as ``quantized_<bits>.onnx`` (QuantizeLinear/DequantizeLinear,
    checked in ONNX Runtime on the evaluation data: :func:`flatq_lightning.ptq.onnx_export.export_onnx`) and/or
    ``quantized_<bits>.safetensors`` (packed integer weights: :func:`flatq_lightning.ptq.export.save_quantized`); logs
    ``ptq/fp/top1``, ``ptq/<bits>/top1`` and ``ptq/<bits>/top5`` to every logger and prints the table.
    The report is kept in :attr:`report`.

    Args:
        bits: presets ``"w<b>a<b>"`` (2-16 bits; a side at 16 stays float, ``"w4a16"`` is weight-only).
        calib_batches: number of calibration batches (a shorter loader is used whole, with one warning).
        recipe: how each quantized copy is made (:class:`~flatq_lightning.ptq.recipe.PTQRecipe`): a preset name
            (``"minmax"``, the default; ``"practical"``: MSE weight clipping, percentile activation ranges, BN
            re-estimated per bit-width; ``"reconstruct"``: ``practical`` plus block reconstruction), a
            ``PTQRecipe``, or a mapping (``{"name": "reconstruct", "iters": 200}``: the preset with those fields
            replaced; Hydra's ``DictConfig`` too). BN re-estimation runs on training batches passed through the
            datamodule's training augmentation (``augment_batch``) when it has one. Checked at construction.
        target: what is quantized (:class:`~flatq_lightning.quant.targets.QuantTarget`, default ``QuantTarget()``):
            the layers (``include``/``exclude`` patterns), the first/last policy (``keep_first_last_8bit``: the first
            and the last quantized layer at 8 bits), attention points (on timm ViTs also Q, K, V and the softmax
            output), per-layer widths; each bit-width of ``bits`` is ``target.at(bits)`` with the recipe's observers.
        stage: ``"validate"`` or ``"test"``: which dataloader evaluates.
        save_dir: where the report files go.
        overwrite: replace an earlier ``ptq_report.*`` in ``save_dir`` instead of writing ``ptq_report_<n>.*``.
        export: formats to save each quantized model in: ``"onnx"``, ``"safetensors"``, both (a list or
            ``"onnx,safetensors"``); ``True`` means ``"safetensors"``, ``False`` nothing. ONNX needs the ``[onnx]``
            extra and is checked against ONNX Runtime on the first ``parity_batches`` evaluation batches (default:
            all); the parity numbers are in ``report.rows[i].exports`` and the report's Markdown.
        progress: tqdm bars; ``print_report``: print the Markdown table at the end.
        observer, act_observer, bn_reestimate, bn_batches: deprecated (removed in the next release): the
            recipe's fields of the same names. Given, they warn (``FutureWarning``) and replace those fields of
            ``recipe`` (without a recipe: of ``"minmax"``, and the recipe is then named ``"custom"``), as
            :func:`~flatq_lightning.ptq.runner.run_ptq` does.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> ptq = PostTrainingQuantization(bits=("w8a8", "w4a4"), calib_batches=16, recipe="practical")
        >>> ptq.recipe.observer, ptq.recipe.act_observer, ptq.recipe.bn_reestimate
        ('mse', 'percentile', True)
        >>> trainer = Trainer(max_epochs=1, callbacks=[ptq])
        >>> # trainer.fit(lit_module); ptq.report.row("w4a4").top1
        >>> # or without a trainer: report = ptq.run(net, train_loader, val_loader)
    """

    def __init__(
        self,
        bits: str | Sequence[str] = DEFAULT_BITS,
        calib_batches: int = 32,
        observer: str | None = None,
        target: QuantTarget | None = None,
        stage: str = "validate",
        save_dir: str | os.PathLike | None = None,
        export: bool | str | Sequence[str] = False,
        progress: bool = True,
        print_report: bool = True,
        act_observer: str | None = None,
        bn_reestimate: bool | None = None,
        bn_batches: int | None = None,
        overwrite: bool = False,
        parity_batches: int | None = None,
        recipe: PTQRecipe | str | Mapping[str, Any] | None = None,
        budget: float | None = None,
        bits_choices: str | Sequence[int] = (2, 3, 4, 8),
        plan_images: int = 1024,
        sensitivity_bits: int | None = None,
        sensitivity_images: int = 2000,
    ) -> None:
        super().__init__()
        #: the recipe every quantized copy is made with (the deprecated arguments laid over ``recipe``)
        self.recipe: PTQRecipe = self._resolve_recipe(
            recipe, {"observer": observer, "act_observer": act_observer, "bn_reestimate": bn_reestimate,
                     "bn_batches": bn_batches})
        self.bits = validate_ptq_args(bits, calib_batches, self.recipe.observer)
        #: the layers, first/last policy, attention points and per-layer widths (the widths come from ``bits``)
        self.target = ptq_target(target, "PostTrainingQuantization")
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.export_formats = normalize_export_formats(export)
        if parity_batches is not None and (isinstance(parity_batches, bool) or not isinstance(parity_batches, int) or parity_batches < 1):
            raise ValueError(f"parity_batches must be None (all) or a positive int, got {parity_batches!r}")
        self.parity_batches = parity_batches
        for name, flag in (("progress", progress), ("print_report", print_report), ("overwrite", overwrite)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise ValueError(f"save_dir must be None or a path, got {save_dir!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
            raise ValueError(f"budget must be None or a number of bits per weight, got {budget!r}")
        if isinstance(plan_images, bool) or not isinstance(plan_images, int) or plan_images < 1:
            raise ValueError(f"plan_images must be a positive int, got {plan_images!r}")
        #: a mixed-precision plan's budget (bits per weight; None: no plan), its widths and its images
        self.budget = None if budget is None else float(budget)
        self.bits_choices = parse_bits_choices(bits_choices)
        self.plan_images = plan_images
        if sensitivity_bits is not None and (isinstance(sensitivity_bits, bool) or sensitivity_bits not in range(2, 9)):
            raise ValueError(f"sensitivity_bits must be None or an int in [2, 8], got {sensitivity_bits!r}")
        #: also analyse per-layer sensitivity at this width at the end of fit (files beside the report, loggers)
        self.sensitivity_bits = sensitivity_bits
        self.sensitivity_images = sensitivity_images
        self.sensitivity: SensitivityReport | None = None
        self.calib_batches = calib_batches
        self.stage = stage
        self.save_dir = save_dir
        self.export = export
        self.progress = progress
        self.print_report = print_report
        self.overwrite = overwrite
        self.report: PTQReport | None = None
        self.files: dict[str, Path] = {}

    @staticmethod
    def _resolve_recipe(recipe: Any, legacy: dict[str, Any]) -> PTQRecipe:
        """run_ptq's rule (:func:`~flatq_lightning.ptq.runner._recipe_from_args`), its warning naming this class."""
        recipe = plain_recipe(recipe)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rcp = _recipe_from_args(recipe, legacy)
            except (TypeError, KeyError) as err:  # e.g. a field given a value of the wrong kind
                raise ValueError(f"PostTrainingQuantization(recipe={recipe!r}): {err}") from None
        for w in caught:
            msg = str(w.message)
            if issubclass(w.category, FutureWarning):
                msg = msg.replace("run_ptq(", "PostTrainingQuantization(", 1)
            warnings.warn(msg, w.category, stacklevel=3)
        return rcp

    # the recipe's fields under their pre-recipe names (read-only)
    @property
    def observer(self) -> str:
        return self.recipe.observer

    @property
    def act_observer(self) -> str | None:
        return self.recipe.act_observer

    @property
    def bn_reestimate(self) -> bool:
        return self.recipe.bn_reestimate

    @property
    def bn_batches(self) -> int:
        return self.recipe.bn_batches

    # direct use ---------------------------------------------------------------------------------------------
    def run(
        self,
        module: nn.Module,
        calib_loader: Iterable[Any],
        eval_loader: Iterable[Any],
        device: str | torch.device | None = None,
        save_dir: str | os.PathLike | None = None,
        bn_transform: Any = None,
    ) -> PTQReport:
        """PTQ with this callback's settings on ``module`` (a LightningModule or a plain ``nn.Module``).

        Writes the report files (and exports) to ``save_dir`` or the callback's ``save_dir`` when one is set.
        """
        out = save_dir if save_dir is not None else self.save_dir
        if self.export_formats and out is None:
            rank_zero_warn(f"PostTrainingQuantization(export={self.export!r}) has no save_dir: nothing is exported")
        plan = None
        if self.budget is not None:  # predicted on the first images of the (held-out) evaluation split
            plan = plan_mixed_precision(module, take_images(eval_loader, self.plan_images), self.budget,
                                        self.bits_choices, self.recipe, self.target)
        report = run_ptq(
            module,
            calib_loader,
            eval_loader,
            plan=plan,
            bits=self.bits,
            calib_batches=self.calib_batches,
            recipe=self.recipe,
            target=self.target,
            device=device,
            progress=self.progress,
            export_dir=out if self.export_formats else None,
            export_formats=self.export_formats,
            overwrite=self.overwrite,
            parity_batches=self.parity_batches,
            bn_transform=bn_transform,
        )
        self.report = report
        self.files = report.write(out, overwrite=self.overwrite) if out is not None else {}
        return report

    # Lightning hooks ----------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """This callback's settings as flat logger hyperparameters (``ptq/bits``, ``ptq/recipe``, ``ptq/observer``,
        …; the recipe's as in :func:`recipe_settings`)."""
        return {
            "ptq/bits": ",".join(self.bits),
            "ptq/calib_batches": self.calib_batches,
            **recipe_settings(self.recipe),
            "ptq/keep_first_last_8bit": self.target.keep_first_last_8bit,
            "ptq/stage": self.stage,
            "ptq/include": ",".join(self.target.include),
            "ptq/exclude": ",".join(self.target.exclude),
            "ptq/attention_points": self.target.attention_points,
            "ptq/export": ",".join(self.export_formats),
            "ptq/budget": "" if self.budget is None else self.budget,
        }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_settings(trainer, self.settings())  # known before the fit: logged with the model's hyperparameters
        if "onnx" in self.export_formats:

            require_onnx("PostTrainingQuantization(export='onnx')")  # fail before training, not after it
        # fail before training, not after it, when the evaluation stage has no data
        if (
            _data_source(trainer, self.stage) is not None
            and _find_loader(trainer, pl_module, self.stage, instantiate=False) is None
        ):
            raise _missing(self.stage, stage_arg=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        eval_loader = _find_loader(trainer, pl_module, self.stage)
        if eval_loader is None:
            raise _missing(self.stage, stage_arg=True)
        calib_loader = _find_loader(trainer, pl_module, "train")
        if calib_loader is None:
            raise _missing("train", stage_arg=False)
        # log_dir broadcasts under DDP: every rank asks, rank zero works. Without a logger, not the bare
        # default_root_dir (the current directory by default): a folder of its own, like Lightning's checkpoints/
        if self.save_dir is not None:
            save_dir = self.save_dir
        elif trainer.loggers:
            save_dir = trainer.log_dir or trainer.default_root_dir
        else:
            save_dir = os.path.join(trainer.default_root_dir, "ptq_reports")
        if not trainer.is_global_zero:
            return
        # the strategy moved the module to the CPU at teardown; the copies run on the training device
        dm = trainer.datamodule
        augment = getattr(dm, "augment_batch", None) if getattr(dm, "augment", False) else None
        report = self.run(
            pl_module, calib_loader, eval_loader, device=trainer.strategy.root_device, save_dir=save_dir,
            bn_transform=augment,
        )
        # accuracies, per-layer SQNR, settings and the plot (to the loggers that take images)
        report.log_to(trainer.loggers, step=trainer.global_step, image_path=self.files.get("png"))
        if self.sensitivity_bits is not None:  # which layer costs the accuracy: files beside the report, loggers
            b = self.sensitivity_bits
            held_out = take_images(eval_loader, self.sensitivity_images)  # half predicts, the other half measures
            predict = [(x[: len(y) // 2], y[: len(y) // 2]) for x, y in held_out if len(y) >= 2]
            measure = [(x[len(y) // 2:], y[len(y) // 2:]) for x, y in held_out if len(y) >= 2]
            self.sensitivity = analyze_sensitivity(
                ptq_network(pl_module), take_images(calib_loader, self.calib_batches * 128), predict, measure, (b,),
                (b,), recipe=self.recipe, target=self.target, progress=self.progress)
            self.sensitivity.save(save_dir, overwrite=self.overwrite)
            self.sensitivity.log_to(trainer.loggers)
        if self.print_report:
            _print(report.markdown_table())
            if any(r.exports for r in report.rows):
                _print(report.export_table())
            if self.files:
                _print(f"PTQ report: {', '.join(str(f) for f in self.files.values())}")
