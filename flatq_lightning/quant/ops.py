"""Pure tensor functions implementing the target quantizer.

No Lightning and no module state here: the recorders, the noise injectors, the MSE term and PTQ all call
these, so what the network is trained against is bit-for-bit what PTQ applies. Arithmetic is float32
whatever the input dtype (bf16 included); results are cast back to the input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .spec import QuantSpec

#: floor on a scale, so an all-zero channel or tensor quantizes to exactly zero instead of dividing by 0
SCALE_EPS = 1e-12

__all__ = [
    "SCALE_EPS",
    "check_finite",
    "check_scale",
    "compute_qparams",
    "dequantize_int",
    "fake_quantize",
    "observe_range",
    "qparams_from_range",
    "quant_error",
    "quant_error_stats",
    "mean_square",
    "quantize_int",
    "round_ste",
    "sqnr_db",
    "sqnr_db_from_error_stats",
]


def check_finite(x: Tensor, what: str = "tensor") -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or inf (a host sync: keep it off the per-step path)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"cannot quantize {what}: it contains NaN or inf values")


def check_scale(scale: Tensor, what: str = "scale") -> None:
    """Raise ``ValueError`` unless every element of ``scale`` is finite and > 0 (a host sync on an accelerator:
    run it where scales are created or loaded, not per training step)."""
    s = torch.as_tensor(scale)
    if not s.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {s.dtype}")
    if s.numel() == 0:
        raise ValueError(f"{what} is empty: it needs one value per tensor or per channel")
    if not bool(((s > 0) & torch.isfinite(s)).all()):
        bad = s[~((s > 0) & torch.isfinite(s))].reshape(-1)[:4].tolist()
        raise ValueError(f"{what} must be finite and > 0 everywhere, got values like {bad}")


def _check_float_input(x: Tensor, what: str) -> None:
    """Free dtype check: the grid arithmetic is defined on floating-point tensors only."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{what} must be a floating-point tensor (float32/float16/bfloat16/float64), got dtype {x.dtype}: "
            "convert it with .float() first"
        )


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (half to even), with the identity as gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _channel_view(x: Tensor, spec: QuantSpec) -> Tensor:
    """``x`` as (C, -1) with the channel axis first, float32."""
    x = x.float()
    if x.dim() == 0:
        return x.reshape(1, 1)
    if not -x.dim() <= spec.ch_axis < x.dim():
        raise ValueError(
            f"QuantSpec.ch_axis={spec.ch_axis} is out of range for a tensor of shape {tuple(x.shape)} "
            f"(allowed: {-x.dim()} .. {x.dim() - 1})"
        )
    return x.movedim(spec.ch_axis, 0).reshape(x.shape[spec.ch_axis], -1)


def _bcast(p: Tensor, x: Tensor, spec: QuantSpec) -> Tensor:
    """Shape a per-channel parameter (C,) to broadcast against ``x`` along ``spec.ch_axis``."""
    if p.dim() == 0 or not spec.per_channel:
        return p
    shape = [1] * x.dim()
    shape[spec.ch_axis] = -1
    return p.reshape(shape)


def _kth(v: Tensor, q: float) -> Tensor:
    """Row-wise q-quantile (0..1) of a (R, N) tensor by order statistic (no size limit, unlike quantile)."""
    n = v.shape[1]
    k = min(max(int(round(q * (n - 1))) + 1, 1), n)
    return v.kthvalue(k, dim=1).values


def observe_range(x: Tensor, spec: QuantSpec, check: bool = True) -> tuple[Tensor, Tensor]:
    """The range ``(lo, hi)`` the spec's observer picks for ``x``: float32, shape (C,) or ()."""
    _check_float_input(x, "x")
    if x.numel() == 0:
        raise ValueError(f"cannot compute qparams of an empty tensor (x has shape {tuple(x.shape)})")
    if check:
        check_finite(x)
    v = _channel_view(x, spec) if spec.per_channel else x.float().reshape(1, -1)
    if spec.observer == "percentile":
        p = spec.percentile / 100.0
        if spec.symmetric:
            hi = _kth(v.abs(), p)
            lo = -hi
        else:
            lo, hi = _kth(v, 1.0 - p), _kth(v, p)
    else:
        lo, hi = v.amin(1), v.amax(1)  # on the CPU 2-3x faster than aminmax(dim=1), same values
        if spec.observer == "mse":
            lo, hi = _mse_search(v, lo, hi, spec)
    if not spec.per_channel:
        lo, hi = lo[0], hi[0]
    return lo, hi


