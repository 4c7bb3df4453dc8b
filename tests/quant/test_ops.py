import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatq_lightning import QuantSpec, compute_qparams, fake_quantize, quant_error_stats, sqnr_db
from flatq_lightning.quant import observe_range, qparams_from_range
from flatq_lightning.quant.ops import dequantize_int, quantize_int


def test_exact_4bit_per_channel_weight():
    w = torch.tensor([[0.70, -0.36, 0.12, 0.0], [-1.5, 0.5, 0.2, -0.1]])
    spec = QuantSpec.weight(4)
    s, z = compute_qparams(w, spec)
    torch.testing.assert_close(s, torch.tensor([0.1, 1.5 / 7]), rtol=0, atol=1e-7)
    assert torch.equal(z, torch.zeros(2))
    q = fake_quantize(w, spec, s, z)
    expected = torch.tensor([[7, -4, 1, 0], [-7, 2, 1, 0]], dtype=torch.float32) * s[:, None]
    assert torch.equal(q, expected)


def test_exact_asymmetric_per_tensor():
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    spec = QuantSpec.activation(2)  # 4 levels over [-1, 2]: scale 1, zero point 1
    s, z = compute_qparams(x, spec)
    assert float(s) == 1.0 and float(z) == 1.0
    assert torch.equal(fake_quantize(x, spec, s, z), torch.tensor([-1.0, 0.0, 0.0, 2.0]))
    # outside the range clamps to the grid ends
    assert torch.equal(fake_quantize(torch.tensor([-5.0, 9.0]), spec, s, z), torch.tensor([-1.0, 2.0]))


def test_all_positive_and_all_negative_zero_point():
    spec = QuantSpec.activation(4)
    pos = torch.tensor([0.5, 1.0, 3.0])
    s, z = compute_qparams(pos, spec)
    assert float(z) == 0.0 and math.isclose(float(s), 3.0 / 15, rel_tol=1e-6)
    neg = -pos
    s, z = compute_qparams(neg, spec)
    assert float(z) == 15.0
    q = fake_quantize(neg, spec, s, z)
    assert float(q.min()) == pytest.approx(-3.0) and float(q.max()) <= 0.0
    # zero is exactly representable in both cases
    assert float(fake_quantize(torch.zeros(1), spec, s, z)) == 0.0


