"""Post-training quantization at several bit-widths, evaluated against the FP network: :func:`run_ptq`.

The plain-function core behind the ``PostTrainingQuantization`` callback and the ``flatq-ptq`` command. It
never mutates the model it is given: BatchNorm is folded into a copy, every bit-width is quantized from that
copy with :func:`~flatq_lightning.quant.quantize_model`, calibrated on the same cached calibration batches,
and evaluated (top-1/top-5, torchmetrics, micro average) on the same evaluation data as the FP network.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..quant import (
    batch_inputs,
    fake_quantize,
    first_last_names,
    fold_batchnorm,
    quantize_model,
    quantized_layers,
    reestimate_bn_quantized,
    sqnr_db,
)
from ..quant.hooks import hooks_suspended
from ..quant.reconstruct import reconstruct
from ..quant.spec import FLOAT_BITS, OBSERVERS
from ..quant.targets import QuantTarget
from ..utils.progress import status
from . import onnx_export  # onnx_export.export_onnx: looked up at call time (tests replace it)
from .evaluate import _logits, _model_device, _progress, evaluate_topk
from .export import normalize_export_formats, save_quantized
from .recipe import RECIPES, PTQRecipe, resolve_recipe
from .report import LayerSQNR, PTQReport, PTQRow, free_path

__all__ = [
    "DEFAULT_BITS",
    "FLOAT_BITS",
    "evaluate_topk",
    "ptq_network",
    "check_ptq_network",
    "run_ptq",
    "validate_ptq_args",
]

#: the bit-widths reported by default
DEFAULT_BITS: tuple[str, ...] = ("w8a8", "w4a8", "w4a4", "w3a3", "w2a4")


def _presets(bits: str | Iterable[str]) -> tuple[str, ...]:
    """Validated, canonical (``"w4a4"``), de-duplicated bit-width presets in the given order
    (:meth:`QuantTarget.preset` reads each: a ``ValueError`` naming the form and the range)."""
    if isinstance(bits, str):
        bits = (bits,)
    try:
        items = list(bits)
    except TypeError:
        raise ValueError(
            f"bits must be a sequence of presets like ('w8a8', 'w4a4', 'w4a16'), got {bits!r}"
        ) from None
    if not items:
        raise ValueError(
            "bits is empty: name at least one bit-width preset 'w<bits>a<bits>', e.g. "
            f"{DEFAULT_BITS} (a side at {FLOAT_BITS} bits stays float: 'w4a16' is weight-only)"
        )
    out: list[str] = []
    for b in items:
        name = QuantTarget.preset(b).name
        if name not in out:
            out.append(name)
    return tuple(out)


def ptq_target(target: QuantTarget | None, what: str = "run_ptq") -> QuantTarget:
    """The scope template of a PTQ run: ``target`` (``None``: :class:`QuantTarget`'s defaults). Its widths come
    from ``bits`` (:meth:`QuantTarget.at`), so a preset string is refused with the way to say what is meant."""
    if target is None:
        return QuantTarget()
    if not isinstance(target, QuantTarget):
        hint = (f": PTQ's bit-widths are its bits ({what}(bits=[{target!r}])), the target only gives the layers and "
                "the first/last policy") if isinstance(target, str) else ""
        raise ValueError(f"{what}: target must be a QuantTarget or None, got {target!r}{hint}")
    return target


def validate_ptq_args(bits: str | Iterable[str], calib_batches: int, observer: str) -> tuple[str, ...]:
    """Check the PTQ options (``ValueError`` naming the allowed values); returns the canonical bit-widths."""
    norm = _presets(bits)
    if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
        raise ValueError(f"calib_batches must be a positive int (number of calibration batches), got {calib_batches!r}")
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    return norm


def ptq_network(module: nn.Module) -> nn.Module:
    """The network PTQ works on: a LightningModule's ``model`` attribute if it is a module, else ``module``."""
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover - lightning is a dependency
        LightningModule = ()  # type: ignore[assignment]  # noqa: N806
    inner = getattr(module, "model", None) if isinstance(module, LightningModule) else None
    return inner if isinstance(inner, nn.Module) else module


@torch.no_grad()
def check_ptq_network(module: nn.Module, net: nn.Module, eval_loader: Iterable[Any]) -> bool:
    """Warn when ``module(x)`` is not ``net(x)`` on the first evaluation batch: then PTQ would measure only a part of
    what the module computes (e.g. ``forward = head(self.model(x))``). Returns True when they agree.

    Both run in eval mode on the module's device with the noise/recorder hooks suspended; every submodule's
    train/eval flag is restored afterwards.
    """
    from lightning.pytorch.utilities.model_helpers import is_overridden

    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover - lightning is a dependency
        LightningModule = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(module, LightningModule) and not is_overridden("forward", module, parent=LightningModule):
        return True  # no forward of its own (Lightning does not require one): the network is all there is
    x = batch_inputs(next(iter(eval_loader)))
    x = x.to(_model_device(module))
    modes = [(m, m.training) for m in module.modules()]
    why = ""
    try:
        module.eval()
        with hooks_suspended():
            full = module(x)
            try:
                part = net(x)
            except Exception as err:  # noqa: BLE001 - any failure means the inner model is not the network
                part, why = None, f"calling it on the batch fails ({type(err).__name__}: {err})"
        if part is not None:
            try:
                a, b = _logits(full), _logits(part)
            except ValueError as err:
                a = b = None
                why = str(err)
            if a is not None and b is not None:
                if a.shape != b.shape:
                    why = f"its output has shape {tuple(b.shape)}, the module's {tuple(a.shape)}"
                elif not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5):
                    why = f"its output differs from the module's by up to {float((a.float() - b.float()).abs().max()):.3g}"
    finally:
        for m, mode in modes:
            m.train(mode)
    if why:
        warnings.warn(
            f"run_ptq quantizes {type(module).__name__}.model ({type(net).__name__}), but it is not the whole "
            f"network: on the first evaluation batch {why}. The PTQ report would measure only that part. Pass "
            f"the full network to run_ptq (an nn.Module whose forward is the module's), or make "
            f"{type(module).__name__}.model the whole network",
            UserWarning,
            stacklevel=3,
        )
        return False
    return True


