"""ImageNet (or any ImageFolder classification set) with the standard torchvision/timm transforms."""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from .base import DataNotFoundError, ImageDataModule, resolve_path

__all__ = ["ImageNetDataModule", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetDataModule(ImageDataModule):
    """ImageFolder ``root/train/<class>/*`` and ``root/val/<class>/*`` with the usual transforms.

    Training: ``RandomResizedCrop(image_size)`` + horizontal flip; evaluation: resize to
    ``image_size / crop_pct`` then centre crop. ``mean``/``std``/``interpolation`` default to the torchvision
    ResNet recipe; for timm ViTs pass ``mean=std=(0.5, 0.5, 0.5)`` and ``interpolation="bicubic"``. The test
    split is the validation split. Decoding runs in the dataloader workers (``num_workers``).

    Example:
        >>> dm = ImageNetDataModule("/data/imagenet", batch_size=256, num_workers=8)  # doctest: +SKIP
        >>> dm.setup("fit")                                                            # doctest: +SKIP
        >>> dm.num_classes                                                             # doctest: +SKIP
        1000
    """

    name = "imagenet"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        image_size: int = 224,
        crop_pct: float = 0.875,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        train_dir: str = "train",
        val_dir: str = "val",
        train_subset: int | None = None,
        val_subset: int | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        path_key: str = "data.root",
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, augment=False, **kwargs)
        if root is not None:
            root = os.path.abspath(os.path.expandvars(os.path.expanduser(str(root))))
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(
                f"data.interpolation must be one of 'bilinear', 'bicubic', 'nearest', got {interpolation!r}"
            )
        if not 0.0 < float(crop_pct) <= 1.0:
            raise ValueError(f"data.crop_pct must be in (0, 1], got {crop_pct!r}")
        # num_classes is not a data hyperparameter: the model records the real count, and Lightning refuses
        # to merge the two when they differ (None here, an int there) as soon as a logger is attached
        self.save_hyperparameters(ignore=["num_classes"])
        self.expected_num_classes = num_classes
        self.root = root
        self.image_size = image_size
        self.crop_pct = float(crop_pct)
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = interpolation
        self.train_dir, self.val_dir = train_dir, val_dir
        self.train_subset, self.val_subset = train_subset, val_subset
        self.path_key = path_key
        self.in_chans = 3
        # known before setup so the model can be built first; checked against the folder in setup
        self.num_classes = num_classes or 1000

    def _split_dir(self, split: str) -> str:
        hint = "; expected ImageFolder class folders under <root>/train and <root>/val (set data.root=...)"
        root = resolve_path(self.root, self.path_key, "ImageNet root folder", hint)
        d = root / split
        if not d.is_dir():
            raise DataNotFoundError(f"{self.path_key}: {root} has no '{split}' folder{hint}")
        return str(d)

    def transforms(self, train: bool) -> Any:
        """The torchvision transform for the training (``train=True``) or evaluation split."""
        from torchvision import transforms as T

        interp = T.InterpolationMode(self.interpolation)
        if train:
            ops = [T.RandomResizedCrop(self.image_size, interpolation=interp), T.RandomHorizontalFlip()]
        else:
            resize = int(round(self.image_size / self.crop_pct))
            ops = [T.Resize(resize, interpolation=interp), T.CenterCrop(self.image_size)]
        return T.Compose([*ops, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def _subset(self, ds: Dataset, size: int | None, seed: int) -> Dataset:
        n = len(ds)  # type: ignore[arg-type]
        if size is None or size >= n:
            return ds
        idx = np.sort(np.random.default_rng(seed).permutation(n)[:size])
        return Subset(ds, idx.tolist())

    def prepare_data(self) -> None:
        self._split_dir(self.train_dir)
        self._split_dir(self.val_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        from torchvision.datasets import ImageFolder

        train = ImageFolder(self._split_dir(self.train_dir), transform=self.transforms(train=True))
        val = ImageFolder(self._split_dir(self.val_dir), transform=self.transforms(train=False))
        if train.classes != val.classes:
            raise ValueError(
                f"{self.root}: the train and val folders have different classes "
                f"({len(train.classes)} vs {len(val.classes)})"
            )
        expected = self.expected_num_classes
        if expected is not None and len(train.classes) != expected:
            raise ValueError(f"data.num_classes={expected} but {self.root} has {len(train.classes)} classes")
        self.num_classes = len(train.classes)
        self.classes = list(train.classes)
        # un-augmented copy of the training set for calibration
        self._train_eval = copy.copy(train)
        self._train_eval.transform = self.transforms(train=False)
        self.train_dataset = self._subset(train, self.train_subset, self.seed)
        self.val_dataset = self._subset(val, self.val_subset, self.seed + 1)
        self.test_dataset = self.val_dataset

    def calib_dataloader(self, batch_size: int | None = None) -> Any:
        """Training images with the evaluation transform, seeded random order (PTQ calibration)."""
        import torch
        from torch.utils.data import DataLoader

        self._need(self.train_dataset, "fit")
        ds = self._subset(self._train_eval, self.train_subset, self.seed)
        g = torch.Generator().manual_seed(self.seed + 12345)
        return DataLoader(
            ds,
            batch_size=batch_size or self.eval_batch_size,
            shuffle=True,
            generator=g,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
