"""Shared pieces of the data modules: in-memory image datasets, batch augmentation, clear path errors.

Design: every dataloader yields ready-to-use ``(images, labels)`` batches (float, normalised), so code that
reads a loader outside the Trainer (PTQ calibration, flatness probes, ``flatq-ptq``) sees the same inputs as
the model. Only the *training* augmentation (random crop with padding, horizontal flip) runs later, on whole
batches on the training device, in ``on_after_batch_transfer``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "ArrayImageDataset",
    "DataNotFoundError",
    "ImageDataModule",
    "default_cache_dir",
    "random_crop_flip",
    "resolve_path",
]


class DataNotFoundError(FileNotFoundError):
    """A configured data path does not exist or does not hold the expected layout.

    The message names the configuration key (``data.path`` …) and the resolved path, so a Hydra user knows
    what to override.
    """


def default_cache_dir() -> Path:
    """``$FLATQ_CACHE``, else ``$XDG_CACHE_HOME/flatq_lightning``, else ``~/.cache/flatq_lightning``."""
    env = os.environ.get("FLATQ_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "flatq_lightning"


def resolve_path(path: str | os.PathLike[str] | None, key: str, what: str, hint: str = "") -> Path:
    """``path`` expanded (``~``, env vars) and made absolute against the current directory; must exist.

    Raises:
        DataNotFoundError: naming ``key``, the path as given and as resolved.
    """
    if path is None or str(path).strip() == "":
        raise DataNotFoundError(f"{key} is not set: give the location of the {what}{hint}")
    given = str(path)
    p = Path(os.path.expandvars(os.path.expanduser(given)))
    p = p if p.is_absolute() else Path.cwd() / p
    p = Path(os.path.normpath(p))
    if not p.exists():
        shown = given if given == str(p) else f"{given!r} (resolved to {str(p)!r})"
        raise DataNotFoundError(f"{key}: the {what} was not found at {shown}{hint}")
    return p


class ArrayImageDataset(Dataset):
    """Images held in memory as uint8 (N, H, W, C) or float (N, C, H, W), served normalised.

    uint8 images are divided by 255, then ``(x - mean) / std`` per channel; float images are served as they
    are when ``mean``/``std`` are None. Batched fetching (``__getitems__``) normalises a whole batch at once.

    Example:
        >>> import numpy as np
        >>> ds = ArrayImageDataset(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4), (0.5,) * 3, (0.25,) * 3)
        >>> x, y = ds[1]
        >>> (tuple(x.shape), float(x[0, 0, 0]), int(y))
        ((3, 8, 8), -2.0, 1)
    """

    def __init__(
        self,
        images: np.ndarray | Tensor,
        labels: np.ndarray | Tensor | Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.images = torch.as_tensor(images)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.channels_last = self.images.dtype == torch.uint8
        c = self.images.shape[-1] if self.channels_last else self.images.shape[1]
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        for name, t in (("mean", self.mean), ("std", self.std)):
            if t is not None and t.shape[1] != c:
                raise ValueError(f"{name} has {t.shape[1]} values but the images have {c} channels")

    def __len__(self) -> int:
        return len(self.labels)

    def _prepare(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
        else:
            x = x.float()
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return x.contiguous()

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._prepare(self.images[index : index + 1])[0], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        x = self._prepare(self.images[idx])
        return list(zip(x.unbind(0), self.labels[idx].unbind(0)))


def random_crop_flip(
    x: Tensor, padding: int = 4, flip: bool = True, fill: Tensor | Sequence[float] | float = 0.0
) -> Tensor:
    """Per-sample random crop (after padding each side by ``padding`` with ``fill``) and horizontal flip.

    Works on a whole (N, C, H, W) batch on its device in a few tensor ops (no per-sample Python loop).
    ``fill`` may be per channel: with normalised inputs pass ``-mean/std`` to pad with black, exactly as
    ``torchvision.transforms.RandomCrop(padding=4)`` does before normalisation.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> random_crop_flip(x, padding=0, flip=False).equal(x)
        True
    """
    n, c, h, w = x.shape
    if padding > 0:
        fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        padded = fill_t.expand(n, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding : padding + h, padding : padding + w] = x
        oy = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
        ox = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
        iy = oy[:, None] + torch.arange(h, device=x.device)[None, :]  # (n, h)
        ix = ox[:, None] + torch.arange(w, device=x.device)[None, :]  # (n, w)
        rows = torch.gather(padded, 2, iy[:, None, :, None].expand(n, c, h, w + 2 * padding))
        x = torch.gather(rows, 3, ix[:, None, None, :].expand(n, c, h, w))
    if flip:
        mask = torch.rand(n, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


class ImageDataModule(L.LightningDataModule):
    """Base class: datasets built in ``setup``, loaders, optional on-device batch augmentation.

    Subclasses set ``train_dataset``, ``val_dataset``, ``test_dataset`` in ``setup`` and the attributes
    ``num_classes``, ``in_chans``, ``image_size`` (known right after ``__init__``, so a model can be built
    before ``setup``). ``val_dataloader``/``test_dataloader`` never shuffle; ``calib_dataloader`` gives a
    seeded random sample of the un-augmented training set for PTQ calibration.
    """

    #: the name :func:`flatq_lightning.app.data.build_datamodule` knows this module by
    name: ClassVar[str] = "base"

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.batch_size must be a positive int, got {batch_size!r}")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size < 1):
            raise ValueError(f"data.eval_batch_size must be a positive int or None, got {eval_batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an int >= 0, got {num_workers!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.augment = augment
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.num_classes: int = 0
        self.in_chans: int = 3
        self.image_size: int = 32
        self.classes: list[str] = []

    # loaders -------------------------------------------------------------------------------------------
    def _need(self, ds: Dataset | None, stage: str) -> Dataset:
        if ds is None:
            self.setup(stage)
            ds = {"fit": self.train_dataset, "validate": self.val_dataset, "test": self.test_dataset}[stage]
        assert ds is not None
        return ds

    def _loader(
        self, ds: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False, **kw: Any
    ) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self._need(self.train_dataset, "fit")
        return self._loader(ds, self.batch_size, shuffle=True, drop_last=len(ds) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._need(self.val_dataset, "validate"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._need(self.test_dataset, "test"), self.eval_batch_size, shuffle=False)

    def calib_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Training images without augmentation, in a seeded random order (for PTQ calibration)."""
        ds = self._need(self.train_dataset, "fit")
        g = torch.Generator().manual_seed(self.seed + 12345)
        return DataLoader(
            ds,
            batch_size=batch_size or self.eval_batch_size,
            shuffle=True,
            generator=g,
            num_workers=0,
        )

    # augmentation --------------------------------------------------------------------------------------
    def augment_batch(self, x: Tensor) -> Tensor:
        """Training-time augmentation of a batch already on the device; identity in the base class."""
        return x

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training and isinstance(batch, (list, tuple)):
            x, *rest = batch
            batch = (self.augment_batch(x), *rest)
        return batch

    # checkpoint: record which data module produced the checkpoint (flatq-ptq rebuilds it from this) -------
    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, image_size={self.image_size})"
