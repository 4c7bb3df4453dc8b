"""save_quantized / load_quantized: integer weights in safetensors, bit-for-bit round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import fold_batchnorm, load_quantized, quantize_model, run_ptq, save_quantized
from flatq_lightning.ptq.export import read_metadata
from flatq_lightning.quant import QuantSpec, quantized_layers
from tests.helpers import SmallConvNet, blob_data


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _specs(bits: str):
    w, a = QuantSpec.parse(bits)
    return (None if w.bits >= 16 else w), (None if a.bits >= 16 else a)


@pytest.mark.parametrize("bits, keep", [("w4a4", True), ("w3a3", False), ("w8a8", True), ("w4a16", True),
                                        ("w16a4", True), ("w12a6", False)])
def test_round_trip_is_bit_exact(tmp_path, bits, keep):
    net = _randomize_bn(SmallConvNet())
    x = torch.randn(48, 1, 8, 8)
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    w, a = _specs(bits)
    q = quantize_model(folded, w, a, calib_batches=[x[:16], x[16:32]] if a else None, keep_first_last_8bit=keep)
    path = save_quantized(q, tmp_path / f"quantized_{bits}.safetensors", folded_bn_pairs=pairs)
    fresh = SmallConvNet()  # untrained architecture: every number comes from the file
    before = copy.deepcopy(fresh.state_dict())
    r = load_quantized(fresh, path)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
    assert not r.training
    for k, v in fresh.state_dict().items():  # the FP architecture is not mutated
        assert torch.equal(v, before[k])
    for (n1, l1), (n2, l2) in zip(quantized_layers(q), quantized_layers(r)):
        assert n1 == n2 and l1.weight_spec == l2.weight_spec and l1.act_spec == l2.act_spec
        assert l1.weight_sqnr_db == pytest.approx(l2.weight_sqnr_db)


def test_file_holds_integer_weights_scales_and_metadata(tmp_path):
    net = _randomize_bn(SmallConvNet())
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    q = quantize_model(folded, *QuantSpec.parse("w4a4"), calib_batches=[torch.randn(16, 1, 8, 8)])
    path = save_quantized(q, tmp_path / "q.safetensors", folded_bn_pairs=pairs, metadata={"run": "test"})
    t = load_file(str(path))
    qi, scale = t["conv2.weight_int"], t["conv2.weight_scale"]
    assert qi.dtype == torch.int8 and scale.shape == (16,)
    assert int(qi.min()) >= -8 and int(qi.max()) <= 7  # 4-bit grid
    assert t["conv1.weight_int"].abs().max() <= 127 and int(t["conv1.weight_int"].abs().max()) > 7  # kept at 8
    assert torch.equal(qi, torch.round(q.conv2.module.weight / scale[:, None, None, None]).to(torch.int8))
    assert "conv2.module.weight" not in t
    assert t["conv2.act_scale"].shape == () and t["conv2.act_zero_point"].shape == ()
    meta = read_metadata(path)
    assert meta["folded_bn_pairs"] == [["conv1", "bn1"], ["conv2", "bn2"], ["conv3", "bn3"]]
    assert meta["layers"]["conv2"]["weight_spec"]["bits"] == 4 and meta["layers"]["fc"]["act_spec"]["bits"] == 8
    assert meta["user"] == {"run": "test"}


def test_unfolded_model_round_trip(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(32, 4, 4)
    q = quantize_model(net, *QuantSpec.parse("w3a4"), calib_batches=[x])
    path = save_quantized(q, tmp_path / "q.safetensors")
    assert read_metadata(path)["folded_bn_pairs"] is None
    r = load_quantized(nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                                     nn.Linear(12, 3)), path)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))


def test_run_ptq_export_matches_quantize_model(tmp_path):
    x, y = blob_data(128)
    net = _randomize_bn(SmallConvNet())
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    run_ptq(net, loader, loader, bits=("w4a4", "w4a16"), calib_batches=2, progress=False, export_dir=tmp_path)
    ref = quantize_model(fold_batchnorm(net), *QuantSpec.parse("w4a4"), calib_batches=[x[:64], x[64:]])
    r = load_quantized(SmallConvNet(), tmp_path / "quantized_w4a4.safetensors")
    with torch.no_grad():
        assert torch.equal(ref(x), r(x))
    assert (tmp_path / "quantized_w4a16.safetensors").exists()


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no QuantizedLayer"):
        save_quantized(SmallConvNet(), tmp_path / "x.safetensors")
    folded, pairs = fold_batchnorm(SmallConvNet(), return_pairs=True)
    q = quantize_model(folded, QuantSpec.weight(4), None)
    with torch.no_grad():
        q.conv2.module.weight.add_(1e-3)
    with pytest.raises(ValueError, match="not on its 4-bit grid"):
        save_quantized(q, tmp_path / "x.safetensors")
    q = quantize_model(folded, QuantSpec.weight(4), None)
    path = save_quantized(q, tmp_path / "q.safetensors", folded_bn_pairs=pairs)
    with pytest.raises(ValueError, match="does not match this architecture"):
        load_quantized(SmallConvNet(width=4), path)
    with pytest.raises(ValueError, match="has no layer 'conv1'"):
        load_quantized(nn.Sequential(nn.Linear(2, 2)), save_quantized(q, tmp_path / "nf.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a flatq quantized model"):
        load_quantized(SmallConvNet(), tmp_path / "plain.safetensors")
