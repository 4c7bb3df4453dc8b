"""A tiny CIFAR-like data set in the three supported layouts (zip, folder, torchvision pickles)."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N_TRAIN, N_TEST = 4, 2  # per class


def _image(cls: int, i: int) -> np.ndarray:
    """A flat colour per class (JPEG keeps flat colours almost exactly) plus a per-image brightness."""
    rng = np.random.default_rng(cls)
    colour = rng.integers(40, 215, size=3)
    return np.broadcast_to(np.clip(colour + 3 * i, 0, 255), (32, 32, 3)).astype(np.uint8)


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _members():
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                yield split, c, name, i


@pytest.fixture(scope="session")
def tiny_cifar_zip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zip") / "cifar10-jpeg.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("cifar10/", "")
        for split, c, name, i in _members():
            zf.writestr(f"cifar10/{split}/{name}/{i:04d}.jpg", _jpeg(_image(c, i)))
    return path


@pytest.fixture(scope="session")
def tiny_cifar_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder") / "cifar10"
    for split, c, name, i in _members():
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.jpg").write_bytes(_jpeg(_image(c, i)))
    return root


@pytest.fixture(scope="session")
def tiny_cifar_torchvision(tmp_path_factory) -> Path:
    """torchvision's cifar-10-batches-py layout with 10 + 5 images per batch file."""
    parent = tmp_path_factory.mktemp("tv")
    d = parent / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)

    def batch(n: int, offset: int) -> dict:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        return {b"data": data, b"labels": [(offset + k) % 10 for k in range(n)]}

    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch(10, i)))
    (d / "test_batch").write_bytes(pickle.dumps(batch(5, 0)))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}))
    return parent
