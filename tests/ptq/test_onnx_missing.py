"""Without ``onnx``/``onnxruntime`` the ONNX export fails at once, saying what to install; nothing else needs them."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import PostTrainingQuantization, run_ptq
from flatq_lightning.ptq import onnx_export
from tests.helpers import SmallConvNet, blob_data


@pytest.fixture
def no_onnx(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in ("onnx", "onnxruntime") else real(name, *args, **kwargs)

    monkeypatch.setattr(onnx_export.importlib.util, "find_spec", find_spec)


def test_missing_packages_are_named_with_the_install_command(no_onnx, tmp_path):
    assert not onnx_export.onnx_available()
    with pytest.raises(ImportError, match=r'needs onnx and onnxruntime: pip install "flatq_lightning\[onnx\]"'):
        onnx_export.export_onnx(SmallConvNet(), tmp_path / "m.onnx", torch.randn(1, 1, 8, 8))
    x, y = blob_data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    with pytest.raises(ImportError, match="run_ptq"):
        run_ptq(SmallConvNet(), loader, loader, bits="w8a8", progress=False, export_dir=tmp_path,
                export_formats="onnx")
    assert not list(tmp_path.iterdir())  # failed before any work
    # safetensors needs neither
    rep = run_ptq(SmallConvNet(), loader, loader, bits="w8a8", calib_batches=1, progress=False, export_dir=tmp_path)
    assert (tmp_path / "quantized_w8a8.safetensors").exists() and rep.row("w8a8").exports


def test_callback_fails_before_training(no_onnx):
    cb = PostTrainingQuantization(export="onnx")
    assert cb.export_formats == ("onnx",)

    class _Trainer:
        loggers = []

    with pytest.raises(ImportError, match="PostTrainingQuantization"):
        cb.on_fit_start(_Trainer(), None)


def test_flatq_ptq_says_what_to_install(no_onnx, tmp_path, capsys):
    from flatq_lightning.app import ptq_cli

    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    assert ptq_cli.main([str(ckpt), "--export", "onnx"]) == 2
    assert 'pip install "flatq_lightning[onnx]"' in capsys.readouterr().err
