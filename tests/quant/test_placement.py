"""Quantizer placement (flatq_lightning.quant.placement): the points of the "onnxruntime" policy, one quantizer per
tensor, and everything that builds a quantized model following them."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from torch import nn

from flatq_lightning.app.models.cifar_resnet import CifarResNet
from flatq_lightning.quant import fold_batchnorm, quantize_model, quantized_layers
from flatq_lightning.quant.placement import (
    PLACEMENTS,
    attach_placement_points,
    detach_placement_points,
    placement_points,
    residual_blocks,
)
from flatq_lightning.quant.reconstruct import Reconstruction, reconstruct


def _tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    net = CifarResNet(depth=8, num_classes=4, widths=(4, 8, 8)).eval()
    for m in net.modules():  # BN statistics that are not the identity, so folding matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return net


def _active(q: nn.Module) -> dict[str, object]:
    """Layer name -> act spec of every quantizer that quantizes its input."""
    return {n: m.act_spec for n, m in quantized_layers(q) if m.act_spec is not None}


def test_points_are_identities_until_quantized_and_detach_restores():
    net = _tiny_resnet()
    x = torch.randn(3, 3, 16, 16)
    ref = net(x)
    keys = list(net.state_dict())
    created = attach_placement_points(net, "onnxruntime")
    assert created == placement_points(net)
    assert "layer1.0.quant_in" in created and "layer1.0.bn2.quant_out" in created and "pool.quant_in" in created
    assert "layer2.0.shortcut.1.quant_out" in created  # the projection shortcut's output
    assert attach_placement_points(net, "onnxruntime") == []  # idempotent
    assert torch.equal(net(x), ref)
    assert list(net.state_dict()) == keys  # points hold no state
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):  # hooks are module-level functions
        assert placement_points(clone) == created
        assert torch.equal(clone(x), ref)
    assert detach_placement_points(net) == created
    assert placement_points(net) == [] and not net.layer1[0]._forward_hooks and not net.layer1[0]._forward_pre_hooks
    assert attach_placement_points(net, "layer_inputs") == []


def test_unknown_placement_is_refused_everywhere():
    net = _tiny_resnet()
    with pytest.raises(ValueError, match="placement must be one of"):
        attach_placement_points(net, "tensorrt")
    with pytest.raises(ValueError, match="placement must be one of"):
        quantize_model(net, "w8a8", calib_batches=[torch.randn(2, 3, 16, 16)], placement="ort")
    assert PLACEMENTS == ("layer_inputs", "onnxruntime")


def test_every_residual_add_has_quantized_operands_and_output():
    net = _tiny_resnet()
    x = torch.randn(16, 3, 16, 16)
    q = quantize_model(fold_batchnorm(net), "w4a4", calib_batches=[x], placement="onnxruntime")
    active = _active(q)
    blocks = residual_blocks(q)
    assert blocks == ["layer1.0", "layer2.0", "layer3.0"]
    for b in blocks:
        assert f"{b}.bn2.quant_out" in active  # the branch's operand of the Add
        assert f"{b}.quant_out" in active  # the Add's output (after its ReLU)
    assert "layer2.0.shortcut.1.quant_out" in active and "layer3.0.shortcut.1.quant_out" in active
    assert "layer1.0.quant_in" in active  # the identity shortcut's operand: the block's quantized input
    # one quantizer per tensor: the next block's input, its first conv and the pool read a quantized tensor
    shared = {n: m.input_from for n, m in quantized_layers(q) if m.input_from}
    assert shared["layer1.0.conv1"] == "layer1.0.quant_in"
    assert shared["layer2.0.quant_in"] == "layer1.0.quant_out"
    assert shared["layer2.0.conv1"] == shared["layer2.0.shortcut.0"] == "layer1.0.quant_out"
    assert shared["pool.quant_in"] == "layer3.0.quant_out"
    assert all(q.get_submodule(n).act_spec is None for n in shared)
    assert "input quantized by layer1.0.quant_in" in repr(q.layer1[0].conv1)
    # the layer-input placement has none of these points, and gives a different model
    q0 = quantize_model(fold_batchnorm(net), "w4a4", calib_batches=[x])
    assert not placement_points(q0) and not any(m.input_from for _, m in quantized_layers(q0))
    assert not torch.equal(q(x), q0(x))


def test_in_place_add_is_a_new_tensor_for_sharing():
    """timm's BasicBlock adds the shortcut in place (``x += shortcut``) into the branch point's output and applies
    an in-place ReLU: the block's output point must not be taken for the branch point (same object, new data)."""
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    x = torch.randn(8, 3, 32, 32)
    q = quantize_model(net, "w8a8", calib_batches=[x], fold_bn=True, placement="onnxruntime")
    for b in residual_blocks(q):
        assert q.get_submodule(f"{b}.quant_out").act_spec is not None, b
        norm = "bn3" if hasattr(q.get_submodule(b), "conv3") else "bn2"  # test_resnet mixes Basic and Bottleneck
        assert q.get_submodule(f"{b}.{norm}.quant_out").act_spec is not None, b
    assert q.get_submodule("maxpool.quant_in").act_spec is not None  # the stem conv's output before pooling


