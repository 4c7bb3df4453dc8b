"""CIFAR readers (app/data/cifar_io.py) on untrusted files: pickled batches never execute code, corrupt or
non-image zip members are named."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from flatq_lightning.app.data.cifar import load_cifar_arrays
from tests.untrusted import Exploit


def _cifar_batch(n: int) -> dict:
    return {b"data": np.zeros((n, 3 * 32 * 32), dtype=np.uint8), b"labels": list(range(n))}


def _torchvision_dir(root: Path, poison: str | None, marker: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        obj = {**_cifar_batch(2), b"x": Exploit(marker)} if name == poison else _cifar_batch(2)
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))
    return d


def test_cifar_batch_reader_loads_plain_batches(tmp_path):
    d = _torchvision_dir(tmp_path, None, tmp_path / "marker")
    a = load_cifar_arrays(d, cache_dir="")
    assert a["x_train"].shape == (10, 32, 32, 3) and list(a["y_test"]) == [0, 1]


@pytest.mark.parametrize("poison", ["data_batch_3", "test_batch"])
def test_cifar_batch_reader_never_runs_code_from_a_crafted_file(tmp_path, poison):
    marker = tmp_path / "pwned"
    d = _torchvision_dir(tmp_path, poison, marker)
    with pytest.raises(ValueError, match=rf"{poison}: not a CIFAR batch file: refusing to load (io|builtins)\.open"):
        load_cifar_arrays(d, cache_dir="")
    assert not marker.exists()


def test_cifar_batch_reader_refuses_object_arrays(tmp_path):
    marker = tmp_path / "pwned"
    d = _torchvision_dir(tmp_path, None, marker)
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": np.array([Exploit(marker)], dtype=object)}, protocol=2))
    with pytest.raises(ValueError, match="data_batch_1: not a CIFAR batch file"):
        load_cifar_arrays(d, cache_dir="")
    assert not marker.exists()


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _zip(path: Path, bad_member: str, bad: bytes | None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for split in ("train", "test"):
            for cls in ("cat", "dog"):
                name = f"c/{split}/{cls}/0.jpg"
                zf.writestr(name, bad if (name == bad_member and bad is not None) else _jpeg())
    return path


def test_zip_member_that_is_not_an_image_is_named(tmp_path):
    z = _zip(tmp_path / "d.zip", "c/train/dog/0.jpg", b"this is text, not a JPEG")
    with pytest.raises(ValueError, match=r"d\.zip:c/train/dog/0\.jpg: not a readable image"):
        load_cifar_arrays(z, cache_dir="")


def test_corrupt_zip_member_is_named(tmp_path):
    z = _zip(tmp_path / "d.zip", "c/test/cat/0.jpg", None)
    with zipfile.ZipFile(z) as zf:
        info = zf.getinfo("c/test/cat/0.jpg")
    raw = bytearray(z.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(start + 5, start + 25):  # damage the compressed data of that member only
        raw[k] ^= 0xFF
    z.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"cannot read member 'c/test/cat/0\.jpg' \(corrupt archive\?"):
        load_cifar_arrays(z, cache_dir="")
