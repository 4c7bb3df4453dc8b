"""Every bad input listed in issue 13 raises a named error (its type, and a message naming the parameter).

Each case must fail loudly and early; none may pass silently or fail deep inside torch.
"""

from __future__ import annotations

import pytest
import torch

from flatq_lightning import QuantSpec, compute_qparams, fake_quantize
from flatq_lightning.quant.ops import dequantize_int, quantize_int

# -- the quantization core (item 8) -----------------------------------------------------------------------


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


@pytest.mark.parametrize("axis", [5, 7, -6, 100])
def test_quantspec_refuses_an_impossible_channel_axis(axis):
    with pytest.raises(ValueError, match=r"QuantSpec\.ch_axis must be an int in \[-5, 4\]"):
        QuantSpec(ch_axis=axis)


def test_channel_axis_beyond_the_tensor_is_named():
    spec = QuantSpec(bits=4, granularity="per_channel", ch_axis=3)
    with pytest.raises(ValueError, match=r"QuantSpec\.ch_axis=3 is out of range for a tensor of shape \(4, 5\)"):
        compute_qparams(torch.randn(4, 5), spec)


@pytest.mark.parametrize("spec", [QuantSpec.weight(4), QuantSpec.activation(4), QuantSpec.weight(4, observer="percentile")])
def test_compute_qparams_refuses_an_empty_tensor(spec):
    with pytest.raises(ValueError, match=r"empty tensor \(x has shape \(0, 3\)\)"):
        compute_qparams(torch.empty(0, 3), spec)


@pytest.mark.parametrize(
    "kwargs,name",
    [({"percentile": "abc"}, "percentile"), ({"mse_grid": True}, "mse_grid"), ({"ch_axis": 1.5}, "ch_axis"),
     ({"bits": "4"}, "bits")],
)
def test_quantspec_wrong_types_are_named(kwargs, name):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{name} must be"):
        QuantSpec(**kwargs)
