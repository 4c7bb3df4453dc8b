"""The ImageNet examples run end to end with --smoke (synthetic 32x32 data, a few CPU steps)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.helpers import SUBPROCESS_TIMEOUT_S

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50_imagenet", "vit_b16_imagenet"])
def test_example_smoke(name, tmp_path):
    mod = _load(name)
    metrics = mod.main(["--smoke", "--out", str(tmp_path)])
    assert set(metrics) == {"ptq/fp/top1", "ptq/fp/top5", "ptq/w4a4/top1", "ptq/w4a4/top5"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert (tmp_path / "ptq" / "ptq_report.json").is_file()


@pytest.mark.parametrize("name", ["resnet50_imagenet", "vit_b16_imagenet"])
def test_example_arguments(name):
    mod = _load(name)
    args = mod.parse_args(["--data-root", "/x", "--devices", "8", "--strategy", "ddp", "--pretrained"])
    assert (args.data_root, args.devices, args.strategy, args.pretrained, args.dnq) == (
        "/x",
        "8",
        "ddp",
        True,
        True,
    )
    assert mod._devices("0,1") == [0, 1] and mod._devices("auto") == "auto" and mod._devices("4") == 4
    with pytest.raises(SystemExit, match="--data-root is required"):
        mod.main([])


# the real ImageFolder path (not --smoke), with the Trainer's default logger on: timm's tiny test models at
# 32 px, 12 training images, one epoch, PTQ at W4A4
_TINY = {
    "resnet50_imagenet": ["--model", "test_resnet", "--image-size", "32"],
    "vit_b16_imagenet": ["--model", "test_vit", "--image-size", "32"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50_imagenet", "vit_b16_imagenet"])
def test_example_on_an_image_folder(name, image_folder, tmp_path, monkeypatch):
    import timm
    import torch

    monkeypatch.chdir(tmp_path)
    mod = _load(name)
    out = tmp_path / "run"
    # start from a local timm checkpoint (1000 classes, saved here): no hub, no network
    weights = tmp_path / "weights.pth"
    torch.save(timm.create_model(_TINY[name][1], img_size=32).state_dict() if "vit" in name
               else timm.create_model(_TINY[name][1]).state_dict(), weights)
    argv = ["--data-root", str(image_folder), *_TINY[name], "--epochs", "1", "--batch-size", "4"]
    argv += ["--pretrained-file", str(weights)]
    argv += ["--num-workers", "0", "--ptq-bits", "w4a4", "--calib-batches", "1", "--accelerator", "cpu"]
    argv += ["--devices", "1", "--out", str(out)]
    metrics = mod.main(argv)
    assert set(metrics) == {"ptq/fp/top1", "ptq/fp/top5", "ptq/w4a4/top1", "ptq/w4a4/top5"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert (out / "ptq" / "ptq_report.json").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    # the default logger got the merged hyperparameters (model and data, num_classes from the folder: 3)
    hparams = list(out.rglob("hparams.yaml"))
    assert hparams, sorted(str(p) for p in out.rglob("*"))
    import yaml

    hp = yaml.safe_load(hparams[0].read_text())
    assert hp["num_classes"] == 3 and hp["model"] == _TINY[name][1] and hp["image_size"] == 32
    assert hp["pretrained_file"] == str(weights)

    # flatq-ptq on the checkpoint needs neither the starting weights nor the network
    from flatq_lightning.app import ptq_cli

    weights.unlink()
    rc = ptq_cli.main([str(out / "checkpoints" / "last.ckpt"), "--bits", "w4a4", "--calib-batches", "1",
                       "--no-progress", "--device", "cpu", "--num-workers", "0", "--save-dir", str(tmp_path / "p")])
    assert rc == 0 and (tmp_path / "p" / "ptq_report.png").is_file()


@pytest.mark.parametrize("name", ["resnet50_imagenet", "vit_b16_imagenet"])
def test_example_pretrained_offline_is_one_line(name, image_folder, monkeypatch, capsys):
    from flatq_lightning.app import models

    monkeypatch.setattr(models, "_weights_cached", lambda *a: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mod = _load(name)
    with pytest.raises(SystemExit) as ei:
        mod.main(["--data-root", str(image_folder), *_TINY[name], "--pretrained", "--num-workers", "0"])
    msg = str(ei.value.code)
    assert msg.startswith(f"{name}.py: error: the pretrained weights of '{_TINY[name][1]}'") and "\n" not in msg
    assert "--pretrained-file PATH" in msg


def test_example_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    mod = _load("resnet50_imagenet")
    with pytest.raises(SystemExit):
        mod.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "training epochs (default: 10)" in out and "e.g. w4a4, w3a3 (default: w4a4)" in out
    assert "--pretrained-file" in out and "plain training (the baseline)\n" in out  # switches: no "(default"


@pytest.mark.slow
@pytest.mark.timeout(900)  # the example script in a subprocess; its old fixed subprocess timeouts allowed 600 s
def test_example_progress_in_a_log_is_plain_lines(image_folder, tmp_path):
    # a batch job's view: python examples/resnet50_imagenet.py ... > out.log 2> err.log, on a real ImageFolder
    import os
    import subprocess

    repo = EXAMPLES.parent
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])
    argv = ["--data-root", str(image_folder), *_TINY["resnet50_imagenet"], "--epochs", "2", "--batch-size", "4",
            "--num-workers", "0", "--ptq-bits", "w4a4", "--calib-batches", "1", "--accelerator", "cpu",
            "--devices", "1", "--out", str(tmp_path / "run")]
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with out.open("w") as fo, err.open("w") as fe:
        r = subprocess.run([sys.executable, str(EXAMPLES / "resnet50_imagenet.py"), *argv], cwd=tmp_path, env=env,
                           stdout=fo, stderr=fe, timeout=SUBPROCESS_TIMEOUT_S)
    stdout, stderr = out.read_text(), err.read_text()
    assert r.returncode == 0, stderr[-3000:]
    for text in (stdout, stderr):
        assert "\r" not in text and "\x1b[" not in text
    # 12 training images in batches of 4: a line per epoch with validation's metrics, then PTQ's plain lines
    assert stderr.count(", 3/3 batches in ") == 2 and "epoch 2/2: done, 3/3 batches in " in stderr, stderr
    line = next(ln for ln in stderr.splitlines() if ln.startswith("epoch 1/2: done"))
    assert "train/loss_step " in line and "val/acc " in line
    assert "eval w4a4: done" in stderr and "ptq/w4a4/top1" in stdout