def _check_loader(loader: Any, what: str) -> None:
    if loader is None:
        raise ValueError(f"run_ptq: {what} is None: pass a DataLoader (or any iterable of batches)")
    try:
        n = len(loader)
    except TypeError:
        return
    if n == 0:
        raise ValueError(f"run_ptq: {what} is empty (len 0)")


@torch.no_grad()
def _layer_sqnr(qmodel: nn.Module, x: Tensor | None, device: torch.device) -> list[LayerSQNR]:
    """Weight SQNR from each layer; activation SQNR of each layer's input on the batch ``x``."""
    layers = quantized_layers(qmodel)
    act: dict[str, Tensor] = {}
    handles = []
    if x is not None:
        for name, layer in layers:
            if layer.act_spec is None:
                continue

            def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                inp = args[0]
                xq = fake_quantize(inp, mod.act_spec, mod.act_scale, mod.act_zero_point)
                act[name] = sqnr_db(inp, xq)

            handles.append(layer.register_forward_pre_hook(hook))
        try:
            if handles:
                qmodel(x.to(device, non_blocking=True))
        finally:
            for h in handles:
                h.remove()
    names = list(act)
    values = dict(zip(names, torch.stack([act[n] for n in names]).tolist())) if names else {}  # one sync
    out = []
    for name, layer in layers:
        ws, as_ = layer.weight_spec, layer.act_spec
        out.append(
            LayerSQNR(
                name=name,
                weight_bits=ws.bits if ws is not None else None,
                act_bits=as_.bits if as_ is not None else None,
                weight_sqnr_db=float(layer.weight_sqnr_db) if ws is not None else None,
                act_sqnr_db=values.get(name) if as_ is not None else None,
            )
        )
    return out


