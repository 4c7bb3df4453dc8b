"""CIFAR-10/100 from a JPEG ImageFolder zip, an extracted ImageFolder or torchvision's download folder.

Images are decoded once and cached as uint8 arrays (``.npz``) in a cache directory; later runs load the cache
in well under a second. Supported sources (``path``):

- a zip in ImageFolder layout: ``[<top>/]train/<class>/*.jpg`` and ``[<top>/]test/<class>/*.jpg`` (the
  project's ``cifar10-jpeg.zip``);
- the same layout extracted to a folder (``path`` is the folder holding ``train/`` and ``test/``, or its
  parent with a single top folder);
- torchvision's download folder: ``cifar-10-batches-py/`` / ``cifar-100-python/`` or its parent.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from torch import Tensor

from .base import (
    ArrayImageDataset,
    ImageDataModule,
    random_crop_flip,
)
from .cifar_io import _NUM_CLASSES, CIFAR_STATS, load_cifar_arrays

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "load_cifar_arrays", "CIFAR_STATS"]

def _subset(n: int, size: int | None, rng: np.random.Generator, what: str) -> np.ndarray:
    if size is None or size >= n:
        return np.arange(n)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"data.{what} must be a positive int or null, got {size!r}")
    return np.sort(rng.permutation(n)[:size])


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from a JPEG ImageFolder zip/folder or torchvision's download folder, cached as uint8.

    ``train_subset``/``test_subset`` take seeded random subsets (e.g. 10,000 training images for quick
    comparisons). ``val_size`` > 0 holds out that many training images (seeded) for validation; with the
    default 0, validation uses the test split. Training augmentation (random crop with 4-pixel black padding
    and horizontal flip) runs on the batch on the training device.

    Example:
        >>> dm = CIFAR10DataModule("../shared/data/cifar10-jpeg.zip", train_subset=10_000)  # doctest: +SKIP
        >>> dm.setup("fit")                                                                  # doctest: +SKIP
        >>> len(dm.train_dataset), dm.num_classes                                            # doctest: +SKIP
        (10000, 10)
    """

    name = "cifar10"
    dataset = "cifar10"

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = 512,
        num_workers: int = 0,
        train_subset: int | None = None,
        test_subset: int | None = None,
        val_size: int = 0,
        augment: bool = True,
        padding: int = 4,
        seed: int = 0,
        path_key: str = "data.path",
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, augment=augment, **kwargs)
        if path is not None:
            path = os.path.abspath(os.path.expandvars(os.path.expanduser(str(path))))
        if not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"data.val_size must be an int >= 0, got {val_size!r}")
        self.save_hyperparameters()
        self.path = path
        self.cache_dir = cache_dir
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.val_size = val_size
        self.padding = padding
        self.path_key = path_key
        self.num_classes = _NUM_CLASSES[self.dataset]
        self.in_chans = 3
        self.image_size = 32
        self.mean, self.std = CIFAR_STATS[self.dataset]

    def prepare_data(self) -> None:
        load_cifar_arrays(self.path, self.dataset, self.cache_dir, self.path_key)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        a = load_cifar_arrays(self.path, self.dataset, self.cache_dir, self.path_key)
        self.classes = [str(c) for c in a["classes"]]
        rng = np.random.default_rng(self.seed)
        n = len(a["y_train"])
        if self.val_size >= n:
            raise ValueError(f"data.val_size={self.val_size} leaves no training images (the split has {n})")
        perm = rng.permutation(n)
        val_idx, rest = np.sort(perm[: self.val_size]), perm[self.val_size :]
        train_idx = np.sort(rest[_subset(len(rest), self.train_subset, rng, "train_subset")])
        test_idx = _subset(
            len(a["y_test"]), self.test_subset, np.random.default_rng(self.seed + 1), "test_subset"
        )

        def ds(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> ArrayImageDataset:
            return ArrayImageDataset(np.ascontiguousarray(x[idx]), y[idx], self.mean, self.std)

        self.train_dataset = ds(a["x_train"], a["y_train"], train_idx)
        self.test_dataset = ds(a["x_test"], a["y_test"], test_idx)
        self.val_dataset = ds(a["x_train"], a["y_train"], val_idx) if self.val_size else self.test_dataset

    def augment_batch(self, x: Tensor) -> Tensor:
        fill = [-m / s for m, s in zip(self.mean, self.std)]  # black in normalised units
        return random_crop_flip(x, padding=self.padding, flip=True, fill=fill)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) from torchvision's ``cifar-100-python`` folder or an ImageFolder zip/folder.

    Same options as :class:`CIFAR10DataModule`.

    Example:
        >>> dm = CIFAR100DataModule("data/", train_subset=10_000)   # doctest: +SKIP
        >>> dm.num_classes                                          # doctest: +SKIP
        100
    """

    name = "cifar100"
    dataset = "cifar100"
