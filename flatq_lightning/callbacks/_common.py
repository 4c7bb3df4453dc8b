"""Helpers shared by the callbacks: seeding, argument checks, settings logging, BN re-estimation on training data."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch

from ..quant.hooks import hooks_suspended

_MASK64 = (1 << 64) - 1


def splitmix64(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (e.g. base seed, step, layer): cheap and host-only."""
    z = 0x9E3779B97F4A7C15
    for k in keys:
        z = (z + (int(k) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z = z ^ (z >> 31)
    return z & ((1 << 63) - 1)


def _train_loader(trainer: Any) -> Any:
    loader = getattr(trainer, "train_dataloader", None)
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return loader


@torch.no_grad()
def reestimate_bn_on_training_data(trainer: Any, pl_module: Any, num_batches: int, seed: int = 0) -> int:
    """Re-estimate ``pl_module``'s BatchNorm statistics on ``num_batches`` training batches, as training saw
    them (the module's and datamodule's batch-transfer hooks, hence the on-device augmentation), with every
    flatq hook suspended. Returns the number of batches (0, with a warning, when there is no training data).

    The batches come from a private loader over the training dataset with its own generator, inside
    ``torch.random.fork_rng``: the training run's data order and random streams are left exactly as they were.
    """
    from lightning.pytorch.utilities import rank_zero_warn
    from torch.utils.data import DataLoader, IterableDataset

    from ..quant.bn import reestimate_bn
    from ..quant.quantize import batch_inputs

    loader = _train_loader(trainer)
    if loader is None:
        rank_zero_warn("flatq: no training dataloader at the end of fit: BatchNorm statistics were not re-estimated")
        return 0
    ds = getattr(loader, "dataset", None)
    devices = [torch.cuda.current_device()] if pl_module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), hooks_suspended():
        torch.manual_seed(seed)
        if ds is not None and not isinstance(ds, IterableDataset) and isinstance(loader, DataLoader):
            g = torch.Generator().manual_seed(seed)
            source = DataLoader(ds, batch_size=loader.batch_size or 1, shuffle=True, generator=g,
                                collate_fn=loader.collate_fn, num_workers=0)
        else:
            source = loader
        device = pl_module.device

        def batches() -> Iterator[Any]:
            for batch in itertools.islice(source, num_batches):
                batch = pl_module._apply_batch_transfer_handler(batch, device=device, dataloader_idx=0)
                yield batch_inputs(batch)

        # the module's own forward when it has one, else its network (a LightningModule need not define forward)
        from lightning.pytorch.utilities.model_helpers import is_overridden

        net = pl_module if is_overridden("forward", pl_module) else getattr(pl_module, "model", None)
        if not isinstance(net, torch.nn.Module):
            rank_zero_warn(
                f"flatq: {type(pl_module).__name__} defines no forward and has no `model` network: BatchNorm "
                "statistics were not re-estimated"
            )
            return 0
        try:
            return reestimate_bn(net, batches())
        except ValueError:
            rank_zero_warn("flatq: the training dataloader is empty: BatchNorm statistics were not re-estimated")
            return 0
def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an int, or ``TypeError``/``ValueError`` naming ``name`` (bools and strings are refused)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is True or False; otherwise ``TypeError`` naming ``name`` (``"no"`` is not False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_scale_value(name: str, value: object) -> None:
    """A noise scale: a finite number >= 0 or a callable of the step (checked again where it is used)."""
    import math

    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0 or a callable of the step, got {value!r}")
def describe(value: object) -> object:
    """A logger-friendly hyperparameter: numbers, strings and bools as they are, anything else as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return ",".join(str(v) for v in value)
    return repr(value)


def recorder_settings(recorder: object) -> dict[str, object]:
    """The target quantizer and statistics settings of a QuantErrorRecorder, as ``dnq/...`` hyperparameters."""
    w, a = getattr(recorder, "weight_spec", None), getattr(recorder, "act_spec", None)
    return {
        "dnq/preset": describe(getattr(recorder, "name", None)),
        "dnq/weight_spec": describe(w),
        "dnq/act_spec": describe(a),
        "dnq/stats_every": describe(getattr(recorder, "stats_every", None)),
        "dnq/momentum": describe(getattr(recorder, "momentum", None)),
        "dnq/keep_first_last_8bit": describe(getattr(recorder, "keep_first_last_8bit", None)),
        "dnq/include": describe(getattr(recorder, "include", None)) or "",
        "dnq/exclude": describe(getattr(recorder, "exclude", None)) or "",
    }


#: the hooks that run before Lightning logs the module's and data module's hyperparameters (``Trainer._run``:
#: setup, configure_model, on_fit_start, then ``_log_hyperparams``)
_BEFORE_AUTOLOG = ("setup", "configure_model", "on_fit_start")


def _autolog_pending(trainer: object) -> bool:
    """Whether Lightning is still to log the module's/data module's hyperparameters in this run: a callback is
    in one of the hooks before that call, and the Trainer and the module (or the data module) let it log."""
    if not getattr(trainer, "enable_autolog_hparams", True):
        return False
    module = getattr(trainer, "lightning_module", None)
    if module is None or getattr(module, "_current_fx_name", None) not in _BEFORE_AUTOLOG:
        return False
    dm = getattr(trainer, "datamodule", None)
    return bool(getattr(module, "_log_hyperparams", True) or getattr(dm, "_log_hyperparams", False))


def _hold(logger: Any, settings: dict[str, object]) -> None:
    """Keep ``settings`` for ``logger``'s next ``log_hyperparams`` call (Lightning's own, at fit start): that one
    call then sends the module's hyperparameters and every callback's settings together."""
    pending = logger.__dict__.get("_flatq_pending_settings")
    if pending is None:
        pending = {}
        before = logger.__dict__.get("log_hyperparams")  # an instance attribute someone else set, else None
        send = logger.log_hyperparams

        def log_hyperparams(params: Any, *args: Any, **kwargs: Any) -> Any:
            from lightning.fabric.utilities.logger import _convert_params

            if before is None:
                del logger.log_hyperparams  # back to the class's method: this runs once
            else:
                logger.log_hyperparams = before
            held = logger.__dict__.pop("_flatq_pending_settings", {})
            return send({**(_convert_params(params) or {}), **held}, *args, **kwargs)

        logger.log_hyperparams = log_hyperparams
        logger.__dict__["_flatq_pending_settings"] = pending
    pending.update(settings)


def log_settings(trainer: object, settings: dict[str, object]) -> None:
    """Add ``settings`` to every logger's hyperparameters (each logger writes on rank zero only).

    From the hooks before Lightning logs the module's hyperparameters (``setup``, ``on_fit_start``), the settings
    are held and go out with Lightning's own ``log_hyperparams`` call: one write holds the module's, the data
    module's and every callback's settings, which is what TensorBoard's HPARAMS view shows (it reads the first
    hyperparameter summary of a run only). Later, or when Lightning does not log hyperparameters
    (``enable_autolog_hparams=False``, ``save_hyperparameters(logger=False)``), the merged set is sent at once;
    CSV and the other loggers merge it into what they have.
    """
    from ..ptq.report import log_hyperparams

    hold = _autolog_pending(trainer)
    for logger in getattr(trainer, "loggers", None) or []:
        if hold:
            try:
                _hold(logger, settings)
                continue
            except (AttributeError, TypeError):  # a logger that takes no instance attributes: write now
                pass
        log_hyperparams(logger, settings)


def log_every_n_steps(trainer: object, step: int) -> bool:
    """Whether ``step`` is one the Trainer writes logs on (Lightning's rule: ``(step + 1) % log_every_n_steps
    == 0``): per-step values are logged only then, so that logging a Python number costs no host-device copy
    on the other steps."""
    n = int(getattr(trainer, "log_every_n_steps", 1) or 1)
    return (step + 1) % n == 0
