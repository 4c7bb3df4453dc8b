"""BatchNorm re-estimation: clean (update_bn-like) and on the quantized network (AIMET-style), then folded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatq_lightning.quant import (
    QuantTarget,
    bn_state,
    fold_batchnorm,
    load_bn_state,
    quantize_model,
    reestimate_bn,
    reestimate_bn_quantized,
)
from tests.helpers import SmallConvNet, blob_data


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = SmallConvNet()
    # statistics that are clearly not those of the data (as after training under noise)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(0.3)
            m.running_var.fill_(2.0)
    return net.eval()


def _batches(n: int = 4, bs: int = 16) -> list[torch.Tensor]:
    x, _ = blob_data(n * bs)
    return list(x.split(bs))


def test_reestimate_bn_equals_update_bn():
    net, ref = _net(), _net()
    batches = _batches()
    assert reestimate_bn(net, batches) == 4
    ref.train()
    torch.optim.swa_utils.update_bn(batches, ref)
    for (n, a), (_, b) in zip(bn_state(net).items(), bn_state(ref).items()):
        torch.testing.assert_close(a["running_mean"], b["running_mean"], rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(a["running_var"], b["running_var"], rtol=0, atol=1e-6, msg=n)
    # modes and momenta are restored, weights untouched
    assert not net.training and all(m.momentum == 0.1 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(net.conv1.weight, _net().conv1.weight)


def test_reestimate_bn_keeps_statistics_when_there_is_no_batch():
    net = _net()
    before = bn_state(net)
    with pytest.raises(ValueError, match="empty"):
        reestimate_bn(net, [])
    after = bn_state(net)
    assert all(torch.equal(before[n]["running_var"], after[n]["running_var"]) for n in before)


def test_reestimate_bn_transform_is_applied():
    a, b = _net(), _net()
    batches = _batches()
    reestimate_bn(a, batches)
    reestimate_bn(b, batches, transform=lambda x: x * 3.0)
    assert not torch.allclose(a.bn1.running_var, b.bn1.running_var)


def test_reestimation_at_16_bits_is_a_clean_reestimation():
    net = _net()
    batches = _batches()
    clean = copy.deepcopy(net)
    reestimate_bn(clean, batches)
    re16 = reestimate_bn_quantized(net, QuantTarget(), batches)
    for n, s in bn_state(clean).items():
        assert torch.equal(s["running_mean"], bn_state(re16)[n]["running_mean"])
        assert torch.equal(s["running_var"], bn_state(re16)[n]["running_var"])
    assert torch.equal(net.bn1.running_mean, torch.full_like(net.bn1.running_mean, 0.3))  # input untouched


def test_quantized_reestimation_differs_from_clean_and_keeps_weights():
    net = _net()
    batches = _batches()
    re = reestimate_bn_quantized(net, QuantTarget.preset("w2a2", keep_first_last_8bit=False), batches)
    clean = copy.deepcopy(net)
    reestimate_bn(clean, batches)
    assert not torch.allclose(re.bn2.running_var, clean.bn2.running_var)
    for (n, p), (_, q) in zip(net.named_parameters(), re.named_parameters()):
        assert torch.equal(p, q), n


def test_folded_quantized_model_computes_the_unfolded_reestimated_one():
    """After BN re-estimation, folding and quantizing gives what the unfolded quantized network with the
    re-estimated statistics computes (per-channel weight quantization commutes with the BN scale)."""
    net = _net()
    batches = _batches()
    re = reestimate_bn_quantized(net, "w4a8", batches)
    unfolded = quantize_model(re, "w4a8", calib_batches=batches, fold_bn=False)
    folded = quantize_model(re, "w4a8", calib_batches=batches, fold_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.cat(batches)
    out_u, out_f = unfolded(x), folded(x)
    torch.testing.assert_close(out_f, out_u, rtol=1e-4, atol=1e-4)
    # the one-call form does the same
    one = quantize_model(net, "w4a8", calib_batches=batches, fold_bn=True, bn_reestimate=True)
    torch.testing.assert_close(one(x), out_f, rtol=0, atol=0)


def test_reestimation_helps_a_network_whose_statistics_are_off():
    """The statistics of a 'noisy' network (here: wrong by construction) hurt its quantized copy; the
    re-estimated ones give outputs much closer to the float network with correct statistics."""
    net = _net()
    batches = _batches()
    ref = copy.deepcopy(net)
    reestimate_bn(ref, batches)
    x = torch.cat(batches)
    stale = quantize_model(net, "w8a8", calib_batches=batches, fold_bn=True)
    fixed = quantize_model(net, "w8a8", calib_batches=batches, fold_bn=True, bn_reestimate=True)
    err_stale = (stale(x) - ref(x)).abs().mean()
    err_fixed = (fixed(x) - ref(x)).abs().mean()
    assert err_fixed < 0.2 * err_stale


def test_bn_state_roundtrip_and_bad_name():
    net = _net()
    s = bn_state(net)
    other = SmallConvNet()
    load_bn_state(other, s)
    assert torch.equal(other.bn3.running_var, net.bn3.running_var)
    with pytest.raises(ValueError, match="no BatchNorm named"):
        load_bn_state(other, {"nope": s["bn1"]})


def test_fold_after_reestimation_matches_fold_batchnorm_of_the_copy():
    net = _net()
    batches = _batches()
    re = reestimate_bn_quantized(net, QuantTarget(), batches)
    x = torch.cat(batches)
    torch.testing.assert_close(fold_batchnorm(re)(x), re.eval()(x), rtol=1e-5, atol=1e-5)