def test_placement_points_follow_the_first_last_policy_and_weight_only_rows():
    net = _tiny_resnet()
    x = torch.randn(8, 3, 16, 16)
    q = quantize_model(fold_batchnorm(net), "w4a4", calib_batches=[x], placement="onnxruntime")
    assert all(s.bits == 4 for n, s in _active(q).items() if "quant_" in n)  # points are never first/last
    assert q.conv1.act_spec.bits == 8 and q.fc.act_spec.bits == 8
    wq = quantize_model(fold_batchnorm(net), "w4a16", placement="onnxruntime")  # weight only: no points
    assert not placement_points(wq)


def test_bn_reestimation_and_a_model_trained_with_points():
    net = _tiny_resnet()
    x = torch.randn(16, 3, 16, 16)
    q = quantize_model(net, "w4a4", calib_batches=[x], fold_bn=True, bn_reestimate=True, placement="onnxruntime")
    assert "layer1.0.quant_out" in _active(q)
    # a model that already carries points (trained with them) is re-placed by the call's own placement
    carrying = copy.deepcopy(net)
    attach_placement_points(carrying)
    q0 = quantize_model(carrying, "w4a4", calib_batches=[x], fold_bn=True)
    assert not placement_points(q0)
    q1 = quantize_model(carrying, "w4a4", calib_batches=[x], fold_bn=True, placement="onnxruntime")
    q2 = quantize_model(net, "w4a4", calib_batches=[x], fold_bn=True, placement="onnxruntime")
    assert torch.equal(q1(x), q2(x))


def test_fold_batchnorm_folds_timm_batchnorm_act():
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU6), nn.Conv2d(8, 4, 1),
                        BatchNormAct2d(4, apply_act=False)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8) * 3
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    assert pairs == [("0", "1"), ("2", "3")]
    assert isinstance(folded[1], nn.ReLU6) and isinstance(folded[3], nn.Identity)
    torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)


def test_reconstruction_learns_the_placement_points():
    net = fold_batchnorm(_tiny_resnet())
    x = torch.randn(64, 3, 16, 16)
    q = quantize_model(net, "w3a3", calib_batches=[x], placement="onnxruntime")
    with torch.no_grad():
        before = float((q(x) - net(x)).pow(2).mean())
    out_scale = q.layer1[0].quant_out.act_scale.clone()
    res = reconstruct(q, net, net, x, Reconstruction(iters=30, batch_size=16, drop_prob=0.0))
    names = [r.name for r in res]
    assert "pool.quant_in" not in names  # shared: nothing to learn
    assert "layer1.0" in names
    block = next(r for r in res if r.name == "layer1.0")
    assert "layer1.0.quant_out" in block.layers and "layer1.0.bn2.quant_out" in block.layers
    assert not torch.equal(q.layer1[0].quant_out.act_scale, out_scale)  # its step size was learned
    with torch.no_grad():
        assert float((q(x) - net(x)).pow(2).mean()) < before
