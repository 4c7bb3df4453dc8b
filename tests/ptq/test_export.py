"""save_quantized / load_quantized: packed integer weights in safetensors (format 2), bit-for-bit round trip."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import fold_batchnorm, load_quantized, quantize_model, run_ptq, save_quantized
from flatq_lightning.ptq.export import read_metadata, unpack_codes
from flatq_lightning.quant import QuantSpec, QuantTarget, quantized_layers
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


@pytest.mark.parametrize("bits, keep", [("w4a4", True), ("w3a3", False), ("w8a8", True), ("w4a16", True),
                                        ("w16a4", True), ("w12a6", False)])
def test_round_trip_is_bit_exact(tmp_path, bits, keep):
    net = _randomize_bn(SmallConvNet())
    x = torch.randn(48, 1, 8, 8)
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    t = QuantTarget.preset(bits, keep_first_last_8bit=keep)  # a 16-bit side is None (float)
    q = quantize_model(folded, t, calib_batches=[x[:16], x[16:32]] if t.act else None)
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


def test_file_holds_packed_weights_integer_zero_points_and_original_names(tmp_path):
    net = _randomize_bn(SmallConvNet())
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    q = quantize_model(folded, "w4a4", calib_batches=[torch.randn(16, 1, 8, 8)])
    path = save_quantized(q, tmp_path / "q.safetensors", folded_bn_pairs=pairs, metadata={"run": "test"})
    t = load_file(str(path))
    assert not [k for k in t if ".module." in k or k.endswith(("weight_int", "act_scale", "act_calibrated"))]
    # conv2: 16x8x3x3 4-bit codes, two per byte, unsigned with zero point 8
    packed, scale, zp = t["conv2.weight_packed"], t["conv2.weight_scale"], t["conv2.weight_zero_point"]
    assert packed.dtype == torch.uint8 and packed.numel() == 16 * 8 * 9 // 2
    assert scale.dtype == torch.float32 and scale.shape == (16,)
    assert zp.dtype == torch.int32 and torch.equal(zp, torch.full((16,), 8, dtype=torch.int32))
    codes = torch.round(q.conv2.module.weight / scale[:, None, None, None])
    assert codes.min() >= -8 and codes.max() <= 7
    u = unpack_codes(packed, 4, codes.numel()).reshape(codes.shape)
    assert torch.equal(u.float() - 8, codes)
    assert torch.equal(packed[0], (u.flatten()[0] | (u.flatten()[1] << 4)).to(torch.uint8))  # first code low
    # conv1 and fc stay at 8 bits: one code per byte, zero point 128
    assert t["conv1.weight_packed"].numel() == 8 * 9 and int(t["conv1.weight_zero_point"][0]) == 128
    assert torch.equal(t["conv3.bias"], q.conv3.module.bias) and "bn1.running_mean" not in t  # folded
    assert t["conv2.input_scale"].shape == () and t["conv2.input_zero_point"].dtype == torch.int32
    assert float(t["conv2.input_zero_point"]) == float(q.conv2.act_zero_point)
    meta = read_metadata(path)
    assert meta["version"] == 2 and meta["format"] == "flatq-quantized"
    assert meta["folded_bn_pairs"] == [["conv1", "bn1"], ["conv2", "bn2"], ["conv3", "bn3"]]
    info = meta["layers"]["conv2"]
    assert info["weight_spec"]["bits"] == 4 and info["storage_bits"] == 4 and info["weight_shape"] == [16, 8, 3, 3]
    assert meta["layers"]["fc"]["act_spec"]["bits"] == 8
    assert meta["user"] == {"run": "test"}


@pytest.mark.parametrize("wbits, width, per_byte", [(2, 2, 4), (3, 4, 2), (4, 4, 2), (6, 8, 1), (8, 8, 1)])
def test_low_bit_weights_are_packed(tmp_path, wbits, width, per_byte):
    folded, pairs = fold_batchnorm(_randomize_bn(SmallConvNet()), return_pairs=True)
    q = quantize_model(folded, QuantTarget(weight=QuantSpec.weight(wbits), keep_first_last_8bit=False))
    path = save_quantized(q, tmp_path / "q.safetensors", folded_bn_pairs=pairs)
    t = load_file(str(path))
    n = q.conv2.module.weight.numel()
    assert t["conv2.weight_packed"].numel() == -(-n // per_byte)
    assert read_metadata(path)["layers"]["conv2"]["storage_bits"] == width
    assert torch.equal(load_quantized(SmallConvNet(), path).conv2.module.weight, q.conv2.module.weight)


def test_a_4bit_file_is_smaller_than_an_8bit_one(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    x = torch.randn(32, 256)
    size = {}
    for bits in ("w8a8", "w4a8", "w2a8"):
        q = quantize_model(net, QuantTarget.preset(bits, keep_first_last_8bit=False), calib_batches=[x])
        size[bits] = save_quantized(q, tmp_path / f"{bits}.safetensors").stat().st_size
    weights = 256 * 256 * 2 + 256 * 4
    assert size["w8a8"] > weights and size["w4a8"] < 0.55 * size["w8a8"] and size["w2a8"] < 0.6 * size["w4a8"]


def test_the_reader_in_docs_rebuilds_the_float_weights_bit_exact(tmp_path):
    """docs/export.md's ten-line reader, run as it is printed there, against the quantized model."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "export.md").read_text()
    code = doc.split("<!-- reader:start -->")[1].split("<!-- reader:end -->")[0]
    code = code.split("```python")[1].split("```")[0]
    ns: dict = {}
    exec(compile(code, "docs/export.md", "exec"), ns)  # noqa: S102 - the repository's own documentation
    net = _randomize_bn(SmallConvNet())
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    for bits, keep in (("w4a4", True), ("w2a4", False), ("w3a8", False), ("w8a8", True), ("w12a8", False)):
        q = quantize_model(
            folded,
            QuantTarget.preset(bits, keep_first_last_8bit=keep),
            calib_batches=[torch.randn(16, 1, 8, 8)],
        )
        path = save_quantized(q, tmp_path / f"{bits}.safetensors", folded_bn_pairs=pairs)
        weights, inputs, meta = ns["read_flatq"](str(path))
        for name, layer in quantized_layers(q):
            assert torch.equal(weights[f"{name}.weight"], layer.module.weight)
            assert torch.equal(inputs[name][0], layer.act_scale) and inputs[name][1] == int(layer.act_zero_point)
        # what the reader returns is the folded FP network's state dict with the quantized weights
        plain = fold_batchnorm(SmallConvNet())
        plain.load_state_dict(weights, strict=True)
        for name, layer in quantized_layers(q):
            assert torch.equal(plain.get_submodule(name).weight, layer.module.weight)


