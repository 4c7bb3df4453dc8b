"""Property-based tests (hypothesis) over QuantSpec, fake_quantize and the integer export round trip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from flatq_lightning import (
    QuantSpec,
    compute_qparams,
    fake_quantize,
    load_quantized,
    quantize_model,
    save_quantized,
)
from flatq_lightning.quant.ops import dequantize_int, quantize_int
from flatq_lightning.quant.spec import GRANULARITIES, MAX_BITS, MAX_DIMS, MIN_BITS, OBSERVERS

specs = st.builds(
    QuantSpec,
    bits=st.integers(MIN_BITS, MAX_BITS),
    granularity=st.sampled_from(GRANULARITIES),
    symmetric=st.booleans(),
    observer=st.sampled_from(OBSERVERS),
    percentile=st.floats(50.0, 100.0, exclude_min=True),
    ch_axis=st.integers(0, 1),
    mse_grid=st.integers(2, 6),
)


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(-3, 40),
    gran=st.text(max_size=12) | st.sampled_from(GRANULARITIES),
    sym=st.booleans() | st.integers(0, 1),
    obs=st.text(max_size=12) | st.sampled_from(OBSERVERS),
    ch_axis=st.integers(-12, 12),
)
def test_quantspec_accepts_exactly_the_valid_fields(bits, gran, sym, obs, ch_axis):
    valid = (
        MIN_BITS <= bits <= MAX_BITS
        and gran in GRANULARITIES
        and isinstance(sym, bool)
        and obs in OBSERVERS
        and -MAX_DIMS <= ch_axis < MAX_DIMS
    )
    kw = dict(bits=bits, granularity=gran, symmetric=sym, observer=obs, ch_axis=ch_axis)
    if valid:
        s = QuantSpec(**kw)
        assert QuantSpec.from_dict(s.to_dict()) == s
        assert s.qmax - s.qmin == 2**bits - 1
    else:
        with pytest.raises(ValueError, match=r"QuantSpec\.(bits|granularity|symmetric|observer|ch_axis)"):
            QuantSpec(**kw)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, rows=st.integers(1, 5), cols=st.integers(1, 33), mag=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_fake_quantize_lands_on_the_grid_and_is_idempotent(spec, rows, cols, mag, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * mag
    s, z = compute_qparams(x, spec)
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    q = fake_quantize(x, spec, s, z)
    assert q.dtype == x.dtype and q.shape == x.shape
    # on the grid: integer codes in [qmin, qmax], and quantizing again changes nothing
    codes = quantize_int(q, spec, s, z)
    assert bool((codes >= spec.qmin).all()) and bool((codes <= spec.qmax).all())
    assert torch.equal(codes, codes.round())
    assert torch.equal(fake_quantize(q, spec, s, z), q)
    # the integer form reproduces the fake-quant bit for bit
    assert torch.equal(dequantize_int(quantize_int(x, spec, s, z), spec, s, z), q)
    # inside the observed range the error is at most half a step (min-max observer: the whole tensor)
    if spec.observer == "minmax":
        sb = s.reshape(-1, 1) if spec.per_channel and spec.ch_axis == 0 else (s.reshape(1, -1) if spec.per_channel else s)
        assert bool(((q - x).abs() <= sb / 2 * (1 + 1e-5) + 1e-30).all())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(wbits=st.integers(2, 8), abits=st.integers(2, 8), keep=st.booleans(), seed=st.integers(0, 2**16))
def test_int_export_round_trip_is_bit_exact(tmp_path, wbits, abits, keep, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(8, 1, 6, 6, generator=g)
    q = quantize_model(net, QuantSpec.weight(wbits), QuantSpec.activation(abits), calib_batches=[x], keep_first_last_8bit=keep)
    path = save_quantized(q, tmp_path / f"q_{seed}_{wbits}_{abits}.safetensors", overwrite=True)  # hypothesis may repeat
    fresh = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2))
    r = load_quantized(fresh, path)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
