"""Evaluation helpers shared by PTQ and the ONNX parity check: a model's device, the targets and logits of a
batch, progress over batches, top-k accuracy."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.batches import batch_inputs
from ..utils.progress import progress

__all__ = ["evaluate_topk", "top1_and_loss"]


def _model_device(model: nn.Module) -> torch.device:
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _batch_targets(batch: Any) -> Tensor:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    if isinstance(batch, dict):
        for key in ("y", "target", "targets", "label", "labels"):
            if key in batch and isinstance(batch[key], Tensor):
                return batch[key]
    raise ValueError(
        f"cannot find the targets in an evaluation batch of type {type(batch).__name__}: expected "
        "(inputs, targets, ...) or a dict with key 'y'/'target'/'label'/'labels'"
    )


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ValueError(f"the model returned {type(out).__name__}: expected logits (a Tensor of shape (N, C))")


def _progress(iterable: Iterable[Any], enabled: bool, **kw: Any) -> Iterable[Any]:
    # a tqdm bar on a terminal, a few plain lines in a log (no escape codes from nested bars)

    unit = "bit-widths" if kw.get("desc") == "PTQ" else "batches"  # the outer loop is over bit-widths
    return progress(iterable, enabled=enabled, unit=unit, **kw)


@torch.no_grad()
def evaluate_topk(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    ks: Sequence[int] = (1, 5),
    progress: bool = False,
    desc: str = "eval",
) -> tuple[dict[int, float], int, int]:
    """Top-k accuracies in percent (torchmetrics ``MulticlassAccuracy``, micro average) of ``model`` on ``loader``.

    ``k`` is clipped to the number of classes (read from the first batch's logits). Returns
    ``({k: accuracy}, num_samples, num_classes)``. No host synchronisation until the end.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> acc, n, c = evaluate_topk(net, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))], "cpu")
        >>> (sorted(acc), n, c, acc[5])
        ([1, 5], 8, 3, 100.0)
    """
    from torchmetrics.classification import MulticlassAccuracy

    device = torch.device(device)
    metrics: dict[int, MulticlassAccuracy] | None = None
    n, num_classes = 0, 0
    for batch in _progress(loader, progress, desc=desc, leave=False):
        x = batch_inputs(batch).to(device, non_blocking=True)
        y = _batch_targets(batch).to(device, non_blocking=True)
        logits = _logits(model(x))
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(f"evaluation expects logits of shape (N, C >= 2), got {tuple(logits.shape)}")
        if y.dim() == 2:  # one-hot / soft targets
            y = y.argmax(1)
        if metrics is None:
            num_classes = int(logits.shape[1])
            metrics = {
                k: MulticlassAccuracy(
                    num_classes=num_classes, top_k=min(k, num_classes), average="micro", validate_args=False
                ).to(device)
                for k in ks
            }
        for m in metrics.values():
            m.update(logits, y)
        n += int(y.shape[0])
    if metrics is None:
        raise ValueError("evaluation data yielded no batches")
    return {k: float(m.compute()) * 100.0 for k, m in metrics.items()}, n, num_classes


@torch.no_grad()
def top1_and_loss(model: nn.Module, batches: Iterable[Any]) -> tuple[float, float]:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` on labelled ``batches``, one host sync.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> top1, loss = top1_and_loss(net, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
        >>> 0.0 <= top1 <= 100.0 and loss > 0
        True
    """
    device = _model_device(model)
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for batch in batches:
        x = batch_inputs(batch).to(device, non_blocking=True)
        y = _batch_targets(batch).to(device, non_blocking=True)
        logits = _logits(model(x))
        if y.dim() == 2:  # one-hot / soft targets
            y = y.argmax(1)
        correct += (logits.argmax(1) == y).sum()
        loss += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
        n += int(y.shape[0])
    if n == 0:
        raise ValueError("evaluation data yielded no batches")
    return float(correct) * 100.0 / n, float(loss) / n
