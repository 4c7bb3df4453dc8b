"""BatchNorm running statistics: read, restore and re-estimate them (no Lightning here).

Under weight and activation noise the BN running statistics describe the *noisy* network. The clean FP
network wants statistics measured on its clean weights, the quantized network statistics measured with its
quantizers on (AIMET's "BN re-estimation"). :func:`reestimate_bn` is ``torch.optim.swa_utils.update_bn``
for any forward: running statistics reset, then a cumulative average over the given batches, with only the
BatchNorm layers in training mode, so dropout, observers and noise hooks that look at ``module.training``
stay off, and no weight changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.batches import batch_inputs

__all__ = ["BN_TYPES", "bn_state", "load_bn_state", "reestimate_bn"]

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _bns(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, BN_TYPES) and m.track_running_stats
        and m.running_mean is not None
    ]


def bn_state(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """A copy of every BatchNorm's running statistics: ``{bn_name: {running_mean, running_var, num_batches_tracked}}``."""
    out: dict[str, dict[str, Tensor]] = {}
    for n, m in _bns(model):
        out[n] = {"running_mean": m.running_mean.detach().clone(), "running_var": m.running_var.detach().clone()}
        if m.num_batches_tracked is not None:
            out[n]["num_batches_tracked"] = m.num_batches_tracked.detach().clone()
    return out


@torch.no_grad()
def load_bn_state(model: nn.Module, state: dict[str, dict[str, Tensor]]) -> None:
    """Copy running statistics from :func:`bn_state` into ``model``'s BatchNorms (by name, in place)."""
    mods = dict(_bns(model))
    missing = [n for n in state if n not in mods]
    if missing:
        raise ValueError(f"load_bn_state: the model has no BatchNorm named {missing[:4]}")
    for n, buffers in state.items():
        m = mods[n]
        for k, v in buffers.items():
            getattr(m, k).copy_(v.to(getattr(m, k).device))


@torch.no_grad()
def reestimate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    max_batches: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (in place); returns the batch count.

    Statistics are reset and replaced by the cumulative average over the batches (``momentum=None``), like
    ``torch.optim.swa_utils.update_bn``. Only the BatchNorm layers run in training mode; everything else stays
    in eval mode, and the modes and momenta are restored afterwards. ``transform`` is applied to each input
    batch (for example the training augmentation, so the statistics see the inputs training saw).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> reestimate_bn(net, [torch.randn(16, 3) + 5.0])
        1
        >>> bool(net[1].running_mean.abs().sum() > 0)
        True
    """

    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    bns = [m for _, m in _bns(model)]
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    saved = bn_state(model)  # put back if no batch comes (or the forward fails)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            x = batch_inputs(batch).to(device)
            if transform is not None:
                x = transform(x)
            model(x)
            n += 1
    except BaseException:
        load_bn_state(model, saved)
        raise
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, mode in modes.items():
            m.train(mode)
    if n == 0:
        load_bn_state(model, saved)
        raise ValueError("reestimate_bn: the batches are empty, no statistics were measured")
    return n
