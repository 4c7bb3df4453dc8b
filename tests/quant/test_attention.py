"""Attention quantization points: the reversible patch of timm Attention, selection, PTQ, export."""

import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from flatq_lightning import QuantSpec, QuantTarget, quantize_model, select_modules
from flatq_lightning.ptq.export import load_quantized, save_quantized
from flatq_lightning.quant import (
    QuantizedAttention,
    QuantizedLayer,
    QuantPoint,
    attach_attention_points,
    attention_points,
    detach_attention_points,
    first_last_names,
    is_patched_attention,
    quantized_layers,
)

POINTS = ("quant_q", "quant_k", "quant_v", "quant_attn")


def tiny_vit(depth: int = 2, **kw) -> nn.Module:
    """timm's ``test_vit`` at 16×16 px, patch 8: 5 tokens, embed 64, 2 heads."""
    return timm.create_model(
        "test_vit", pretrained=False, img_size=16, patch_size=8, depth=depth, num_classes=4, **kw
    ).eval()


def attn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def assert_pristine(model: nn.Module) -> None:
    for m in attn_modules(model):
        assert type(m) is Attention
        assert "forward" not in m.__dict__
        assert not any(isinstance(c, QuantPoint) for c in m.children())
        assert type(m).forward is Attention.forward


# the patch -----------------------------------------------------------------------------------------------------
def test_identity_points_match_fused_output():
    vit = tiny_vit()
    assert all(m.fused_attn for m in attn_modules(vit))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = vit(x)
        names = attach_attention_points(vit)
        out = vit(x)
    assert names == [f"blocks.{b}.attn.{p}" for b in range(2) for p in POINTS]
    assert all(type(m) is QuantizedAttention for m in attn_modules(vit))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(qk_norm=True, norm_layer=nn.LayerNorm), dict(gated=True)])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
def test_patched_module_matches_fused_with_masks_and_options(kw, mask):
    attn = Attention(16, num_heads=2, qkv_bias=True, **kw).eval()
    x = torch.randn(2, 5, 16)
    args: dict = {}
    if mask == "bool":
        args["attn_mask"] = (torch.rand(5, 5) > 0.3) | torch.eye(5, dtype=torch.bool)
    elif mask == "float":
        args["attn_mask"] = torch.randn(5, 5)
    elif mask == "causal":
        args["is_causal"] = True
    with torch.no_grad():
        ref = attn(x, **args)
        with attention_points(attn):
            out = attn(x, **args)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert type(attn) is Attention


def test_points_see_the_operands():
    attn = Attention(16, num_heads=2).eval()
    x = torch.randn(2, 5, 16)
    seen = {}
    with attention_points(attn):
        for p in POINTS:
            getattr(attn, p).register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, a[0]))
        attn(x)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(seen["quant_q"], q)  # q itself, before the head_dim**-0.5 scaling
    torch.testing.assert_close(seen["quant_k"], k)
    torch.testing.assert_close(seen["quant_v"], v)
    torch.testing.assert_close(seen["quant_attn"], ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1))


def test_detach_restores_timm_and_fused_path(monkeypatch):
    vit = tiny_vit()
    keys = list(vit.state_dict())
    fused = [m.fused_attn for m in attn_modules(vit)]
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    x = torch.randn(1, 3, 16, 16)
    names = attach_attention_points(vit)
    assert list(vit.state_dict()) == keys  # points hold no state
    vit(x)
    assert not calls  # the explicit math runs while patched
    assert attach_attention_points(vit) == []  # idempotent
    assert detach_attention_points(vit, names) == ["blocks.0.attn", "blocks.1.attn"]
    assert detach_attention_points(vit) == []
    assert_pristine(vit)
    assert [m.fused_attn for m in attn_modules(vit)] == fused
    assert list(vit.state_dict()) == keys
    vit(x)
    assert len(calls) == 2  # fused SDPA again, once per block


def test_context_manager_leaves_points_it_did_not_attach():
    vit = tiny_vit()
    attach_attention_points(vit.blocks[0])
    with attention_points(vit) as names:
        assert names == [f"blocks.1.attn.{p}" for p in POINTS]
        assert all(is_patched_attention(m) for m in attn_modules(vit))
    assert is_patched_attention(vit.blocks[0].attn) and not is_patched_attention(vit.blocks[1].attn)


def test_deepcopy_and_pickle_of_a_patched_model_are_independent():
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    attach_attention_points(vit)
    ref = vit(x)
    twin = copy.deepcopy(vit)
    assert type(twin.blocks[0].attn) is QuantizedAttention
    assert twin.blocks[0].attn.quant_q is not vit.blocks[0].attn.quant_q
    # the copy routes through its own points: a hook on the original's point does not fire for the copy
    fired = []
    vit.blocks[0].attn.quant_attn.register_forward_hook(lambda *a: fired.append(1))
    torch.testing.assert_close(twin(x), ref)
    assert not fired
    buf = io.BytesIO()
    torch.save(twin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), ref)
    detach_attention_points(loaded)
    assert_pristine(loaded)


