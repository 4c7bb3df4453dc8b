import warnings

import pytest
import torch
from torch import nn

from flatq_lightning.app.models import LOCAL_MODELS, CifarResNet, create_model, is_model
from flatq_lightning.quant import fold_batchnorm, select_modules


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "name,shape,in_chans",
    [
        ("cifar_resnet20", (2, 3, 32, 32), 3),
        ("cifar_resnet56", (2, 3, 32, 32), 3),
        ("small_cnn", (2, 1, 16, 16), 1),
        ("small_cnn", (2, 1, 8, 8), 1),
    ],
)
def test_local_models_output_shape(name, shape, in_chans):
    net = create_model(name, num_classes=7, in_chans=in_chans).eval()
    assert net(torch.randn(shape)).shape == (2, 7)


def test_cifar_resnet_parameter_counts():
    # the classic ResNet-20 has 0.27 M parameters (option-B shortcuts add ~2.7 k)
    assert 265_000 <= _params(create_model("cifar_resnet20", 10)) <= 275_000
    assert 850_000 <= _params(create_model("cifar_resnet56", 10)) <= 860_000
    assert _params(create_model("cifar_resnet20", 10)) == 272_474


def test_cifar_resnet_structure_stage_widths_and_shortcuts():
    net = create_model("cifar_resnet20", 10)
    assert [len(s) for s in (net.layer1, net.layer2, net.layer3)] == [3, 3, 3]
    assert net.layer1[0].conv1.out_channels == 16
    assert net.layer2[0].conv1.out_channels == 32 and net.layer2[0].conv1.stride == (2, 2)
    assert net.layer3[-1].conv2.out_channels == 64
    sc = net.layer2[0].shortcut
    assert isinstance(sc[0], nn.Conv2d) and sc[0].kernel_size == (1, 1) and isinstance(sc[1], nn.BatchNorm2d)
    assert isinstance(net.layer1[0].shortcut, nn.Identity)
    # 19 weighted layers + 2 projection shortcuts, all quantizable
    assert len(select_modules(net)) == 22


@pytest.mark.parametrize("name", ["cifar_resnet20", "small_cnn"])
def test_every_batchnorm_folds(name):
    net = create_model(name, 10, in_chans=3).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fold_batchnorm warns about any BN it cannot fold
        folded, pairs = fold_batchnorm(net, return_pairs=True)
    assert len(pairs) == n_bn
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)


def test_cifar_resnet_depth_validation():
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=21)


@pytest.mark.parametrize("name,kw", [("test_resnet", {}), ("test_vit", {"img_size": 32})])
def test_timm_models(name, kw):
    net = create_model(name, num_classes=5, pretrained=False, **kw).eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_timm_in_chans_passthrough():
    net = create_model("test_resnet", num_classes=3, in_chans=1).eval()
    assert net(torch.randn(1, 1, 32, 32)).shape == (1, 3)


def test_unknown_name_lists_local_choices_and_timm():
    with pytest.raises(ValueError) as ei:
        create_model("resnet_does_not_exist", 10)
    msg = str(ei.value)
    assert "resnet_does_not_exist" in msg and "timm" in msg
    for local in LOCAL_MODELS:
        assert local in msg
    assert not is_model("resnet_does_not_exist") and is_model("small_cnn") and is_model("resnet50")


def test_bad_arguments():
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("cifar_resnet20", 10, pretrained=True)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cifar_resnet20", 0)
    with pytest.raises(ValueError, match="bad keyword"):
        create_model("cifar_resnet20", 10, bogus=1)


# --- pretrained weights from a local file, and a fast, one-line failure offline -----------------------------
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_pretrained_file_loads_a_local_timm_state_dict(fmt, tmp_path):
    import timm

    src = timm.create_model("test_resnet")  # 1000 classes, random weights: "ImageNet" weights we saved
    path = tmp_path / f"weights.{fmt}"
    if fmt == "pth":
        torch.save(src.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    same = create_model("test_resnet", num_classes=1000, pretrained_file=str(path))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), src.state_dict().values()))
    # another number of classes: the body is loaded, the classifier re-initialised (timm's rule)
    three = create_model("test_resnet", num_classes=3, pretrained_file=path)
    assert torch.equal(three.conv1[0].weight, src.conv1[0].weight) and three.fc.out_features == 3
    assert torch.equal(three.layer4[0].conv2.weight, src.layer4[0].conv2.weight)


def test_pretrained_file_errors_name_the_parameter(tmp_path):
    from flatq_lightning.app.models import PretrainedWeightsError

    with pytest.raises(PretrainedWeightsError, match=r"^pretrained_file: no checkpoint file at .*nope\.pth"):
        create_model("test_resnet", num_classes=3, pretrained_file=tmp_path / "nope.pth")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="local model 'small_cnn' has no pretrained weights"):
        create_model("small_cnn", num_classes=3, pretrained_file=tmp_path / "w.pth")


def test_pretrained_offline_fails_fast_in_one_line(monkeypatch):
    import timm

    from flatq_lightning.app import models
    from flatq_lightning.app.models import PretrainedWeightsError

    def no_download(*args, **kwargs):  # "fast" = timm (and its minute of hub retries) is never reached
        raise AssertionError("timm.create_model was called: the availability check did not stop the download")

    probed = []
    monkeypatch.setattr(models, "_weights_cached", lambda *a: False)
    monkeypatch.setattr(models, "_reachable", lambda url, timeout_s=5.0: probed.append(url) or False)
    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.raises(PretrainedWeightsError) as ei:
        create_model("test_resnet", num_classes=3, pretrained=True)
    # one probe of the hub and no download attempt (no wall-clock bound: it fails on a loaded machine)
    assert probed == ["https://huggingface.co"]
    msg = str(ei.value)
    assert "\n" not in msg and "'test_resnet'" in msg and "huggingface.co cannot be reached" in msg
    assert "model.pretrained_file=PATH" in msg and "--pretrained-file PATH" in msg
    # HF_HUB_OFFLINE=1: no probe at all
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="HF_HUB_OFFLINE is set"):
        create_model("test_resnet", num_classes=3, pretrained=True)
    assert len(probed) == 1
    # cached weights pass the check (timm then loads them itself)
    monkeypatch.setattr(models, "_weights_cached", lambda *a: True)
    models.check_pretrained_available("test_resnet")


def test_reachable_is_false_for_an_unresolvable_host():
    from flatq_lightning.app.models import _reachable

    assert _reachable("https://nonexistent.invalid", timeout_s=2.0) is False
