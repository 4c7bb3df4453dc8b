"""Flatness: Hessian estimates (:mod:`.hessian`), loss-landscape slices (:mod:`.landscape`), both on the loss
convention of :mod:`.loss`, and the callback that logs them during training (:mod:`.monitor`)."""

from .hessian import hessian_diagonal, hessian_trace, hessian_trace_per_param, top_eigenvalue
from .landscape import (
    filter_normalized_direction,
    loss_landscape_1d,
    loss_landscape_2d,
    plot_landscape_1d,
    plot_landscape_2d,
)
from .loss import LossFn, classification_loss
from .monitor import SharpnessMonitor

__all__ = [
    "LossFn",
    "SharpnessMonitor",
    "classification_loss",
    "filter_normalized_direction",
    "hessian_diagonal",
    "hessian_trace",
    "hessian_trace_per_param",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "top_eigenvalue",
]
