"""Block reconstruction (quant/reconstruct.py): learned rounding on the RTN grid, learned step sizes, QDrop."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from flatq_lightning.quant import (
    QuantTarget,
    Reconstruction,
    find_blocks,
    fold_batchnorm,
    quantize_model,
    quantized_layers,
    reconstruct,
)
from flatq_lightning.quant.attention import QuantPoint
from flatq_lightning.quant.ops import dequantize_int, quantize_int
from tests.helpers import blob_data, train_small


class BasicBlock(nn.Module):
    """A residual block; its class name is one the default block rule knows."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class TinyResNet(nn.Module):
    def __init__(self, c: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.block1 = BasicBlock(c)
        self.block2 = BasicBlock(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.fc(h.mean((2, 3)))


#: 300 steps on 256 images; on this 8-channel network the rounding needs a larger step than the default's (3e-2,
#: set for 500 steps on ResNet-20) to settle to 0/1 in 300 steps: at 3e-2 block1 ends above round-to-nearest at W3A3
FAST = Reconstruction(iters=300, batch_size=32, calib_images=256, lr_round=0.1)


@pytest.fixture(scope="module")
def net_and_data():
    torch.manual_seed(0)
    x, y = blob_data(256)
    net = train_small(TinyResNet(), x, y, steps=120)
    return fold_batchnorm(net.eval()), x, y


def _quantized(folded, x, bits):
    return quantize_model(folded, QuantTarget.preset(bits, "mse", "percentile"), calib_batches=[x[:128], x[128:]])


@pytest.mark.parametrize("bits", ["w2a4", "w3a3"])
def test_every_block_output_mse_falls_below_round_to_nearest(net_and_data, bits):
    folded, x, _ = net_and_data
    q = _quantized(folded, x, bits)
    res = reconstruct(q, folded, folded, x, FAST)
    assert [r.name for r in res] == ["stem", "block1", "block2", "fc"]
    assert [r.kind for r in res] == ["Conv2d", "BasicBlock", "BasicBlock", "Linear"]
    for r in res:
        assert r.loss < r.loss_rtn, (r.name, r.loss_rtn, r.loss)
    low = [r for r in res if r.name.startswith("block")]
    assert all(r.flipped > 0 for r in low)  # learned rounding moved weights off round-to-nearest
    # the recorded losses are the model's: the block's output MSE on the calibration images, measured again
    xb = q.block1(torch.relu(q.stem(x[:256])))
    with torch.no_grad():
        y_fp = folded.block2(folded.block1(torch.relu(folded.stem(x[:256]))))
        mse = (q.block2(xb) - y_fp).pow(2).flatten(1).sum(1).mean()
    assert float(mse) == pytest.approx(res[2].loss, rel=1e-4)


def test_weights_end_on_the_grid_within_one_step_of_round_to_nearest(net_and_data):
    folded, x, _ = net_and_data
    rtn = _quantized(folded, x, "w2a4")
    q = _quantized(folded, x, "w2a4")
    reconstruct(q, folded, folded, x, FAST)
    moved = 0
    for (name, layer), (_, ref) in zip(quantized_layers(q), quantized_layers(rtn)):
        assert layer.reconstruction is None  # nothing soft is left attached
        ws, s, w = layer.weight_spec, layer.weight_scale, layer.module.weight.detach()
        assert torch.equal(s, ref.weight_scale)  # the grid RTN uses
        codes = quantize_int(w, ws, s)
        # hard 0/1 decisions: the stored weight is exactly integer codes times the scale (what the exports read)
        assert torch.equal(dequantize_int(codes, ws, s), w), name
        assert codes.min() >= ws.qmin and codes.max() <= ws.qmax
        step = (codes - quantize_int(ref.module.weight.detach(), ws, s)).abs()
        assert step.max() <= 1, name
        moved += int(step.sum())
        assert layer.module.weight.requires_grad  # parameters' flags are restored
    assert moved > 0


def test_activation_step_sizes_are_learned_from_the_observer_range(net_and_data):
    folded, x, _ = net_and_data
    rtn = _quantized(folded, x, "w3a3")
    q = _quantized(folded, x, "w3a3")
    reconstruct(q, folded, folded, x, FAST)
    changed = [n for (n, a), (_, b) in zip(quantized_layers(q), quantized_layers(rtn)) if not torch.equal(a.act_scale, b.act_scale)]
    assert "block1.conv2" in changed and "block2.conv1" in changed
    for (_, a), (_, b) in zip(quantized_layers(q), quantized_layers(rtn)):
        assert torch.equal(a.act_zero_point, b.act_zero_point)
        assert float(a.act_scale) > 0
    # lr_act=0 keeps the observer's step sizes
    q0 = _quantized(folded, x, "w3a3")
    reconstruct(q0, folded, folded, x, Reconstruction(iters=20, calib_images=64, lr_act=0.0))
    assert all(torch.equal(a.act_scale, b.act_scale) for (_, a), (_, b) in zip(quantized_layers(q0), quantized_layers(rtn)))


def test_a_seed_gives_identical_results_and_another_seed_does_not(net_and_data):
    folded, x, _ = net_and_data
    st = Reconstruction(iters=60, batch_size=16, calib_images=128, seed=3)
    runs = []
    for seed in (3, 3, 4):
        q = _quantized(folded, x, "w2a4")
        reconstruct(q, folded, folded, x, Reconstruction(**{**st.to_dict(), "seed": seed, "beta": st.beta}))
        runs.append(q.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_zero_iterations_leave_the_model_exactly_as_round_to_nearest(net_and_data):
    folded, x, _ = net_and_data
    rtn = _quantized(folded, x, "w2a4")
    q = _quantized(folded, x, "w2a4")
    res = reconstruct(q, folded, folded, x, Reconstruction(iters=0, drop_prob=0.0, calib_images=64))
    sd, ref = q.state_dict(), rtn.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    assert all(r.loss == r.loss_rtn and r.flipped == 0 for r in res)


def test_cache_on_the_cpu_gives_the_same_result(net_and_data):
    folded, x, _ = net_and_data
    st = Reconstruction(iters=30, batch_size=16, calib_images=64)
    a, b = _quantized(folded, x, "w3a3"), _quantized(folded, x, "w3a3")
    reconstruct(a, folded, folded, x, st)
    reconstruct(b, folded, folded, x, Reconstruction(**{**st.to_dict(), "beta": st.beta, "cache_device": "cpu"}))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_progress_lines_name_the_block_step_and_loss(net_and_data):
    folded, x, _ = net_and_data
    lines: list[str] = []
    reconstruct(_quantized(folded, x, "w3a3"), folded, folded, x, Reconstruction(iters=10, calib_images=64),
                log=lines.append, desc="reconstruct w3a3")
    done = [s for s in lines if " done in " in s]
    assert len(done) == 4 and "block 2/4 block1 (BasicBlock, 2 layer(s))" in done[1]
    assert "output MSE" in done[1] and "->" in done[1]


# blocks ---------------------------------------------------------------------------------------------------------


def test_blocks_of_timm_and_app_resnets_and_of_a_vit_with_its_attention_points():
    from flatq_lightning.app.models import create_model

    x = torch.randn(4, 3, 32, 32)
    res = quantize_model(fold_batchnorm(timm.create_model("test_resnet", num_classes=4).eval()), "w4a4", calib_batches=[x])
    blocks = find_blocks(res)
    kinds = {type(res.get_submodule(n)).__name__ for n, layers in blocks if len(layers) > 1}
    assert kinds == {"BasicBlock", "Bottleneck"}, kinds  # timm's test_resnet has both
    ours = quantize_model(fold_batchnorm(create_model("cifar_resnet20", num_classes=10).eval()), "w4a4", calib_batches=[x])
    names = [n for n, _ in find_blocks(ours)]
    assert names[0] == "conv1" and names[-1] == "fc" and len(names) == 11 and "layer2.0" in names
    assert find_blocks(ours)[4] == ("layer2.0", ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.shortcut.0"])
    vit = quantize_model(timm.create_model("test_vit", img_size=32, num_classes=4).eval(), "w4a4", calib_batches=[x])
    vb = dict(find_blocks(vit))
    assert "blocks.0" in vb and "blocks.0.attn.quant_q" in vb["blocks.0"] and "blocks.0.mlp.fc2" in vb["blocks.0"]


def test_a_vit_block_is_reconstructed_with_its_attention_points():
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=32, num_classes=4).eval()
    x = torch.randn(32, 3, 32, 32)
    q = quantize_model(vit, "w3a4", calib_batches=[x])
    before = {n: m.act_scale.clone() for n, m in quantized_layers(q)}
    res = reconstruct(q, vit, vit, x, Reconstruction(iters=40, batch_size=8, calib_images=32))
    blk = next(r for r in res if r.kind == "Block")
    assert blk.loss < blk.loss_rtn
    points = [n for n, m in quantized_layers(q) if isinstance(m.module, QuantPoint) and n.startswith(blk.name + ".")]
    assert points and any(not torch.equal(q.get_submodule(n).act_scale, before[n]) for n in points)


def test_a_block_rule_users_extend_by_class_name_pattern_or_callable(net_and_data):
    folded, x, _ = net_and_data
    q = _quantized(folded, x, "w4a4")
    assert [n for n, _ in find_blocks(q, ["block*"])] == ["stem", "block1", "block2", "fc"]
    assert [n for n, _ in find_blocks(q, [f"{BasicBlock.__module__}.BasicBlock"])] == ["stem", "block1", "block2", "fc"]
    assert [n for n, _ in find_blocks(q, lambda name, m: name == "block2")] == [
        "stem", "block1.conv1", "block1.conv2", "block2", "fc"]


# bad settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, msg", [
    ({"iters": -1}, "iters must be an int >= 0"),
    ({"drop_prob": 1.5}, r"drop_prob must be in \[0, 1\]"),
    ({"drop_prob": -0.1}, r"drop_prob must be in \[0, 1\]"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"lr_round": 0.0}, "lr_round must be in"),
    ({"beta": (2.0,)}, "beta must be two positive numbers"),
    ({"blocks": "layer1"}, "blocks must be None or a sequence"),
])
def test_bad_settings_fail_with_a_clear_message(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Reconstruction(**kw)


def test_a_block_rule_that_matches_nothing_names_the_classes_there(net_and_data):
    folded, x, _ = net_and_data
    q = _quantized(folded, x, "w4a4")
    with pytest.raises(ValueError, match=r"matches no module of the model; its module classes are .*BasicBlock"):
        reconstruct(q, folded, folded, x, Reconstruction(iters=1, blocks=("Bottleneck",)))


def test_the_source_and_reference_models_are_left_as_they_were(net_and_data):
    folded, x, _ = net_and_data
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    q = _quantized(folded, x, "w3a3")
    folded.train()
    try:
        reconstruct(q, folded, folded, x, Reconstruction(iters=5, calib_images=64))
        assert folded.training and all(m.training for m in folded.modules())  # its modes are given back
    finally:
        folded.eval()
    assert all(torch.equal(v, before[k]) for k, v in folded.state_dict().items())
    assert all(p.requires_grad for p in folded.parameters())
