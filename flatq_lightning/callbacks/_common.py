"""Helpers shared by the callbacks: seeding, argument checks, settings logging, BN re-estimation on training data."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch

from ..quant.bn import reestimate_bn
from ..quant.hooks import hooks_suspended
from ..quant.quantize import batch_inputs
from ..utils.logging import describe

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


def recorder_settings(recorder: object) -> dict[str, object]:
    """The target quantizer and statistics settings of a QuantErrorRecorder, as ``dnq/...`` hyperparameters."""
    target = getattr(recorder, "target", None)
    w, a = getattr(target, "weight", None), getattr(target, "act", None)
    return {
        "dnq/preset": describe(getattr(recorder, "name", None)),
        "dnq/weight_spec": describe(w),
        "dnq/act_spec": describe(a),
        "dnq/stats_every": describe(getattr(recorder, "stats_every", None)),
        "dnq/momentum": describe(getattr(recorder, "momentum", None)),
        "dnq/keep_first_last_8bit": describe(getattr(target, "keep_first_last_8bit", None)),
        "dnq/include": describe(getattr(target, "include", ())) or "",
        "dnq/exclude": describe(getattr(target, "exclude", ())) or "",
        "dnq/placement": describe(getattr(recorder, "placement", "layer_inputs")),
    }


