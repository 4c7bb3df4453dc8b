"""The "onnxruntime" quantizer placement, exported: QDQ pairs at exactly the fake-quant model's quantizers, every
convolution of a residual network on ONNX Runtime's integer kernels, parity with the fake-quant model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from flatq_lightning import fold_batchnorm, quantize_model, run_ptq  # noqa: E402
from flatq_lightning.app.models.cifar_resnet import CifarResNet  # noqa: E402
from flatq_lightning.ptq.export import load_quantized, save_quantized  # noqa: E402
from flatq_lightning.ptq.onnx_export import check_onnx_parity, export_onnx, ort_kernels  # noqa: E402
from flatq_lightning.ptq.recipe import PTQRecipe  # noqa: E402
from flatq_lightning.quant import quantized_layers  # noqa: E402
from flatq_lightning.quant.placement import placement_points, residual_blocks  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = CifarResNet(depth=8, num_classes=4, widths=(8, 16, 16)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.normal_(0, 0.2)
    return net


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    return x, y


def _quantize(placement: str, x: torch.Tensor, bits: str = "w8a8") -> nn.Module:
    return quantize_model(fold_batchnorm(_net()), bits, calib_batches=[x[:128]], placement=placement)


def _n_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_qdq_pairs_at_exactly_the_fake_quant_quantizers(data, tmp_path):
    x, _ = data
    q = _quantize("onnxruntime", x)
    path = export_onnx(q, tmp_path / "q.onnx", x[:1])
    graph = onnx.load(str(path)).graph
    quantizers = {n for n, m in quantized_layers(q) if m.act_spec is not None}
    q_nodes = {n.name.removesuffix("/input/QuantizeLinear") for n in graph.node if n.op_type == "QuantizeLinear"}
    assert q_nodes == quantizers
    assert len([n for n in graph.node if n.op_type == "DequantizeLinear" and "/input/" in n.name]) == len(quantizers)
    for b in residual_blocks(q):  # every residual Add: both operands dequantized, its output quantized
        assert {f"{b}.bn2.quant_out", f"{b}.quant_out"} <= quantizers
    adds = [n for n in graph.node if n.op_type == "Add" and n.name.startswith("/layer")]  # not the fc's bias
    assert len(adds) == len(residual_blocks(q))
    producers = {o: n for n in graph.node for o in n.output}
    for add in adds:
        assert all(producers[i].op_type == "DequantizeLinear" for i in add.input), add.name


def test_every_convolution_runs_on_integer_kernels(data, tmp_path):
    x, _ = data
    net = _net()
    new = ort_kernels(export_onnx(_quantize("onnxruntime", x), tmp_path / "new.onnx", x[:1]))
    old = ort_kernels(export_onnx(_quantize("layer_inputs", x), tmp_path / "old.onnx", x[:1]))
    convs = _n_convs(net)
    assert new["ops"].get("QLinearConv", 0) == convs
    assert new["ops"].get("Conv", 0) == new["ops"].get("FusedConv", 0) == 0
    assert new["ops"].get("QLinearAdd", 0) == len(residual_blocks(net))
    # the layer-input placement leaves the convolutions that feed a residual Add in float
    assert old["ops"].get("QLinearConv", 0) < convs
    assert old["ops"].get("QLinearAdd", 0) == 0


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
def test_parity_with_onnx_runtime(data, tmp_path, bits):
    x, y = data
    q = _quantize("onnxruntime", x, bits)
    path = export_onnx(q, tmp_path / f"{bits}.onnx", x[:1])
    batches = list(DataLoader(TensorDataset(x, y), batch_size=64))
    p = check_onnx_parity(q, path, batches)
    assert p.agreement >= 99.0, p.line()
    assert abs(p.top1_ort - p.top1_flatq) <= 1.0, p.line()  # 256 samples: at most a couple of them differ
    pf = check_onnx_parity(q, path, batches, optimization="disable")  # the graph as written: float kernels
    assert pf.agreement >= 99.5 and pf.mean_abs_logit_diff < 1e-4, pf.line()


def test_safetensors_round_trip_keeps_the_points(data, tmp_path):
    x, _ = data
    net = _net()
    folded, pairs = fold_batchnorm(net, return_pairs=True)
    q = quantize_model(folded, "w4a4", calib_batches=[x[:128]], placement="onnxruntime")
    path = save_quantized(q, tmp_path / "q.safetensors", folded_bn_pairs=pairs)
    back = load_quantized(net, path)
    assert placement_points(back) == placement_points(q)
    assert {n: m.input_from for n, m in quantized_layers(back)} == {n: m.input_from for n, m in quantized_layers(q)}
    assert torch.equal(back(x), q(x))


def test_run_ptq_with_the_placement_recipe_exports_and_reports(data, tmp_path):
    x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    recipe = PTQRecipe.preset("practical", placement="onnxruntime", bn_batches=2)
    report = run_ptq(_net(), loader, loader, bits=("w8a8",), recipe=recipe, calib_batches=2, progress=False,
                     export_dir=tmp_path / "export", export_formats=("onnx", "safetensors"))
    onnx_e, st_e = report.row("w8a8").exports
    assert report.recipe["placement"] == "onnxruntime"
    assert onnx_e["agreement"] >= 99.0 and abs(onnx_e["top1_ort"] - onnx_e["top1_flatq"]) <= 1.0
    back = load_quantized(_net(), st_e["path"])
    assert placement_points(back)
    kernels = ort_kernels(onnx_e["path"])
    assert kernels["ops"].get("QLinearConv", 0) == _n_convs(_net()) and kernels["ops"].get("Conv", 0) == 0
    assert "placed for onnxruntime" in recipe.describe()
    assert recipe.settings()["ptq/placement"] == "onnxruntime"
    with pytest.raises(ValueError, match="placement must be one of"):
        PTQRecipe.preset("minmax", placement="tensorrt")


def test_equal_weights_leave_no_float_copy_in_the_file(tmp_path):
    """Two convolutions with equal weights (zero-initialised last BN of an untrained timm ResNet, folded): the
    exporter shares them through Identity nodes, which must go with the float weights they read."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()
    with torch.no_grad():
        net[2].weight.zero_()
        net[4].weight.zero_()
    x = torch.randn(4, 3, 8, 8)
    q = quantize_model(net, "w8a8", calib_batches=[x])
    graph = onnx.load(str(export_onnx(q, tmp_path / "q.onnx", x[:1]))).graph
    floats = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.name.endswith("weight")]
    assert floats == []
    assert not [n for n in graph.node if n.op_type == "Identity"]


