"""Data that needs no files: scikit-learn's bundled digits and synthetic tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import ArrayImageDataset, ImageDataModule

__all__ = ["DigitsDataModule", "SyntheticDataModule"]

#: mean and std of the digits pixels scaled to [0, 1] (over all 1,797 images)
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes), optionally upscaled.

    Pixels are scaled to [0, 1], normalised, and resized bilinearly to ``image_size`` (8 keeps them as
    they are). A seeded, stratified ``val_fraction`` is held out; it serves as both validation and test
    split (the data set has no separate test set).

    Example:
        >>> dm = DigitsDataModule(image_size=16, batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.num_classes
        ((32, 1, 16, 16), 10)
    """

    name = "digits"

    def __init__(
        self,
        image_size: int = 16,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        eval_batch_size: int | None = 256,
        num_workers: int = 0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, augment=False, **kwargs)
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"data.image_size must be an int >= 8 for digits, got {image_size!r}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}")
        self.save_hyperparameters()
        self.image_size = image_size
        self.val_fraction = float(val_fraction)
        self.num_classes = 10
        self.in_chans = 1
        self.classes = [str(i) for i in range(10)]

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = (x - DIGITS_MEAN) / DIGITS_STD
        if self.image_size != 8:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        y = np.asarray(digits.target)
        idx_train, idx_val = train_test_split(
            np.arange(len(y)), test_size=self.val_fraction, random_state=self.seed, stratify=y
        )
        self.train_dataset = ArrayImageDataset(x[idx_train], y[idx_train])
        self.val_dataset = ArrayImageDataset(x[idx_val], y[idx_val])
        self.test_dataset = self.val_dataset


class SyntheticDataModule(ImageDataModule):
    """Random images with a learnable class signal: smoke tests and overhead benchmarks.

    Each class has a fixed random pattern; a sample is ``noise + signal * pattern[label]``, so a network
    can fit it (``signal=0`` gives pure noise). Train, validation and test sets are drawn from one seeded
    generator.

    Example:
        >>> dm = SyntheticDataModule(num_samples=64, num_classes=4, image_size=8, batch_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), int(y.max()) < 4
        ((16, 3, 8, 8), True)
    """

    name = "synthetic"

    def __init__(
        self,
        num_samples: int = 512,
        val_samples: int = 128,
        test_samples: int | None = None,
        num_classes: int = 10,
        image_size: int = 32,
        in_chans: int = 3,
        signal: float = 1.0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, augment=False, **kwargs)
        for key, v in (
            ("num_samples", num_samples),
            ("val_samples", val_samples),
            ("num_classes", num_classes),
            ("image_size", image_size),
            ("in_chans", in_chans),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"data.{key} must be a positive int, got {v!r}")
        self.save_hyperparameters()
        self.num_samples = num_samples
        self.val_samples = val_samples
        self.test_samples = test_samples if test_samples is not None else val_samples
        self.num_classes = num_classes
        self.image_size = image_size
        self.in_chans = in_chans
        self.signal = float(signal)
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.in_chans, self.image_size, self.image_size)
        patterns = torch.randn(self.num_classes, *shape, generator=g)

        def draw(n: int) -> ArrayImageDataset:
            y = torch.randint(0, self.num_classes, (n,), generator=g)
            x = torch.randn(n, *shape, generator=g) + self.signal * patterns[y]
            return ArrayImageDataset(x, y)

        self.train_dataset = draw(self.num_samples)
        self.val_dataset = draw(self.val_samples)
        self.test_dataset = draw(self.test_samples)
