"""The loss convention every flatness measure takes, and how the measures handle batches, parameters and modes.

Every measure (:mod:`.hessian`, :mod:`.landscape`) takes a ``loss_fn(model, batch) -> scalar Tensor`` and a list of
batches, so any model and any batch layout works; :func:`classification_loss` is the ready one for
``(inputs, targets, ...)`` batches.

Guarantees shared by every measure (the helpers below provide them):

* the model runs in eval mode by default (BatchNorm uses its running statistics; dropout is off); each
  submodule's own ``training`` flag is restored afterwards;
* parameters are restored bit for bit after any perturbation (``torch.equal`` holds);
* nothing is written to ``param.grad`` (second derivatives go through :func:`torch.autograd.grad`);
* batches are moved to the device of the model's parameters, so CPU and CUDA models work alike;
* the random probes/directions come from a CPU generator seeded with ``seed``, so the same seed gives the same
  draws on every device and for two models of the same architecture (e.g. "plain" vs "DNQ").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LossFn", "classification_loss"]

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar Tensor``: the convention of every flatness measure."""


def classification_loss(model: nn.Module, batch: Any) -> Tensor:
    """Cross-entropy of ``model(inputs)`` against ``targets`` for a ``(inputs, targets, ...)`` batch.

    Also accepts a dict batch with keys ``x``/``input``/``image`` and ``y``/``target``/``label``.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> classification_loss(model, batch).shape
        torch.Size([])
    """
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("x", "input", "inputs", "image", "images") if k in batch), None)
        y = next((batch[k] for k in ("y", "target", "targets", "label", "labels") if k in batch), None)
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        x = y = None
    if x is None or y is None:
        raise ValueError(
            f"classification_loss expects an (inputs, targets, ...) batch or a dict with 'x' and 'y' keys, "
            f"got {type(batch).__name__}; pass your own loss_fn(model, batch) for other layouts"
        )
    return nn.functional.cross_entropy(model(x), y)


# ----------------------------------------------------------------------------------------------- helpers
def _to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to ``device``; inference tensors are cloned to normal ones."""
    if isinstance(batch, Tensor):
        if batch.is_inference():
            with torch.inference_mode(False):
                return batch.to(device).clone()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _as_batch_list(batches: Iterable[Any]) -> list[Any]:
    if isinstance(batches, Tensor):
        raise TypeError(
            "batches must be a list of batches, got a single Tensor; wrap it: [tensor] or [(inputs, targets)]"
        )
    out = list(batches)
    if not out:
        raise ValueError("batches is empty: pass at least one batch")
    return out


def _resolve_params(model: nn.Module, params: Iterable[Tensor] | None) -> list[Tensor]:
    ps = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not ps:
        raise ValueError(
            "no parameters to measure: the model has no trainable parameters and none were given"
        )
    for p in ps:
        if not p.requires_grad:
            raise ValueError("every parameter in params must have requires_grad=True")
    return ps


def _model_device(model: nn.Module, params: Sequence[Tensor]) -> torch.device:
    return params[0].device if params else next(model.parameters()).device


@contextlib.contextmanager
def _mode(model: nn.Module, train_mode: bool) -> Iterator[None]:
    """Put ``model`` in train or eval mode and restore every submodule's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train_mode)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _grad_context() -> Iterator[None]:
    # inference_mode(False) so the functions also work when called from a validation hook.
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _check_loss(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            f"loss_fn(model, batch) must return a scalar Tensor, got "
            f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}"
        )
    return loss.reshape(())


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