@pytest.mark.parametrize("spec", [QuantSpec.weight(4), QuantSpec.activation(3)])
def test_degenerate_constant_and_zero(spec):
    zeros = torch.zeros(3, 5)
    s, z = compute_qparams(zeros, spec)
    assert torch.equal(fake_quantize(zeros, spec, s, z), zeros)
    const = torch.full((3, 5), 0.25)
    s, z = compute_qparams(const, spec)
    torch.testing.assert_close(fake_quantize(const, spec, s, z), const, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(bad):
    x = torch.randn(4, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        compute_qparams(x, QuantSpec.weight(4))


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    scale=st.floats(1e-3, 1e3),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_error_bound_and_grid_membership(bits, rows, cols, scale, symmetric, per_channel, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * scale
    spec = QuantSpec(bits=bits, granularity="per_channel" if per_channel else "per_tensor", symmetric=symmetric)
    s, z = compute_qparams(x, spec)
    q = fake_quantize(x, spec, s, z)
    sb = s[:, None] if per_channel else s
    zb = z[:, None] if per_channel else z
    # inside the (min-max) clipping range the error is at most half a step
    assert bool(((q - x).abs() <= sb / 2 * (1 + 1e-5) + 1e-12).all())
    # every output is an integer on the grid
    k = q / sb + zb
    assert torch.allclose(k, torch.round(k), atol=1e-3)
    assert bool((torch.round(k) >= spec.qmin).all() and (torch.round(k) <= spec.qmax).all())


def test_straight_through_gradient():
    spec = QuantSpec.activation(4)
    x = torch.tensor([-2.0, 0.1, 0.7, 3.0], requires_grad=True)
    s, z = qparams_from_range(torch.tensor(0.0), torch.tensor(1.5), spec)
    fake_quantize(x, spec, s, z).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]  # 1 inside the range, 0 where clipped


def test_bf16_input_computed_in_float32():
    w = torch.randn(8, 3, 3, 3)
    spec = QuantSpec.weight(4)
    s, z = compute_qparams(w.bfloat16(), spec)
    q = fake_quantize(w.bfloat16(), spec, s, z)
    assert q.dtype == torch.bfloat16
    ref = fake_quantize(w.bfloat16().float(), spec, s, z)
    assert torch.equal(q, ref.bfloat16())
    mean, var = quant_error_stats(w.bfloat16(), spec)
    assert mean.dtype == torch.float32 and mean.shape == (8,)


def test_error_stats_shapes_and_values():
    w = torch.randn(16, 8, 3, 3)
    spec = QuantSpec.weight(3)
    mean, var = quant_error_stats(w, spec)
    assert mean.shape == var.shape == (16,)
    s, z = compute_qparams(w, spec)
    e = (fake_quantize(w, spec, s, z) - w).reshape(16, -1)
    torch.testing.assert_close(mean, e.mean(1))
    torch.testing.assert_close(var, e.var(1, unbiased=False))
    # uniform rounding error: variance close to s^2/12 for a fine grid
    m8, v8 = quant_error_stats(w, QuantSpec.weight(8))
    s8, _ = compute_qparams(w, QuantSpec.weight(8))
    torch.testing.assert_close(v8, s8**2 / 12, rtol=0.25, atol=0)
    mt, vt = quant_error_stats(w, QuantSpec.activation(4))
    assert mt.shape == vt.shape == ()


def test_linear_and_conv1d_weights():
    for w in (torch.randn(5, 7), torch.randn(5, 3, 4)):
        spec = QuantSpec.weight(4)
        s, z = compute_qparams(w, spec)
        assert s.shape == (5,)
        assert fake_quantize(w, spec, s, z).shape == w.shape


def test_sqnr_db():
    x = torch.ones(100)
    assert float(sqnr_db(x, x * 1.1)) == pytest.approx(20.0, abs=1e-4)
    assert math.isinf(float(sqnr_db(x, x)))
    per = sqnr_db(torch.ones(2, 10), torch.stack([torch.full((10,), 1.1), torch.full((10,), 1.01)]), dim=0)
    assert per.tolist() == pytest.approx([20.0, 40.0], abs=1e-3)


def test_more_bits_higher_sqnr():
    w = torch.randn(32, 64)
    vals = []
    for b in (2, 3, 4, 8):
        spec = QuantSpec.weight(b)
        s, z = compute_qparams(w, spec)
        vals.append(float(sqnr_db(w, fake_quantize(w, spec, s, z))))
    assert vals == sorted(vals)
    assert vals[-1] - vals[-2] > 20  # ~6 dB per bit


def test_percentile_and_mse_observers_clip():
    x = torch.randn(4, 4096)
    x[:, 0] = 50.0  # an outlier per channel
    mm = observe_range(x, QuantSpec.weight(4))[1]
    pc = observe_range(x, QuantSpec.weight(4, observer="percentile", percentile=99.0))[1]
    ms = observe_range(x, QuantSpec.weight(4, observer="mse"))[1]
    assert bool((pc < mm).all()) and bool((ms < mm).all())
    # MSE clipping lowers the rounding error on this tensor
    def err(spec):
        s, z = compute_qparams(x, spec)
        return float((fake_quantize(x, spec, s, z) - x).square().sum())

    assert err(QuantSpec.weight(4, observer="mse")) < err(QuantSpec.weight(4))
    lo, hi = observe_range(x, QuantSpec.activation(4, observer="percentile", percentile=99.0))
    assert float(lo) < 0 < float(hi) < 50.0


@pytest.mark.gpu
def test_cuda_matches_cpu():
    w = torch.randn(16, 32)
    spec = QuantSpec.weight(4)
    s, z = compute_qparams(w, spec)
    qc = fake_quantize(w.cuda(), spec, s.cuda(), z.cuda()).cpu()
    assert torch.equal(qc, fake_quantize(w, spec, s, z))


@pytest.mark.parametrize("spec", [QuantSpec.weight(3), QuantSpec.activation(4), QuantSpec.activation(2)])
def test_inference_path_equals_ste_path_bit_for_bit(spec):
    x = torch.randn(64, 33) * 3
    s, z = compute_qparams(x, spec)
    xg = x.clone().requires_grad_(True)
    with_grad = fake_quantize(xg, spec, s, z)
    with torch.no_grad():
        no_grad = fake_quantize(x, spec, s, z)
    assert torch.equal(with_grad.detach(), no_grad)
    assert torch.equal(x, xg.detach())  # the input was not modified in place
    # values exactly at half steps (ties) agree as well
    ties = (torch.arange(-20, 20).float() + 0.5) * s.reshape(-1)[0]
    with torch.no_grad():
        a = fake_quantize(ties.reshape(-1, 1).expand(-1, 1) if spec.per_channel else ties, spec, s.reshape(-1)[:1] if spec.per_channel else s, z.reshape(-1)[:1] if spec.per_channel else z)
    b = fake_quantize((ties.reshape(-1, 1) if spec.per_channel else ties).requires_grad_(True), spec, s.reshape(-1)[:1] if spec.per_channel else s, z.reshape(-1)[:1] if spec.per_channel else z)
    assert torch.equal(a, b.detach())


def test_integer_codes_round_trip_to_fake_quant():
    from flatq_lightning.quant import dequantize_int, quantize_int

    for spec in (QuantSpec.weight(4), QuantSpec.activation(3)):
        x = torch.randn(6, 20) * 2
        s, z = compute_qparams(x, spec)
        q = quantize_int(x, spec, s, z)
        assert torch.equal(q, torch.round(q)) and q.min() >= spec.qmin and q.max() <= spec.qmax
        assert torch.equal(dequantize_int(q, spec, s, z), fake_quantize(x, spec, s, z))


@pytest.mark.parametrize("spec", [QuantSpec.weight(4), QuantSpec.activation(3), QuantSpec.weight(2, ch_axis=1)])
def test_error_stats_match_var_mean_including_a_large_mean(spec):
    # the fast two-pass variance must agree with torch.var_mean, also when the error has a large mean
    torch.manual_seed(0)
    x = torch.randn(6, 5, 4, 4) * 3
    x0 = x.clone()
    s, z = compute_qparams(x, spec)
    s = s * 0.5  # clip hard: errors with a large mean, the case a one-pass E[e²]−E[e]² gets wrong
    mean, var = quant_error_stats(x, spec, s, z)
    e = fake_quantize(x, spec, s, z) - x
    ev = e.movedim(spec.ch_axis, 0).reshape(x.shape[spec.ch_axis], -1) if spec.per_channel else e.reshape(1, -1)
    ref_var, ref_mean = torch.var_mean(ev, dim=1, unbiased=False)
    if not spec.per_channel:
        ref_var, ref_mean = ref_var[0], ref_mean[0]
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-6)
    assert x.equal(x0)  # the input is not touched


@pytest.mark.parametrize("spec", [QuantSpec.weight(3), QuantSpec.activation(4)])
def test_sqnr_from_error_stats_equals_sqnr_of_the_quantized_tensor(spec):
    # the recorder's SQNR (from the EMA-able mean/var) must be the same quantity as sqnr_db(x, Q(x))
    from flatq_lightning.quant import mean_square, sqnr_db_from_error_stats

    torch.manual_seed(1)
    x = torch.randn(8, 4, 3, 3)
    s, z = compute_qparams(x, spec)
    mean, var = quant_error_stats(x, spec, s, z)
    assert mean_square(x).item() == pytest.approx(x.square().mean().item(), rel=1e-5)
    ref = sqnr_db(x, fake_quantize(x, spec, s, z))
    torch.testing.assert_close(sqnr_db_from_error_stats(mean_square(x), mean, var), ref, rtol=1e-4, atol=1e-4)


# -- bad inputs are named ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_fake_quantize_refuses_integer_tensors(dtype):
    x = torch.ones(2, 3, dtype=dtype)
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor.*" + str(dtype).replace(".", r"\.")):
        fake_quantize(x, QuantSpec.weight(4), torch.ones(2))


def test_compute_qparams_refuses_integer_tensors():
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        compute_qparams(torch.arange(6).reshape(2, 3), QuantSpec.weight(4))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_fake_quantize_refuses_a_scale_not_positive_and_finite(bad):
    x = torch.randn(2, 3)
    scale = torch.tensor([0.1, bad])
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        fake_quantize(x, QuantSpec.weight(4), scale)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        quantize_int(x, QuantSpec.weight(4), scale)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        dequantize_int(torch.zeros(2, 3), QuantSpec.weight(4), scale)


def test_fake_quantize_scale_check_is_skippable_for_the_hot_path():
    # check_scale=False: the per-step callers (scales from qparams_from_range, > 0 by construction) skip it
    out = fake_quantize(torch.ones(1, 2), QuantSpec.weight(4), torch.tensor([0.0]), check_scale=False)
    assert out.shape == (1, 2)


def test_channel_axis_beyond_the_tensor_is_named():
    spec = QuantSpec(bits=4, granularity="per_channel", ch_axis=3)
    with pytest.raises(ValueError, match=r"QuantSpec\.ch_axis=3 is out of range for a tensor of shape \(4, 5\)"):
        compute_qparams(torch.randn(4, 5), spec)


@pytest.mark.parametrize("spec", [QuantSpec.weight(4), QuantSpec.activation(4), QuantSpec.weight(4, observer="percentile")])
def test_compute_qparams_refuses_an_empty_tensor(spec):
    with pytest.raises(ValueError, match=r"empty tensor \(x has shape \(0, 3\)\)"):
        compute_qparams(torch.empty(0, 3), spec)