@pytest.mark.slow
def test_flatq_ptq_placement_on_a_cifar_checkpoint(tmp_path, monkeypatch, capsys):
    """`flatq-ptq --placement onnxruntime --export onnx` on the real kind of input: a ResNet-20 checkpoint that
    flatq-train wrote from a CIFAR-style JPEG zip; the file runs every convolution and residual add as integer
    kernels in ONNX Runtime and agrees with the fake-quant model."""
    from flatq_lightning.app import ptq_cli
    from flatq_lightning.app.train import run
    from tests.app.test_train import _compose
    from tests.test_benchmarks import _tiny_cifar_zip

    monkeypatch.setenv("FLATQ_CACHE", str(tmp_path / "cache"))
    data = _tiny_cifar_zip(tmp_path)
    cfg = _compose(["data=cifar10", f"data.path={data}", "data.num_workers=0", "data.batch_size=8",
                    "data.eval_batch_size=32", "model=cifar_resnet20", "variants=null", "callbacks=[checkpoint]",
                    "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "ptq.bits=[]", "print_table=false"])
    ckpt = run(cfg, tmp_path / "fit")["variants"]["main"]["checkpoint"]
    out = tmp_path / "deploy"
    rc = ptq_cli.main([ckpt, "--bits", "w8a8", "--calib-batches", "2", "--no-progress", "--device", "cpu",
                       "--placement", "onnxruntime", "--export", "onnx", "--save-dir", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    rep = json.loads((out / "ptq_report.json").read_text())
    assert rep["recipe"]["placement"] == "onnxruntime"
    export = rep["rows"][0]["exports"][0]
    assert export["samples"] == rep["num_eval_samples"] and export["agreement"] >= 95.0  # tiny test split
    kernels = ort_kernels(out / "quantized_w8a8.onnx")
    assert kernels["ops"].get("QLinearConv", 0) == 21 and kernels["ops"].get("Conv", 0) == 0
    assert kernels["ops"].get("QLinearAdd", 0) == 9