def test_subclasses_patched_only_when_forward_is_timms():
    class Same(Attention):
        pass

    class Own(Attention):
        def forward(self, x, attn_mask=None, is_causal=False):
            return x

    net = nn.Sequential(Same(16, num_heads=2), Own(16, num_heads=2)).eval()
    x = torch.randn(1, 3, 16)
    ref = net(x)
    assert attach_attention_points(net) == [f"0.{p}" for p in POINTS]
    assert isinstance(net[0], Same) and type(net[0]) is not Same and type(net[1]) is Own
    torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)
    detach_attention_points(net)
    assert type(net[0]) is Same


# selection ------------------------------------------------------------------------------------------------------
def test_selection_and_first_last_policy_ignore_points():
    vit = tiny_vit(depth=1)
    plain = [n for n, _ in select_modules(vit)]
    attach_attention_points(vit)
    sel = select_modules(vit)
    names = [n for n, _ in sel]
    assert [n for n in names if not n.split(".")[-1].startswith("quant_")] == plain
    assert [n for n in names if n.startswith("blocks.0.attn.quant")] == [f"blocks.0.attn.{p}" for p in POINTS]
    assert [n for n, _ in select_modules(vit, attention_points=False)] == plain
    assert [n for n, _ in select_modules(vit, exclude="*.quant_attn")] == [n for n in names if n != "blocks.0.attn.quant_attn"]
    assert first_last_names(sel) == {"patch_embed.proj", "head"}
    specs = QuantTarget.preset("w4a4").layer_specs(sel)
    assert {specs[f"blocks.0.attn.{p}"][1].bits for p in POINTS} == {4}
    assert specs["patch_embed.proj"][1].bits == 8 and specs["head"][0].bits == 8


def test_quantized_layer_for_a_point():
    x = torch.randn(4, 7)
    with pytest.raises(ValueError, match="has no weight"):
        QuantizedLayer(QuantPoint(), QuantSpec.weight(4), QuantSpec.activation(4))
    layer = QuantizedLayer(QuantPoint(), None, QuantSpec.activation(4))
    assert "w-a4" in repr(layer)
    torch.testing.assert_close(layer(x), x)  # uncalibrated: identity


# PTQ ------------------------------------------------------------------------------------------------------------
def _calib(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 16, 16, generator=g) for _ in range(n)]


def test_quantize_model_16_bit_matches_fp():
    vit = tiny_vit()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = vit(x)
        # calibrated on data that covers x: no clipping, so only 16-bit rounding is left
        q = quantize_model(vit, QuantTarget(weight=QuantSpec.weight(16), act=QuantSpec.activation(16)), calib_batches=[x, *_calib()])
        out = q(x)
    assert sum(isinstance(m.module, QuantPoint) for _, m in quantized_layers(q)) == 8
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    assert_pristine(vit)


def test_quantize_model_attention_points_switch():
    vit = tiny_vit()
    off = quantize_model(vit, QuantTarget.preset("w4a4", attention_points=False), _calib())
    assert not any(isinstance(m, QuantPoint) for m in off.modules())
    assert all(type(m) is Attention for m in attn_modules(off))
    on = quantize_model(vit, QuantTarget.preset("w4a4", attention_points=True), _calib())
    for block in on.blocks:
        pts = {n: m for n, m in block.attn.named_children() if n in POINTS}
        assert set(pts) == set(POINTS)
        for m in pts.values():
            assert isinstance(m, QuantizedLayer) and isinstance(m.module, QuantPoint)
            assert m.weight_spec is None and m.act_spec.bits == 4
            assert bool(m.act_calibrated) and float(m.act_scale) != 1.0
    # weightless points are never the kept-8-bit first/last layers
    assert {m.act_spec.bits for n, m in quantized_layers(on) if n.endswith(POINTS)} == {4}
    assert_pristine(vit)
    x = torch.randn(2, 3, 16, 16)
    assert not torch.equal(on(x), off(x))  # the attention operands really are quantized
    # weight-only: points would quantize nothing, so none are attached
    wonly = quantize_model(vit, "w4a16")
    assert all(type(m) is Attention for m in attn_modules(wonly))


def test_quantize_model_drops_points_of_a_patched_input_when_off():
    vit = tiny_vit()
    attach_attention_points(vit)
    q = quantize_model(vit, QuantTarget.preset("w8a8", attention_points=False), calib_batches=_calib(1))
    assert_pristine(q)
    assert all(type(m) is QuantizedAttention for m in attn_modules(vit))  # the input keeps its own


def test_export_roundtrip_with_points(tmp_path):
    vit = tiny_vit()
    q = quantize_model(vit, "w4a4", calib_batches=_calib())
    path = save_quantized(q, tmp_path / "q.safetensors")
    back = load_quantized(tiny_vit(), path)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(back(x), q(x))
