"""The input tensor of a batch, whatever form the batch takes."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["batch_inputs"]


def batch_inputs(batch: Any) -> Tensor:
    """The input tensor of a batch: the tensor itself, or the first element of a tuple/list/dict batch."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images", "pixel_values"):
            if key in batch:
                return batch[key]
    raise ValueError(
        "cannot find the input tensor in a batch of type "
        f"{type(batch).__name__}: expected a Tensor, (inputs, targets, ...) or a dict with key 'x'/'image'"
    )