def _mse_search(v: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Shrink the min-max range by the ratio (one per row) that minimises the squared rounding error."""
    ratios = torch.linspace(1.0, 0.2, spec.mse_grid, device=v.device)
    grid_spec = QuantSpec(
        bits=spec.bits, granularity="per_channel", symmetric=spec.symmetric, observer="minmax", ch_axis=0
    )
    best_err = torch.full_like(lo, float("inf"))
    best_r = torch.ones_like(lo)
    for r in ratios:
        s, z = qparams_from_range(lo * r, hi * r, grid_spec)
        err = (fake_quantize(v, grid_spec, s, z, check_scale=False) - v).square().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, r, best_r)
    return lo * best_r, hi * best_r


def qparams_from_range(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point (float32 tensors holding integers) for a range.

    Symmetric: ``s = max(|lo|, |hi|) / (2^(b-1) - 1)``, zero point 0. Asymmetric: the range is widened to
    contain 0 (so zero is exact, and an all-positive tensor gets zero point 0), ``s = (hi - lo)/(2^b - 1)``,
    ``z = round(-lo/s)``.
    """
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    if spec.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / spec.qmax
        scale = scale.clamp_min(SCALE_EPS)
        return scale, torch.zeros_like(scale)
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = ((hi - lo) / float(spec.qmax - spec.qmin)).clamp_min(SCALE_EPS)
    zero_point = (torch.round(-lo / scale) + spec.qmin).clamp(spec.qmin, spec.qmax)
    return scale, zero_point


def compute_qparams(
    x_or_range: Tensor | tuple[Tensor, Tensor], spec: QuantSpec, check: bool = True
) -> tuple[Tensor, Tensor]:
    """Scale and zero point for a tensor (observed with the spec's observer) or an observed ``(lo, hi)``."""
    if isinstance(x_or_range, tuple):
        lo, hi = x_or_range
        if check:
            check_finite(torch.stack([torch.as_tensor(lo).float().reshape(-1), torch.as_tensor(hi).float().reshape(-1)]), "range")
    else:
        lo, hi = observe_range(x_or_range, spec, check=check)
    return qparams_from_range(lo, hi, spec)


def fake_quantize(
    x: Tensor,
    spec: QuantSpec,
    scale: Tensor,
    zero_point: Tensor | None = None,
    check_scale: bool | None = None,
) -> Tensor:
    """Quantize-dequantize ``x`` on the spec's grid: ``(clamp(round(x/s) + z, qmin, qmax) - z) * s``.

    The rounding is passed straight through, so the gradient w.r.t. ``x`` is 1 inside the clipping range and 0
    outside. Computed in float32, returned in ``x.dtype``. ``x`` must be floating point (``ValueError``
    otherwise). ``check_scale``: verify ``scale > 0`` and finite (``ValueError``); ``None`` (default) checks a
    CPU scale only (no device sync), ``True`` always, ``False`` never (the per-step paths, whose scales come
    from :func:`qparams_from_range` and are > 0 by construction).

    Precision: the arithmetic is float32 (as in ONNX's QuantizeLinear), so inside the observed range the result
    is within half a step of ``x`` plus at most 4 * 2^(bits-24) of a step (under 2 % of a step at 16 bits); it
    is on the grid, so quantizing it again returns it unchanged at every supported bit-width.

    Example:
        >>> spec = QuantSpec.weight(4)
        >>> w = torch.tensor([[0.7, -0.35, 0.1, 0.0]])
        >>> s, z = compute_qparams(w, spec)
        >>> fake_quantize(w, spec, s, z)
        tensor([[ 0.7000, -0.4000,  0.1000,  0.0000]])
    """
    _check_float_input(x, "x")
    if check_scale or (check_scale is None and isinstance(scale, Tensor) and scale.device.type == "cpu"):
        check_scale_fn(scale)
    xf = x.float()
    s = _bcast(scale.to(device=x.device, dtype=torch.float32), x, spec)
    z = None
    if zero_point is not None and not spec.symmetric:
        z = _bcast(zero_point.to(device=x.device, dtype=torch.float32), x, spec)
    if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
        # Inference path: the same arithmetic in place on one buffer (round_ste's value is exactly round).
        return _dequantize_(_quantize_int(xf, spec, s, z), spec, s, z).to(x.dtype)
    q = round_ste(xf / s)
    if z is None:
        out = q.clamp(spec.qmin, spec.qmax) * s
    else:
        out = ((q + z).clamp(spec.qmin, spec.qmax) - z) * s
    return out.to(x.dtype)


def _quantize_int(xf: Tensor, spec: QuantSpec, s: Tensor, z: Tensor | None) -> Tensor:
    q = torch.div(xf, s).round_()  # one buffer
    if z is not None:
        q.add_(z)
    return q.clamp_(spec.qmin, spec.qmax)


def _dequantize_(q: Tensor, spec: QuantSpec, s: Tensor, z: Tensor | None) -> Tensor:
    """``(q − z)·s`` in place on ``q`` (float32)."""
    if z is not None:
        q.sub_(z)
    return q.mul_(s)


def quantize_int(x: Tensor, spec: QuantSpec, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
    """The integer codes ``clamp(round(x/s) + z, qmin, qmax)`` (float32 holding integers; no gradient).

    ``dequantize_int(quantize_int(x)) == fake_quantize(x)`` bit for bit. The scale is checked (> 0, finite).
    """
    _check_float_input(x, "x")
    check_scale_fn(scale)
    s = _bcast(scale.to(device=x.device, dtype=torch.float32), x, spec)
    z = None if (zero_point is None or spec.symmetric) else _bcast(zero_point.to(device=x.device, dtype=torch.float32), x, spec)
    return _quantize_int(x.detach().float(), spec, s, z)


def dequantize_int(
    q: Tensor, spec: QuantSpec, scale: Tensor, zero_point: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(q − z)·s`` from integer codes, computed in float32 and cast to ``dtype`` (the scale is checked)."""
    check_scale_fn(scale)
    s = _bcast(scale.to(device=q.device, dtype=torch.float32), q, spec)
    z = None if (zero_point is None or spec.symmetric) else _bcast(zero_point.to(device=q.device, dtype=torch.float32), q, spec)
    return _dequantize_(q.float().clone(), spec, s, z).to(dtype)


def quant_error(x: Tensor, spec: QuantSpec, scale: Tensor | None = None, zero_point: Tensor | None = None) -> Tensor:
    """``Q(x) - x`` in float32 (qparams observed from ``x`` when not given)."""
    if scale is None:
        scale, zero_point = compute_qparams(x, spec)
    return fake_quantize(x.detach().float(), spec, scale, zero_point, check_scale=False) - x.detach().float()


def quant_error_stats(
    x: Tensor, spec: QuantSpec, scale: Tensor | None = None, zero_point: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mean and (population) variance of ``Q(x) - x``: per channel, shape (C,), or per tensor, shape ().

    One float32 buffer, worked in place (no autograd): the error, then the mean removed and the variance taken
    as a squared norm, a two-pass variance several times faster on the CPU than ``torch.var_mean`` over rows.
    """
    if scale is None:
        scale, zero_point = compute_qparams(x, spec)
    with torch.no_grad():
        xf = x.detach().float()
        e = fake_quantize(xf, spec, scale, zero_point, check_scale=False)  # the inference path: a new buffer
        e.sub_(xf)
        v = _channel_view(e, spec) if spec.per_channel else e.reshape(1, -1)
        mean = v.mean(1)
        v.sub_(mean[:, None])  # v is e itself or a copy of it: ours either way
        var = torch.linalg.vector_norm(v, dim=1).square_().div_(v.shape[1])
    if not spec.per_channel:
        return mean[0], var[0]
    return mean, var


def mean_square(x: Tensor) -> Tensor:
    """``E[x²]`` in float32 (the signal power of an SQNR), without a squared copy of ``x``."""
    return torch.linalg.vector_norm(x.detach().float()).square() / max(1, x.numel())


def sqnr_db_from_error_stats(signal_power: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``10·log10(E[x²] / E[e²])`` from the error's mean and variance (:func:`quant_error_stats`).

    ``E[e²] = var + mean²``; per-channel statistics are averaged over the channels, which is the tensor's
    ``E[e²]`` because the channels have equal size.
    """
    return 10.0 * torch.log10(signal_power / (var + mean.square()).mean().clamp_min(1e-30))


def sqnr_db(x: Tensor, xq: Tensor, dim: int | None = None) -> Tensor:
    """Signal-to-quantization-noise ratio ``10·log10(‖x‖² / ‖x − xq‖²)`` in dB (+inf for an exact copy).

    With ``dim`` given, the norms are taken per index of that axis (per channel).
    """
    xf, ef = x.detach().float(), (x.detach().float() - xq.detach().float())
    if dim is None:
        sig, noise = xf.square().sum(), ef.square().sum()
    else:
        sig = xf.movedim(dim, 0).reshape(x.shape[dim], -1).square().sum(1)
        noise = ef.movedim(dim, 0).reshape(x.shape[dim], -1).square().sum(1)
    return 10.0 * torch.log10(sig / noise)


check_scale_fn = check_scale  # fake_quantize's ``check_scale`` argument shadows the function's name