def _export(
    qmodel: nn.Module,
    bits: str,
    export_dir: Path,
    formats: Sequence[str],
    pairs: list[tuple[str, str]],
    meta: dict[str, Any],
    overwrite: bool,
    eval_loader: Iterable[Any],
    parity_batches: int | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """Write one quantized model in each format (never replacing a file unless ``overwrite``); ONNX files are
    followed by the parity check on the evaluation batches. A format that fails is reported (a warning, and
    ``{"format", "error"}`` in the row) instead of losing the whole PTQ run, e.g. after a long fit."""
    out: list[dict[str, Any]] = []
    for fmt in formats:
        target = free_path(export_dir / f"quantized_{bits}.{fmt}", overwrite=overwrite)
        try:
            if fmt == "safetensors":
                path = save_quantized(qmodel, target, folded_bn_pairs=pairs, metadata=meta, overwrite=overwrite)
                out.append({"format": fmt, "path": str(path), "bytes": path.stat().st_size})
            else:
                example = batch_inputs(next(iter(eval_loader)))[:1]
                path = onnx_export.export_onnx(qmodel, target, example, metadata=meta, overwrite=overwrite)
                parity = onnx_export.check_onnx_parity(qmodel, path, eval_loader, max_batches=parity_batches, progress=progress)
                out.append({"format": fmt, "path": str(path), "bytes": path.stat().st_size, **parity.to_dict()})
        except Exception as err:  # noqa: BLE001 - one failed file must not cost the report
            msg = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            warnings.warn(f"run_ptq: exporting {bits} as {fmt} to {target} failed: {msg}", UserWarning, stacklevel=3)
            out.append({"format": fmt, "path": str(target), "bytes": 0, "error": msg})
    return out


def _collect_calibration(loader: Iterable[Any], n: int, progress: bool, images: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """The inputs of the first ``n`` batches (kept, so every bit-width calibrates on the same data), and, when
    reconstruction needs ``images`` images, the further batches of the same pass that make them up:
    ``(calibration batches, extra batches)``."""
    it = iter(loader)
    bar = _progress(itertools.islice(it, n), progress, desc="calibration data", total=n, leave=False)
    calib = [batch_inputs(b) for b in bar]
    have = sum(int(b.shape[0]) for b in calib)
    extra: list[Tensor] = []
    while have < images:
        b = next(it, None)
        if b is None:
            break
        extra.append(batch_inputs(b))
        have += int(extra[-1].shape[0])
    return calib, extra


def _recipe_from_args(recipe: Any, legacy: dict[str, Any]) -> PTQRecipe:
    """The recipe in force: ``recipe`` with the pre-recipe keyword arguments (deprecated) laid over it."""
    given = {k: v for k, v in legacy.items() if v is not None}
    if given:
        warnings.warn(
            f"run_ptq({', '.join(f'{k}=' for k in given)}...) is deprecated and will be removed in the next release: "
            f"pass recipe=PTQRecipe.preset('practical', ...) or a preset name ({list(RECIPES)})",
            FutureWarning,
            stacklevel=3,
        )
        for k in ("observer", "act_observer"):
            if k in given and given[k] not in OBSERVERS:
                raise ValueError(f"{k} must be one of {OBSERVERS}, got {given[k]!r}")
        if "bn_reestimate" in given and not isinstance(given["bn_reestimate"], bool):
            raise ValueError(f"bn_reestimate must be True or False, got {given['bn_reestimate']!r}")
        if "bn_batches" in given and (isinstance(given["bn_batches"], bool) or not isinstance(given["bn_batches"], int)
                                      or given["bn_batches"] < 1):
            raise ValueError(f"bn_batches must be a positive int (number of BN re-estimation batches), got {given['bn_batches']!r}")
        base = resolve_recipe(recipe)
        name = base.name if recipe is not None else "custom"
        return base.replace(name=name, **given)
    return resolve_recipe(recipe)


def _recon_logger(progress: bool) -> Callable[[str], None] | None:
    if not progress:
        return None
    return status



def _gather_data(calib_loader: Iterable[Any], calib_batches: int, bn_loader: Iterable[Any] | None, rcp: PTQRecipe,
                 need_calib: bool, progress: bool) -> tuple[list[Tensor], Tensor | None, list[Tensor]]:
    """The calibration batches (one pass; the reconstruction's extra images come from the same pass), the
    reconstruction's input images, and the BN re-estimation batches (``bn_loader``, default the calibration
    loader), with the warnings and errors of too little data."""
    recon = rcp.reconstruction
    calib, extra = _collect_calibration(calib_loader, calib_batches, progress, recon.calib_images if recon else 0) \
        if need_calib else ([], [])
    recon_inputs = torch.cat(calib + extra)[: recon.calib_images] if recon is not None and calib else None
    if recon is not None and recon_inputs is not None and recon_inputs.shape[0] < recon.calib_images:
        warnings.warn(
            f"run_ptq: reconstruction asked for {recon.calib_images} calibration images, the calibration loader "
            f"has {recon_inputs.shape[0]}; reconstructing on those", UserWarning, stacklevel=3)
    if need_calib:
        if not calib:
            raise ValueError("run_ptq: calib_loader yielded no batches")
        if len(calib) < calib_batches:
            warnings.warn(
                f"run_ptq: the calibration loader has only {len(calib)} batch(es), fewer than "
                f"calib_batches={calib_batches}; calibrating on those {len(calib)}",
                UserWarning,
                stacklevel=3,
            )
    bn_data: list[Tensor] = []
    if rcp.bn_reestimate:
        if bn_loader is None:
            bn_loader = calib_loader
        _check_loader(bn_loader, "bn_loader")
        bn_data = [batch_inputs(b) for b in itertools.islice(bn_loader, rcp.bn_batches)]
        if not bn_data:
            raise ValueError("run_ptq: bn_loader yielded no batches for the BN re-estimation")
    return calib, recon_inputs, bn_data


def _quantized_copy(net: nn.Module, folded: nn.Module, target: QuantTarget, rcp: PTQRecipe, calib: list[Tensor],
                    bn_data: list[Tensor], recon_inputs: Tensor | None, dev: torch.device, progress: bool,
                    bn_transform: Callable[[Tensor], Tensor] | None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """One bit-width's quantized copy as the recipe makes it: BN re-estimated on the quantized network (then
    folded), weights quantized, activations calibrated at the recipe's placement, blocks reconstructed; returns
    the model and the reconstruction's per-block records."""
    b = target.name
    cal = _progress(calib, progress, desc=f"calibrate {b}", leave=False) if target.act is not None else None
    source = folded
    if rcp.bn_reestimate:
        reest = reestimate_bn_quantized(net, target, bn_data, calib_batches=calib or None, transform=bn_transform,
                                        placement=rcp.placement)
        source = fold_batchnorm(reest).to(dev)
        del reest
    qmodel = quantize_model(source, target, calib_batches=cal, placement=rcp.placement).to(dev)
    blocks: list[dict[str, Any]] = []
    if rcp.reconstruction is not None:
        res = reconstruct(qmodel, source, folded, recon_inputs, rcp.reconstruction, log=_recon_logger(progress),
                          desc=f"reconstruct {b}")
        blocks = [r.to_dict() for r in res]
    return qmodel, blocks


def run_ptq(
    model: nn.Module,
    calib_loader: Iterable[Any],
    eval_loader: Iterable[Any],
    bits: str | Iterable[str] = DEFAULT_BITS,
    calib_batches: int = 32,
    observer: str | None = None,
    target: QuantTarget | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    export_dir: str | os.PathLike | None = None,
    act_observer: str | None = None,
    bn_reestimate: bool | None = None,
    bn_batches: int | None = None,
    bn_loader: Iterable[Any] | None = None,
    bn_transform: Callable[[Tensor], Tensor] | None = None,
    evaluate_fp: bool = True,
    export_formats: str | Sequence[str] = "safetensors",
    overwrite: bool = False,
    parity_batches: int | None = None,
    export_metadata: dict[str, Any] | None = None,
    recipe: PTQRecipe | str | dict[str, Any] | None = None,
    plan: Any = None,
) -> PTQReport:
    """Fold BN, calibrate, quantize at each bit-width and evaluate top-1/top-5 against the FP network.

    How each copy is made is the ``recipe`` (:class:`~flatq_lightning.ptq.recipe.PTQRecipe` or a preset name:
    ``"minmax"`` (default), ``"practical"``, ``"reconstruct"``): observers, BN re-estimation, block
    reconstruction. ``observer``, ``act_observer``, ``bn_reestimate`` and ``bn_batches`` are the pre-recipe
    spelling of the same settings (deprecated: a ``FutureWarning``; given with a recipe, they override its fields).

    Args:
        model: the trained network, or a LightningModule (its ``model`` attribute is used when it is a module).
            Never mutated: not its weights, its train/eval mode nor its device.
        calib_loader: batches for the activation ranges (usually the train loader); the first
            ``calib_batches`` are used (fewer if it is shorter: one warning). Inputs are the batch tensor or
            its first element.
        eval_loader: ``(inputs, targets)`` batches on which the FP network and every quantized copy are
            evaluated.
        bits: presets ``"w<b>a<b>"``; a side at 16 bits stays float (``"w4a16"`` weight-only).
        plan: a mixed-precision plan (:func:`~flatq_lightning.ptq.mixed_precision.plan_mixed_precision`): each
            bit-width gets a second row, ``"<bits>-mixed"``, with every planned layer's weights at the plan's
            width (activations as the bit-width says); the report keeps the plan.
        target: what is quantized (:class:`~flatq_lightning.quant.targets.QuantTarget`; default ``QuantTarget()``):
            the layers (``include``/``exclude``), the first/last policy (``keep_first_last_8bit``: the first and
            last selected layer at, at least, 8 bits), attention points (on timm ViTs also quantize attention's Q,
            K, V and softmax output, the ViT-PTQ convention), per-layer widths (``layer_bits``) and the quantizer
            settings. Each bit-width is ``target.at(bits, recipe observers)``; its row is named after it
            (``"w4a4"``, ``"w4a4-mixed"`` with per-layer widths).
        recipe: the PTQ recipe. Its observers pick the weight range (``"minmax"``, ``"percentile"`` or ``"mse"``:
            MSE-optimal clipping searched per channel) and the activation ranges; with ``bn_reestimate`` the
            BatchNorm running statistics are re-estimated per bit-width on the quantized network (weights
            quantized, BN not yet folded, activation quantizers on) before folding and calibrating (AIMET's BN
            re-estimation; :func:`~flatq_lightning.quant.reestimate_bn_quantized`) over ``bn_batches`` batches of
            ``bn_loader``; with ``reconstruction`` each calibrated copy is then reconstructed block by block
            (:func:`~flatq_lightning.quant.reconstruct.reconstruct`) on ``reconstruction.calib_images`` images
            of ``calib_loader`` (the calibration batches and, if they are fewer, the next batches of the same pass).
        bn_loader: batches for the re-estimation (default: ``calib_loader``); give training batches, and the
            training augmentation as ``bn_transform``, so the statistics see what training saw.
        evaluate_fp: ``False`` skips the FP evaluation (when the caller has it already): the report's FP
            accuracies and the drops are then NaN.
        device: where the copies run (default: the model's device).
        progress: tqdm bars over calibration data, bit-widths and evaluation.
        export_dir: if given, each quantized model is saved there in each of ``export_formats``:
            ``quantized_<bits>.safetensors`` (packed integer weights, :func:`~flatq_lightning.ptq.export.save_quantized`)
            and/or ``quantized_<bits>.onnx`` (QuantizeLinear/DequantizeLinear,
            :func:`~flatq_lightning.ptq.onnx_export.export_onnx`, needs the ``[onnx]`` extra), each followed by
            the parity check: ONNX Runtime and the flatq model on the evaluation batches (the first
            ``parity_batches``; default all), top-1 of both and the largest logit difference. The files and the
            parity numbers are in each row's ``exports``. An existing file is kept and the new one numbered
            (``quantized_<bits>_2.onnx``) unless ``overwrite``. ``export_metadata`` (JSON-serialisable, e.g. the
            input normalisation) goes into every file with the bit-width and the PTQ settings.

    Returns:
        a :class:`~flatq_lightning.ptq.report.PTQReport`.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        >>> data = DataLoader(TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))), batch_size=16)
        >>> rep = run_ptq(net, data, data, bits=("w8a8", "w4a4"), calib_batches=2, progress=False)
        >>> rep.bits, rep.folded_bn_pairs
        (['w8a8', 'w4a4'], [('0', '1')])
    """
    t0 = time.perf_counter()
    rcp = _recipe_from_args(recipe, {"observer": observer, "act_observer": act_observer,
                                     "bn_reestimate": bn_reestimate, "bn_batches": bn_batches})
    observer, act_observer, bn_reestimate, bn_batches = rcp.observer, rcp.act_observer, rcp.bn_reestimate, rcp.bn_batches
    recon = rcp.reconstruction
    bits_t = validate_ptq_args(bits, calib_batches, observer)
    template = ptq_target(target)
    act_obs = rcp.act_obs
    targets = _ptq_targets(template, bits_t, observer, act_obs, plan)
    inc, exc = list(template.include) or None, list(template.exclude) or None
    formats = normalize_export_formats(export_formats) if export_dir is not None else ()
    need_calib = any(t.act is not None for t in targets) or recon is not None
    _check_run_args(overwrite, parity_batches, formats, eval_loader, calib_loader if need_calib else None)
    net = ptq_network(model)
    if net is not model:
        check_ptq_network(model, net, eval_loader)
    dev = torch.device(device) if device is not None else _model_device(net)
    timing: dict[str, float] = {}

    t = time.perf_counter()
    folded, pairs = fold_batchnorm(net, return_pairs=True)  # an eval-mode copy
    folded.to(dev)
    selected = template.select(folded, points=True)
    if not selected:
        raise ValueError(
            f"run_ptq: the model has no quantizable layers (Conv1d/2d/3d, Linear) matching include={inc!r} exclude={exc!r}"
        )
    kept = [n for n, _ in selected if n in first_last_names(selected)] if template.keep_first_last_8bit else []
    timing["fold_s"] = time.perf_counter() - t

    t = time.perf_counter()
    calib, recon_inputs, bn_data = _gather_data(calib_loader, calib_batches, bn_loader, rcp, need_calib, progress)
    timing["calib_data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    n_eval, num_classes = 0, 0
    fp_acc = {1: float("nan"), 5: float("nan")}
    if evaluate_fp:
        fp_model = copy.deepcopy(net).eval().to(dev)
        fp_acc, n_eval, num_classes = evaluate_topk(fp_model, eval_loader, dev, progress=progress, desc="eval fp")
        del fp_model
    timing["fp_eval_s"] = time.perf_counter() - t

    run = _Run(net, folded, pairs, rcp, calib, bn_data, recon_inputs, dev, progress, bn_transform, eval_loader,
               formats, export_dir, export_metadata, overwrite, parity_batches, fp_acc)
    rows: list[PTQRow] = []
    bar = _progress(targets, progress, desc="PTQ", total=len(targets))
    for bt in bar:
        row, n_q, c_q = _row(run, bt)
        n_eval, num_classes = n_eval or n_q, num_classes or c_q
        rows.append(row)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({row.bits: f"{row.top1:.2f}"})
    timing["quantize_s"] = sum(r.quantize_seconds for r in rows)
    timing["eval_s"] = sum(r.eval_seconds for r in rows) + timing["fp_eval_s"]
    timing["total_s"] = time.perf_counter() - t0
    return PTQReport(
        fp_top1=fp_acc[1],
        fp_top5=fp_acc[5],
        rows=rows,
        folded_bn_pairs=[tuple(p) for p in pairs],
        kept_8bit=kept,
        keep_first_last_8bit=template.keep_first_last_8bit,
        observer=observer,
        act_observer=act_obs,
        bn_reestimate=bn_reestimate,
        bn_batches=len(bn_data),
        include=inc,
        exclude=exc,
        calib_batches=len(calib),
        calib_batches_requested=calib_batches,
        num_eval_samples=n_eval,
        num_classes=num_classes,
        top5_k=min(5, num_classes),
        device=str(dev),
        timing=timing,
        recipe=rcp.to_dict(),
        plan=plan.to_dict() if plan is not None else None,
    )


def _ptq_targets(template: QuantTarget, bits: Sequence[str], observer: str, act_obs: str, plan: Any) -> list[QuantTarget]:
    """The target of each row: each bit-width, then (with a plan) each bit-width with the plan's weight widths."""
    targets = [template.at(b, observer, act_obs) for b in bits]
    if plan is not None:
        if not hasattr(plan, "layer_bits") or not hasattr(plan, "to_dict"):
            raise ValueError(f"plan must be a MixedPrecisionPlan (plan_bits / plan_mixed_precision), got {plan!r}")
        targets += [t.with_layer_bits(plan.layer_bits()) for t in targets]
    return targets


def _check_run_args(overwrite: Any, parity_batches: Any, formats: Sequence[str], eval_loader: Any,
                    calib_loader: Any) -> None:
    """run_ptq's checks that need no model (before any PTQ work); ``calib_loader`` None: not needed."""
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    if parity_batches is not None and (isinstance(parity_batches, bool) or not isinstance(parity_batches, int) or parity_batches < 1):
        raise ValueError(f"parity_batches must be None (all) or a positive int, got {parity_batches!r}")
    if "onnx" in formats:
        onnx_export.require_onnx("run_ptq(export_formats=('onnx',))")
    _check_loader(eval_loader, "eval_loader")
    if calib_loader is not None:
        _check_loader(calib_loader, "calib_loader")


@dataclass
class _Run:
    """What every row of one run_ptq call shares."""

    net: nn.Module
    folded: nn.Module
    pairs: list[tuple[str, str]]
    rcp: PTQRecipe
    calib: list[Tensor]
    bn_data: list[Tensor]
    recon_inputs: Any
    dev: torch.device
    progress: bool
    bn_transform: Callable[[Tensor], Tensor] | None
    eval_loader: Iterable[Any]
    formats: Sequence[str]
    export_dir: str | os.PathLike | None
    export_metadata: dict[str, Any] | None
    overwrite: bool
    parity_batches: int | None
    fp_acc: dict[int, float]


def _row(run: _Run, bt: QuantTarget) -> tuple[PTQRow, int, int]:
    """One bit-width: the quantized copy (recipe), its per-layer SQNR, its accuracy, its exports."""
    t = time.perf_counter()
    b, rcp = bt.name, run.rcp
    qmodel, blocks = _quantized_copy(run.net, run.folded, bt, rcp, run.calib, run.bn_data, run.recon_inputs, run.dev,
                                     run.progress, run.bn_transform)
    layers = _layer_sqnr(qmodel, run.calib[0] if (bt.act is not None and run.calib) else None, run.dev)
    t_q = time.perf_counter() - t
    t = time.perf_counter()
    acc, n_q, c_q = evaluate_topk(qmodel, run.eval_loader, run.dev, progress=run.progress, desc=f"eval {b}")
    t_e = time.perf_counter() - t
    exports = []
    if run.formats:
        meta = {**(run.export_metadata or {}), "bits": b, "recipe": rcp.name, "observer": rcp.observer,
                "act_observer": rcp.act_obs, "bn_reestimate": rcp.bn_reestimate,
                "reconstructed": rcp.reconstruction is not None, "top1": round(acc[1], 4), "top5": round(acc[5], 4)}
        exports = _export(qmodel, b, Path(run.export_dir), run.formats, run.pairs, meta, run.overwrite,
                          run.eval_loader, run.parity_batches, run.progress)
    del qmodel
    row = PTQRow(
        bits=b,
        weight_bits=bt.weight.bits if bt.weight is not None else FLOAT_BITS,
        act_bits=bt.act.bits if bt.act is not None else FLOAT_BITS,
        top1=acc[1],
        top5=acc[5],
        drop_top1=run.fp_acc[1] - acc[1],
        drop_top5=run.fp_acc[5] - acc[5],
        layers=layers,
        quantize_seconds=t_q,
        eval_seconds=t_e,
        bn_reestimated=rcp.bn_reestimate,
        exports=exports,
        recipe=rcp.name,
        reconstruction=blocks,
    )
    return row, n_q, c_q
