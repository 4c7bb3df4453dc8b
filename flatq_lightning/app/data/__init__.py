"""Lightning data modules and a factory by name.

Example:
    >>> dm = build_datamodule("synthetic", num_samples=32, num_classes=4, image_size=8)
    >>> type(dm).__name__, dm.num_classes
    ('SyntheticDataModule', 4)
"""

from __future__ import annotations

from typing import Any

from .base import (
    ArrayImageDataset,
    DataNotFoundError,
    ImageDataModule,
    default_cache_dir,
    random_crop_flip,
    resolve_path,
)
from .cifar import CIFAR_STATS, CIFAR10DataModule, CIFAR100DataModule, load_cifar_arrays
from .imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNetDataModule
from .simple import DigitsDataModule, SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFAR_STATS",
    "DATAMODULES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayImageDataset",
    "DataNotFoundError",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "SyntheticDataModule",
    "build_datamodule",
    "default_cache_dir",
    "load_cifar_arrays",
    "random_crop_flip",
    "resolve_path",
]

#: names accepted by :func:`build_datamodule` (also the ``data`` config group's options)
DATAMODULES: dict[str, type[ImageDataModule]] = {
    cls.name: cls
    for cls in (
        DigitsDataModule,
        SyntheticDataModule,
        CIFAR10DataModule,
        CIFAR100DataModule,
        ImageNetDataModule,
    )
}


def build_datamodule(name: str, **kwargs: Any) -> ImageDataModule:
    """A data module by name (``digits``, ``synthetic``, ``cifar10``, ``cifar100``, ``imagenet``).

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    if name not in DATAMODULES:
        raise ValueError(f"unknown data module {name!r}: choose one of {sorted(DATAMODULES)}")
    return DATAMODULES[name](**kwargs)
