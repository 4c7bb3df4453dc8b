import copy

import pytest
import timm
import torch
from torch import nn

from flatq_lightning import QuantSpec, QuantTarget, fake_quantize, fold_batchnorm, quantize_model
from flatq_lightning.quant import QuantizedLayer, compute_qparams, quantized_layers
from tests.helpers import SmallConvNet, blob_data, train_small


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("factory", [lambda: SmallConvNet(), lambda: timm.create_model("resnet18", pretrained=False, num_classes=10)])
def test_fold_batchnorm_matches_eval(factory):
    model = _randomize_bn(factory()).eval()
    in_ch = 1 if isinstance(model, SmallConvNet) else 3
    x = torch.randn(2, in_ch, 32, 32)
    folded, pairs = fold_batchnorm(model, return_pairs=True)
    assert pairs, "no pairs folded"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert torch.linalg.norm(out - ref) / torch.linalg.norm(ref) < 1e-5
    # the input model is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fold_batchnorm_counts_resnet18_pairs():
    model = timm.create_model("resnet18", pretrained=False)
    _, pairs = fold_batchnorm(model, return_pairs=True)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(pairs) == n_bn == 20


def test_fold_warns_on_unmatched_bn():
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="1 BatchNorm layer"):
        folded, pairs = fold_batchnorm(net, return_pairs=True)
    assert pairs == [("1", "2")]


def test_quantize_model_does_not_mutate_and_matches_fake_quant():
    net = SmallConvNet().eval()
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(8, 1, 8, 8)
    q = quantize_model(net, QuantTarget.preset("w4a4", keep_first_last_8bit=True), calib_batches=[x])
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    layers = dict(quantized_layers(q))
    assert set(layers) == {"conv1", "conv2", "conv3", "fc"}
    assert layers["conv1"].weight_spec.bits == 8 and layers["fc"].act_spec.bits == 8
    assert layers["conv2"].weight_spec.bits == 4 and layers["conv2"].act_spec.bits == 4
    # stored weight is exactly the fake-quantized weight
    s, z = compute_qparams(net.conv2.weight, layers["conv2"].weight_spec)
    assert torch.equal(layers["conv2"].module.weight, fake_quantize(net.conv2.weight, layers["conv2"].weight_spec, s, z))
    # calibrated activation range covers the first layer's input exactly (min-max)
    sa, za = compute_qparams(x, layers["conv1"].act_spec)
    assert torch.equal(layers["conv1"].act_scale, sa) and torch.equal(layers["conv1"].act_zero_point, za)


def test_quantize_model_weight_only_and_act_only():
    net = SmallConvNet().eval()
    x = torch.randn(8, 1, 8, 8)
    wq = quantize_model(net, "w3a16")
    assert all(m.act_spec is None for _, m in quantized_layers(wq))
    aq = quantize_model(net, "w16a3", calib_batches=[x])
    assert all(m.weight_spec is None for _, m in quantized_layers(aq))
    assert torch.equal(aq.conv2.module.weight, net.conv2.weight)


def test_quantize_model_errors():
    with pytest.raises(ValueError, match="no quantizable layers"):
        quantize_model(nn.Sequential(nn.ReLU()), QuantTarget(weight=QuantSpec.weight(4)))
    with pytest.raises(ValueError, match="needs calib_batches"):
        quantize_model(SmallConvNet(), "w4a4")
    with pytest.raises(ValueError, match="saw no batches"):
        quantize_model(SmallConvNet(), "w4a4", calib_batches=[])
    with pytest.raises(ValueError, match=r"quantize_model: target must be a QuantTarget or a preset string like "
                                         r"'w4a4', got QuantSpec.*QuantSpecs go into a target"):
        quantize_model(SmallConvNet(), QuantSpec.weight(4))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize_model("net", "w4a4")


def _top1(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean() * 100)


def test_quantize_model_accuracy_direction():
    torch.manual_seed(0)
    x, y = blob_data(512)
    net = train_small(SmallConvNet(), x, y)
    fp = _top1(net, x, y)
    assert fp > 90
    folded = fold_batchnorm(net)
    q8 = quantize_model(folded, "w8a8", calib_batches=[x[:128]])
    q2 = quantize_model(folded, QuantTarget.preset("w2a2", keep_first_last_8bit=False), calib_batches=[x[:128]])
    assert abs(_top1(q8, x, y) - fp) < 1.0
    assert _top1(q2, x, y) < fp - 5


def test_quantized_layer_is_module_wrapper():
    q = quantize_model(SmallConvNet(), QuantTarget(weight=QuantSpec.weight(4)))
    assert isinstance(q.conv2, QuantizedLayer)
    assert "w4afp" in repr(q.conv2)
    assert q.conv2.weight_sqnr_db > 10
