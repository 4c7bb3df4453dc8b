import numpy as np
import pytest
import torch
from PIL import Image

from flatq_lightning.app.data import (
    DataNotFoundError,
    DigitsDataModule,
    ImageNetDataModule,
    SyntheticDataModule,
)


def test_digits_split_shapes_and_seed():
    dm = DigitsDataModule(image_size=16, batch_size=32, seed=0)
    dm.setup("fit")
    assert len(dm.train_dataset) == 1437 and len(dm.val_dataset) == 360 and dm.test_dataset is dm.val_dataset
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and y.max() < 10
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 1, 16)
    dm8 = DigitsDataModule(image_size=8, seed=0)
    dm8.setup()
    assert dm8.train_dataset.images.shape[1:] == (1, 8, 8)
    assert abs(float(dm8.train_dataset.images.mean())) < 0.05  # normalised
    assert torch.equal(dm8.val_dataset.labels, dm.val_dataset.labels)  # same seed, same split
    other = DigitsDataModule(seed=1)
    other.setup()
    assert not torch.equal(other.val_dataset.labels, dm.val_dataset.labels)


def test_digits_calibration_loader_is_deterministic():
    dm = DigitsDataModule(batch_size=32)
    a = next(iter(dm.calib_dataloader(16)))[0]
    b = next(iter(dm.calib_dataloader(16)))[0]
    assert a.shape == (16, 1, 16, 16) and torch.equal(a, b)


def test_digits_validation():
    with pytest.raises(ValueError, match="image_size"):
        DigitsDataModule(image_size=4)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)


def test_synthetic_shapes_and_determinism():
    dm = SyntheticDataModule(
        num_samples=40, val_samples=8, num_classes=3, image_size=12, in_chans=2, batch_size=16
    )
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 2, 12, 12) and int(y.max()) < 3
    assert len(dm.val_dataset) == 8 and len(dm.test_dataset) == 8
    again = SyntheticDataModule(num_samples=40, val_samples=8, num_classes=3, image_size=12, in_chans=2)
    again.setup()
    assert torch.equal(again.train_dataset.images, dm.train_dataset.images)
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticDataModule(num_classes=0)


def _imagefolder(root, classes=("n01", "n02"), n=3, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )


def test_imagenet_folder(tmp_path):
    _imagefolder(tmp_path)
    dm = ImageNetDataModule(tmp_path, image_size=32, batch_size=4, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.classes == ["n01", "n02"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape[1:] == (3, 32, 32)
    xc, _ = next(iter(dm.calib_dataloader(2)))
    assert xc.shape == (2, 3, 32, 32)


def test_imagenet_missing_root_and_split(tmp_path):
    with pytest.raises(DataNotFoundError) as ei:
        ImageNetDataModule(tmp_path / "missing").prepare_data()
    assert "data.root" in str(ei.value) and "missing" in str(ei.value)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataNotFoundError, match="no 'val' folder"):
        ImageNetDataModule(tmp_path).prepare_data()
    with pytest.raises(ValueError, match="interpolation"):
        ImageNetDataModule(tmp_path, interpolation="lanczos")


def test_imagenet_num_classes_mismatch(tmp_path):
    _imagefolder(tmp_path)
    with pytest.raises(ValueError, match="num_classes=1000"):
        ImageNetDataModule(tmp_path, num_classes=1000, num_workers=0).setup("fit")
