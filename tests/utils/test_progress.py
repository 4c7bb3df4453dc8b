"""Progress for long waits: tqdm on a terminal, a few plain lines (no escape codes) in a log."""

from __future__ import annotations

import io

import pytest
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import run_ptq
from flatq_lightning.utils.progress import is_terminal, progress
from tests.helpers import SmallConvNet, blob_data


@pytest.fixture
def frozen_clock(monkeypatch):
    """The progress module's clock stands still: "a quick loop" stays quick on a loaded machine.

    The default-interval checks ask that no line is due before the loop ends; with the real clock they would
    assume the loop finishes within interval_s (10 s / 30 s) of wall-clock time, which a busy CI can break.
    """
    import types

    import flatq_lightning.utils.progress as mod

    monkeypatch.setattr(mod, "time", types.SimpleNamespace(perf_counter=lambda: 1000.0))


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
    assert progress(range(3), "x", enabled=False, stream=out) == range(3)


def test_plain_lines_default_interval_only_the_final_line(frozen_clock):
    # the default interval: only the final line for a quick loop
    out = io.StringIO()
    list(progress(iter(range(3)), "decoding", stream=out))
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("decoding: done, 3 it in ")


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




# --- training: Lightning's progress as plain lines in a log ---------------------------------------------------
def _prog_lm():
    """A LightningModule that shows its loss and validation accuracy in the progress bar."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = SmallConvNet()

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val/acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean(), prog_bar=True)

        def test_step(self, batch, batch_idx):
            self.log("test/acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean(), prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return M()


def _trainer(callbacks, **kw):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, num_sanity_val_steps=1, callbacks=callbacks, **kw)


def _loaders():
    x, y = blob_data(64)
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)


def test_plain_progress_bar_prints_lines_per_epoch_and_within_it():
    from flatq_lightning.utils.progress import PlainProgressBar

    out = io.StringIO()
    train, val = _loaders()
    tr = _trainer([PlainProgressBar(interval_s=0.0, stream=out)])
    assert tr.progress_bar_callback is not None and not any(type(c).__name__ == "TQDMProgressBar" for c in tr.callbacks)
    tr.fit(_prog_lm(), train, val)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # interval 0: a line after every batch but the epoch's last, then the epoch's line with validation's metrics
    # (sanity check: nothing)
    heads = [ln.split(", ")[0] for ln in lines]
    assert heads == ["epoch 1/2: 1/4 batches", "epoch 1/2: 2/4 batches", "epoch 1/2: 3/4 batches",
                     "validation: 1/2 batches", "epoch 1/2: done",
                     "epoch 2/2: 1/4 batches", "epoch 2/2: 2/4 batches", "epoch 2/2: 3/4 batches",
                     "validation: 1/2 batches", "epoch 2/2: done"], text
    assert "train/loss " in lines[0] and "val/acc" not in lines[0]
    done = lines[4]
    assert done.startswith("epoch 1/2: done, 4/4 batches in ") and " train/loss " in done and ", val/acc " in done
    # a test run on its own: a closing line with its metrics
    out.truncate(0)
    out.seek(0)
    tr.test(tr.lightning_module, val, verbose=False)
    assert out.getvalue().splitlines()[-1].startswith("test: done, 2 batches in ") and "test/acc" in out.getvalue()


def test_plain_progress_bar_default_interval_and_disable(frozen_clock):
    from flatq_lightning.utils.progress import PlainProgressBar

    out = io.StringIO()
    train, val = _loaders()
    tr = _trainer([PlainProgressBar(stream=out)])
    tr.fit(_prog_lm(), train, val)
    assert [ln.split(" in ")[0] for ln in out.getvalue().splitlines()] == [
        "epoch 1/2: done, 4/4 batches", "epoch 2/2: done, 4/4 batches"]  # a quick epoch: its closing line only
    bar = PlainProgressBar(interval_s=0.0, stream=io.StringIO())
    bar.disable()  # as on the ranks other than zero, or while the tuner searches
    _trainer([bar]).fit(_prog_lm(), train, val)
    assert bar.stream.getvalue() == "" and bar.is_disabled and not bar.is_enabled


def test_progress_bar_callback_chooses_plain_lines_off_a_terminal(monkeypatch):
    import sys

    from lightning.pytorch.callbacks import TQDMProgressBar

    from flatq_lightning.utils.progress import PlainProgressBar, progress_bar_callback

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar_callback(), PlainProgressBar)
    # enable_progress_bar=False (Lightning refuses any progress bar callback then), or a bar already given
    assert progress_bar_callback(enabled=False) is None
    assert progress_bar_callback(callbacks=[TQDMProgressBar()]) is None
    _trainer([], enable_progress_bar=False)  # what the callers build when it returns None: no error
    monkeypatch.setattr(sys, "stdout", _Tty())
    assert isinstance(progress_bar_callback(), PlainProgressBar)  # stderr (where its lines go) is a log
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert progress_bar_callback() is None  # a terminal: Lightning's own tqdm bar