def test_version_1_files_are_refused_with_a_message(tmp_path):
    """The first format (development versions only, never released) is no longer read: one clear error."""
    import json

    from safetensors.torch import save_file

    meta = {"format": "flatq-quantized", "version": 1, "folded_bn_pairs": None, "layers": {}, "user": {}}
    save_file({"x": torch.zeros(1)}, str(tmp_path / "v1.safetensors"), metadata={"flatq": json.dumps(meta), "format": "pt"})
    with pytest.raises(ValueError, match="format version 1 .* export the model again"):
        load_quantized(SmallConvNet(), tmp_path / "v1.safetensors")

def test_files_are_never_silently_replaced(tmp_path):
    folded = fold_batchnorm(SmallConvNet())
    q = quantize_model(folded, QuantTarget(weight=QuantSpec.weight(4)))
    path = save_quantized(q, tmp_path / "q.safetensors")
    before = path.read_bytes()
    q8 = quantize_model(folded, QuantTarget(weight=QuantSpec.weight(8)))
    with pytest.raises(FileExistsError, match="q.safetensors exists already"):
        save_quantized(q8, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]  # no temp left
    save_quantized(q8, path, overwrite=True)
    assert path.read_bytes() != before
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not safetensors' private 0600


def test_unfolded_model_round_trip(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(32, 4, 4)
    q = quantize_model(net, "w3a4", calib_batches=[x])
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
    ref = quantize_model(fold_batchnorm(net), "w4a4", calib_batches=[x[:64], x[64:]])
    r = load_quantized(SmallConvNet(), tmp_path / "quantized_w4a4.safetensors")
    with torch.no_grad():
        assert torch.equal(ref(x), r(x))
    assert (tmp_path / "quantized_w4a16.safetensors").exists()
    # a second run keeps the first files and numbers its own
    rep = run_ptq(net, loader, loader, bits=("w4a4",), calib_batches=2, progress=False, export_dir=tmp_path)
    assert (tmp_path / "quantized_w4a4_2.safetensors").exists()
    (e,) = rep.row("w4a4").exports
    assert e["format"] == "safetensors" and e["path"].endswith("quantized_w4a4_2.safetensors") and e["bytes"] > 0


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no QuantizedLayer"):
        save_quantized(SmallConvNet(), tmp_path / "x.safetensors")
    folded, pairs = fold_batchnorm(SmallConvNet(), return_pairs=True)
    q = quantize_model(folded, QuantTarget(weight=QuantSpec.weight(4)))
    with torch.no_grad():
        q.conv2.module.weight.add_(1e-3)
    with pytest.raises(ValueError, match="not on its 4-bit grid"):
        save_quantized(q, tmp_path / "x.safetensors")
    q = quantize_model(folded, QuantTarget(weight=QuantSpec.weight(4)))
    path = save_quantized(q, tmp_path / "q.safetensors", folded_bn_pairs=pairs)
    with pytest.raises(ValueError, match="does not match this architecture"):
        load_quantized(SmallConvNet(width=4), path)
    with pytest.raises(ValueError, match="has no layer 'conv1'"):
        load_quantized(nn.Sequential(nn.Linear(2, 2)), save_quantized(q, tmp_path / "nf.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a flatq quantized model"):
        load_quantized(SmallConvNet(), tmp_path / "plain.safetensors")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "bad.safetensors"), metadata={"flatq": "{not json"})
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quantized(SmallConvNet(), tmp_path / "bad.safetensors")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "v9.safetensors"),
              metadata={"flatq": '{"format": "flatq-quantized", "version": 9, "layers": {}}'})
    with pytest.raises(ValueError, match="version 9"):
        load_quantized(SmallConvNet(), tmp_path / "v9.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(SmallConvNet(), tmp_path / "junk.safetensors")
    q = quantize_model(folded, QuantTarget(weight=QuantSpec(bits=4, granularity="per_channel", symmetric=False)))
    with pytest.raises(ValueError, match="asymmetric weight quantization is not exported"):
        save_quantized(q, tmp_path / "asym.safetensors")


# mixed precision (QuantTarget.layer_bits) ----------------------------------------------------------------------
def test_a_mixed_precision_plan_round_trips_bit_exact(tmp_path):
    """Per-layer widths (int2, int4 and int8 weights in one model, 4- and 8-bit inputs) are written and read back
    bit for bit, each weight packed at its own storage width."""
    net = _randomize_bn(SmallConvNet())
    x = torch.randn(48, 1, 8, 8)
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    plan = QuantTarget.preset("w4a4").with_layer_bits({"conv2": (8, 8), "conv3": (2, None), "fc": (4, None)})
    q = quantize_model(folded, plan, calib_batches=[x[:16], x[16:32]])
    bits = {n: (m.weight_spec.bits, m.act_spec.bits) for n, m in quantized_layers(q)}
    assert bits == {"conv1": (8, 8), "conv2": (8, 8), "conv3": (2, 4), "fc": (4, 8)}
    path = save_quantized(q, tmp_path / f"quantized_{plan.name}.safetensors", folded_bn_pairs=pairs)
    layers = read_metadata(path)["layers"]
    assert {n: (layers[n]["weight_bits"], layers[n]["storage_bits"]) for n in bits} == {
        "conv1": (8, 8), "conv2": (8, 8), "conv3": (2, 2), "fc": (4, 4)
    }
    r = load_quantized(SmallConvNet(), path)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
    for name, layer in quantized_layers(q):
        back = getattr(r, name)
        assert (back.weight_spec, back.act_spec) == (layer.weight_spec, layer.act_spec), name
        assert torch.equal(back.module.weight, layer.module.weight), name
        assert torch.equal(back.act_scale, layer.act_scale) and torch.equal(back.act_zero_point, layer.act_zero_point)


def test_a_plan_at_the_uniform_widths_equals_the_uniform_target_bit_for_bit(tmp_path):
    net = _randomize_bn(SmallConvNet())
    x = torch.randn(48, 1, 8, 8)
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    uniform_target = QuantTarget.preset("w3a3")
    uniform = quantize_model(folded, uniform_target, calib_batches=[x[:16], x[16:32]])
    plan = uniform_target.with_layer_bits(
        {n: (m.weight_spec.bits, m.act_spec.bits) for n, m in quantized_layers(uniform)}  # conv1 and fc at 8
    )
    mixed = quantize_model(folded, plan, calib_batches=[x[:16], x[16:32]])
    a, b = uniform.state_dict(), mixed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(uniform(x), mixed(x))
    pa = save_quantized(uniform, tmp_path / "uniform.safetensors", folded_bn_pairs=pairs)
    pb = save_quantized(mixed, tmp_path / "plan.safetensors", folded_bn_pairs=pairs)
    ta, tb = load_file(str(pa)), load_file(str(pb))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert read_metadata(pa)["layers"] == read_metadata(pb)["layers"]
