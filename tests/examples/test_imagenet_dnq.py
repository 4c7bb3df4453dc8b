"""examples/imagenet_dnq.py: the user's own LightningModule around a timm network, torchvision ImageFolder data and
an ordinary Trainer with DNQ and PostTrainingQuantization, end to end on an ImageFolder the test writes."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPT = EXAMPLES / "imagenet_dnq.py"


def _load():
    spec = importlib.util.spec_from_file_location("_example_imagenet_dnq", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_examples_use_only_the_library():
    """No example imports the app (ImageClassifier, data modules, progress bar): only ``flatq_lightning``'s
    public names."""
    for path in sorted(EXAMPLES.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flatq_lightning"):
                assert node.module == "flatq_lightning", f"{path.name}: from {node.module} import ..."
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("flatq_lightning.") for a in node.names), path.name


def test_arguments_and_the_arch_recipes():
    mod = _load()
    args = mod.parse_args(["--data-root", "/x", "--arch", "vit_b16", "--devices", "8", "--strategy", "ddp", "--no-dnq"])
    assert (args.data_root, args.arch, args.devices, args.strategy, args.dnq) == ("/x", "vit_b16", "8", "ddp", False)
    assert mod.ARCHS["resnet50"]["model"] == "resnet50" and mod.ARCHS["vit_b16"]["model"] == "vit_base_patch16_224"
    assert mod._devices("0,1") == [0, 1] and mod._devices("auto") == "auto" and mod._devices("4") == 4
    with pytest.raises(SystemExit):
        mod.parse_args([])  # --data-root is required
    with pytest.raises(SystemExit):
        mod.parse_args(["--data-root", "/x", "--arch", "resnet18"])


def test_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        _load().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "e.g. w4a4, w3a3 (default: w4a4)" in out and "--pretrained-file" in out
    assert "plain training (the baseline)\n" in out  # a switch: no "(default: True)"


def test_local_weights_keep_a_new_classifier(tmp_path):
    import timm
    import torch

    mod = _load()
    src = timm.create_model("test_resnet", pretrained=False)  # 1000 classes
    torch.save(src.state_dict(), tmp_path / "w.pth")
    net = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    head = net.fc.weight.detach().clone()
    mod.load_local_weights(net, str(tmp_path / "w.pth"))
    assert torch.equal(net.conv1[0].weight, src.conv1[0].weight)
    assert torch.equal(net.fc.weight, head)  # another size: left as initialised


# timm's tiny test networks at 32 px under each arch's recipe, 12 training images, one epoch, PTQ at W4A4
_TINY = {"resnet50": "test_resnet", "vit_b16": "test_vit"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "vit_b16"])
def test_example_on_an_image_folder(arch, image_folder, tmp_path, monkeypatch):
    import timm
    import torch
    import yaml

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("the example tried to load pretrained weights from the hub")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_download)
    mod = _load()
    out = tmp_path / "run"
    weights = tmp_path / "weights.pth"  # a local timm checkpoint (1000 classes): no hub, no network
    kw = {"img_size": 32} if arch == "vit_b16" else {}
    torch.save(timm.create_model(_TINY[arch], pretrained=False, **kw).state_dict(), weights)
    argv = ["--arch", arch, "--model", _TINY[arch], "--image-size", "32", "--data-root", str(image_folder),
            "--pretrained-file", str(weights), "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
            "--ptq-bits", "w4a4", "--calib-batches", "1", "--accelerator", "cpu", "--devices", "1", "--out", str(out)]
    metrics = mod.main(argv)

    assert set(metrics) == {"ptq/fp/top1", "ptq/fp/top5", "ptq/w4a4/top1", "ptq/w4a4/top5"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert (out / "ptq" / "ptq_report.json").is_file()
    # the logger got the module's hyperparameters and DNQ's and PTQ's settings, in one set
    hparams = list(out.rglob("hparams.yaml"))
    assert hparams, sorted(str(p) for p in out.rglob("*"))
    hp = yaml.safe_load(hparams[0].read_text())
    assert hp["num_classes"] == 3 and hp["model"] == _TINY[arch] and hp["pretrained_file"] == str(weights)
    assert hp["dnq/preset"] == "w4a4" and hp["ptq/bits"] == "w4a4"
    # an ordinary checkpoint: the user's own class loads it
    ckpt = out / "checkpoints" / "last.ckpt"
    weights.unlink()
    model = mod.TimmClassifier.load_from_checkpoint(ckpt, pretrained_file=None, map_location="cpu")
    assert model.model.num_classes == 3
