"""run_ptq: PTQ of a trained network at several bit-widths, checked against an independent forward."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from flatq_lightning import PostTrainingQuantization, fold_batchnorm, quantize_model, run_ptq
from flatq_lightning.ptq.export import load_quantized
from flatq_lightning.quant import QuantTarget
from tests.helpers import SmallConvNet, blob_data
from tests.ptq.helpers import (
    LAYERS,
    _LitNet,
    _loader,
    _top1,
    hand_quantized_forward,
)


def test_w8a8_top1_matches_independent_forward(trained):
    net, (x, y), (xe, ye) = trained
    calib_batches = 4
    rep = run_ptq(net, _loader(x, y), _loader(xe, ye), bits=("w8a8", "w4a4"), calib_batches=calib_batches, progress=False)
    folded = fold_batchnorm(net)
    calib = [x[i * 64 : (i + 1) * 64] for i in range(calib_batches)]
    with torch.no_grad():
        fp_logits = net(xe)
    assert rep.fp_top1 == pytest.approx(_top1(fp_logits, ye), abs=1e-6)
    assert rep.fp_top1 > 90
    for bits, wb, ab in (("w8a8", 8, 8), ("w4a4", 4, 4)):
        logits = hand_quantized_forward(folded, calib, xe, wb, ab)
        assert rep.row(bits).top1 == pytest.approx(_top1(logits, ye), abs=1e-6), bits
        assert rep.row(bits).drop_top1 == pytest.approx(rep.fp_top1 - rep.row(bits).top1)
        # the quantized forward is bit-for-bit quantize_model's
        q = quantize_model(folded, bits, calib_batches=calib)
        with torch.no_grad():
            assert torch.equal(q(xe), logits), bits
    # 4 classes: "top-5" is top-4, always 100 %
    assert rep.top5_k == 4 and rep.row("w8a8").top5 == 100.0
    assert abs(rep.row("w8a8").drop_top1) < 1.0


def test_run_ptq_does_not_mutate_model(trained):
    net, (x, y), _ = trained
    net = copy.deepcopy(net).train()
    before = copy.deepcopy(net.state_dict())
    run_ptq(net, _loader(x, y), _loader(x, y), bits=("w4a4", "w4a16"), calib_batches=2, progress=False)
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_weight_only_and_activation_only_rows(trained):
    net, (x, y), (xe, ye) = trained
    rep = run_ptq(net, _loader(x, y), _loader(xe, ye), bits=("w4a16", "w16a4"), calib_batches=2, progress=False)
    w_only, a_only = rep.row("w4a16"), rep.row("w16a4")
    assert (w_only.weight_bits, w_only.act_bits) == (4, 16)
    assert all(layer.act_bits is None and layer.act_sqnr_db is None for layer in w_only.layers)
    assert all(layer.weight_bits is None and layer.weight_sqnr_db is None for layer in a_only.layers)
    assert {layer.name: layer.weight_bits for layer in w_only.layers} == {"conv1": 8, "conv2": 4, "conv3": 4, "fc": 8}
    folded = fold_batchnorm(net)
    qw = quantize_model(folded, "w4a16")
    with torch.no_grad():
        assert w_only.top1 == pytest.approx(_top1(qw(xe), ye), abs=1e-6)


def test_lightning_module_model_attribute_is_the_network(trained):
    net, (x, y), _ = trained
    lit = _LitNet()
    lit.model.load_state_dict(net.state_dict())
    rep = run_ptq(lit, _loader(x, y), _loader(x, y), bits="w8a8", calib_batches=1, progress=False)
    assert [layer.name for layer in rep.row("w8a8").layers] == list(LAYERS)
    assert ("conv1", "bn1") in rep.folded_bn_pairs


def test_short_calibration_loader_warns_once_and_uses_what_exists(trained, tmp_path):
    net, (x, y), _ = trained
    calib = _loader(x[:192], y[:192])  # 3 batches
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        rep = run_ptq(net, calib, _loader(x, y), bits=("w8a8", "w4a4", "w3a3"), calib_batches=8,
                      progress=False, export_dir=tmp_path)
    short = [w for w in rec if "calibration loader has only 3 batch" in str(w.message)]
    assert len(short) == 1
    assert rep.calib_batches == 3 and rep.calib_batches_requested == 8
    # the ranges are those of exactly the 3 batches
    folded = fold_batchnorm(net)
    ref = quantize_model(folded, "w4a4", calib_batches=[x[i * 64 : (i + 1) * 64] for i in range(3)])
    got = load_quantized(SmallConvNet(), tmp_path / "quantized_w4a4.safetensors")
    for n in LAYERS:
        assert torch.equal(getattr(got, n).act_scale, getattr(ref, n).act_scale), n
        assert torch.equal(getattr(got, n).act_zero_point, getattr(ref, n).act_zero_point), n


def test_the_target_template_gives_every_bit_width_its_scope_and_plan(trained, tmp_path):
    """Each bit-width is target.at(bits) with the recipe's observers: the scope, the first/last policy and a
    mixed-precision plan carry over; the rows (and files) are named after the target."""
    net, (x, y), (xe, ye) = trained
    plan = QuantTarget(keep_first_last_8bit=False, layer_bits={"conv2": (8, 8)})
    rep = run_ptq(net, _loader(x, y), _loader(xe, ye), bits=("w4a4", "w3a3"), calib_batches=2, target=plan,
                  progress=False, export_dir=tmp_path)
    assert rep.bits == ["w4a4-mixed", "w3a3-mixed"] and not rep.keep_first_last_8bit and rep.kept_8bit == []
    got = {layer.name: (layer.weight_bits, layer.act_bits) for layer in rep.row("w3a3-mixed").layers}
    assert got == {"conv1": (3, 3), "conv2": (8, 8), "conv3": (3, 3), "fc": (3, 3)}
    assert (rep.row("w3a3-mixed").weight_bits, rep.row("w3a3-mixed").act_bits) == (3, 3)
    folded = fold_batchnorm(net)
    ref = quantize_model(folded, plan.at("w3a3"), calib_batches=[x[:64], x[64:128]])
    back = load_quantized(SmallConvNet(), tmp_path / "quantized_w3a3-mixed.safetensors")
    with torch.no_grad():
        assert torch.equal(ref(xe), back(xe))
        assert rep.row("w3a3-mixed").top1 == pytest.approx(_top1(ref(xe), ye), abs=1e-6)


def test_progress_bar_writes_to_stderr(capsys):
    x, y = blob_data(64)
    run_ptq(SmallConvNet(), _loader(x, y, 32), _loader(x, y, 32), bits=("w8a8", "w4a4"), calib_batches=2, progress=True)
    err = capsys.readouterr().err
    assert "PTQ" in err


# errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": ()}, "bits is empty"),
        ({"bits": []}, "bits is empty"),
        ({"bits": ("w4x4",)}, r"cannot parse bit-width preset 'w4x4'.*w<bits>a<bits>"),
        ({"bits": ("w1a4",)}, r"weight bits must be in \[2, 16\], got 1"),
        ({"bits": ("w4a1",)}, r"activation bits must be in \[2, 16\], got 1"),
        ({"bits": (4,)}, "must be a string like 'w4a4'"),
        ({"stage": "train"}, r"stage must be one of \('validate', 'test'\), got 'train'"),
        ({"observer": "kl"}, r"observer must be one of \('minmax', 'percentile', 'mse'\), got 'kl'"),
        ({"calib_batches": 0}, "calib_batches must be a positive int"),
        ({"calib_batches": 2.5}, "calib_batches must be a positive int"),
        ({"target": {"include": "conv*"}}, "PostTrainingQuantization: target must be a QuantTarget or None"),
        ({"target": "w4a4"}, r"target must be a QuantTarget or None, got 'w4a4': PTQ's bit-widths are its bits"),
        ({"export": "yes"}, "unknown export format 'yes'"),
        ({"export": 3}, "export formats must be a name or a list"),
        ({"parity_batches": 0}, "parity_batches must be None"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostTrainingQuantization(**kwargs)


def test_bits_are_normalised():
    cb = PostTrainingQuantization(bits=["W8A8", "w4a4", "w8a8"])
    assert cb.bits == ("w8a8", "w4a4")
    assert PostTrainingQuantization(bits="w3a3").bits == ("w3a3",)


def test_empty_eval_loader_raises_before_any_work():
    consumed = []

    def calib():
        consumed.append(1)
        yield torch.randn(4, 1, 8, 8)

    with pytest.raises(ValueError, match="eval_loader is empty"):
        PostTrainingQuantization(bits="w4a4").run(SmallConvNet(), calib(), [])
    with pytest.raises(ValueError, match="eval_loader is None"):
        run_ptq(SmallConvNet(), calib(), None, bits="w4a4")
    assert not consumed


def test_no_quantizable_layer_matches():
    x, y = blob_data(32)
    with pytest.raises(ValueError, match="no quantizable layers"):
        run_ptq(SmallConvNet(), _loader(x, y), _loader(x, y), bits="w4a4", target=QuantTarget(include="nothing*"),
                progress=False)


# Lightning -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_runs_on_cuda_without_moving_the_model(trained):
    net, (x, y), (xe, ye) = trained
    rep = run_ptq(net, _loader(x, y), _loader(xe, ye), bits=("w8a8", "w4a4"), calib_batches=2, device="cuda",
                  progress=False)
    assert rep.device.startswith("cuda")
    assert next(net.parameters()).device.type == "cpu"
    cpu = run_ptq(net, _loader(x, y), _loader(xe, ye), bits=("w8a8", "w4a4"), calib_batches=2, progress=False)
    assert abs(rep.row("w8a8").top1 - cpu.row("w8a8").top1) <= 1.0


def test_attention_points_switch_reaches_quantize_model():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=4, pretrained=False)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 4, (8,))
    data = [(x, y)]
    with_pts = run_ptq(vit, data, data, bits=("w8a8",), calib_batches=1, progress=False)
    without = run_ptq(vit, data, data, bits=("w8a8",), calib_batches=1, progress=False,
                      target=QuantTarget(attention_points=False))
    names_with = {layer.name for layer in with_pts.rows[0].layers}
    names_without = {layer.name for layer in without.rows[0].layers}
    assert any(n.endswith("quant_attn") for n in names_with)
    assert not any("quant_" in n for n in names_without)
    cb = PostTrainingQuantization(bits=("w8a8",), target=QuantTarget(attention_points=False), progress=False,
                                  print_report=False)
    assert cb.target.attention_points is False and cb.settings()["ptq/attention_points"] is False


def test_run_ptq_target_must_be_a_target():
    data = [(torch.randn(4, 4), torch.randint(0, 2, (4,)))]
    with pytest.raises(ValueError, match=r"run_ptq: target must be a QuantTarget or None, got 'w8a8'"):
        run_ptq(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)), data, data, bits="w8a8", calib_batches=1, target="w8a8", progress=False)
