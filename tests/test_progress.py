"""Progress for long waits: tqdm on a terminal, a few plain lines (no escape codes) in a log."""

from __future__ import annotations

import io

import pytest
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import run_ptq
from flatq_lightning.progress import is_terminal, progress
from tests.helpers import SmallConvNet, blob_data


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal(monkeypatch):
    out = io.StringIO()
    assert list(progress(range(5), "eval w4a4", stream=out, interval_s=0.0, unit="batches")) == list(range(5))
    lines = out.getvalue().splitlines()
    assert lines[:4] == [f"eval w4a4: {i}/5 batches, " + lines[i - 1].split(", ")[1] for i in range(1, 5)]
    assert lines[-1].startswith("eval w4a4: done, 5 batches in ") and len(lines) == 5
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    # the default interval: only the final line for a quick loop
    out = io.StringIO()
    list(progress(iter(range(3)), "decoding", stream=out))
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("decoding: done, 3 it in ")
    assert progress(range(3), "x", enabled=False, stream=out) == range(3)


def test_tqdm_on_a_terminal():
    from tqdm import tqdm

    tty = _Tty()
    assert is_terminal(tty) and not is_terminal(io.StringIO()) and not is_terminal(object())
    bar = progress(range(4), "calibration", stream=tty)
    assert isinstance(bar, tqdm) and bar.total == 4
    assert sum(bar) == 6 and "calibration" in tty.getvalue()


def test_run_ptq_progress_in_a_log_has_no_escape_codes(capsys):
    x, y = blob_data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    run_ptq(SmallConvNet().eval(), loader, loader, bits=("w8a8", "w4a4"), calib_batches=2, progress=True)
    err = capsys.readouterr().err  # pytest's capture is not a terminal, like a log file
    assert "\r" not in err and "\x1b" not in err
    for what in ("calibration data", "eval fp", "calibrate w4a4", "eval w4a4", "PTQ"):
        assert f"{what}: done, " in err, err


@pytest.mark.parametrize("cached", [False, True])
def test_cifar_decoding_says_what_it_does(tiny_zip, tmp_path, capsys, cached):
    from flatq_lightning.app.data import load_cifar_arrays

    cache = tmp_path / "cache"
    if cached:
        load_cifar_arrays(tiny_zip, cache_dir=cache)
        capsys.readouterr()
    load_cifar_arrays(tiny_zip, cache_dir=cache)
    err = capsys.readouterr().err
    if cached:
        assert err == ""  # read from the cache: nothing to wait for
    else:
        assert f"reading cifar10 from {tiny_zip} (zip), cached in {cache}" in err
        assert "decoding train images: done, 40 images in" in err and "decoding test images: done, 20" in err


@pytest.fixture
def tiny_zip(tmp_path):
    import zipfile

    import numpy as np
    from PIL import Image

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    path = tmp_path / "c.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", 4), ("test", 2)):
            for c, name in enumerate(classes):
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((32, 32, 3), 20 * c + i, np.uint8)).save(buf, format="JPEG")
                    zf.writestr(f"cifar10/{split}/{name}/{i}.jpg", buf.getvalue())
    return path


