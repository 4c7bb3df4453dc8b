"""Flatness: the measures (Hessian trace, top eigenvalue, loss-landscape slices) and the callback that logs them."""

from .measures import (
    LossFn,
    classification_loss,
    filter_normalized_direction,
    hessian_trace,
    loss_landscape_1d,
    loss_landscape_2d,
    plot_landscape_1d,
    plot_landscape_2d,
    top_eigenvalue,
)
from .monitor import SharpnessMonitor

__all__ = [
    "LossFn",
    "SharpnessMonitor",
    "classification_loss",
    "filter_normalized_direction",
    "hessian_trace",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "top_eigenvalue",
]
