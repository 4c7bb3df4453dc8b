"""ParamNoise without a Trainer: what the in-place noise engine promises (callbacks/param_noise.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatq_lightning.callbacks.noise_source import NoiseSource
from flatq_lightning.callbacks.param_noise import NoiseSnapshot, ParamNoise

CPU = torch.device("cpu")


def _params() -> list[nn.Parameter]:
    """A linear weight, a conv weight and a non-contiguous weight (a transposed view): the three layouts."""
    g = torch.Generator().manual_seed(0)
    return [
        nn.Parameter(torch.randn(16, 300, generator=g)),
        nn.Parameter(torch.randn(8, 4, 3, 3, generator=g)),
        nn.Parameter(torch.randn(40, 12, generator=g).t()),
    ]


def _coefficients(params, mean: float | None, std: float) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """Per output channel: mean ``mean`` (None: no offset) and a std that grows with the channel index."""
    out = []
    for p in params:
        c = p.shape[0]
        b = std * torch.linspace(0.5, 1.5, c)
        out.append((None if mean is None else torch.full((c,), mean), b))
    return out


def _engine(kind: str = "generator", dist: str = "normal", seed: int = 3):
    params = _params()
    return params, ParamNoise(params, NoiseSource(kind, dist, seed, pool_numel=1 << 14 if kind == "pool" else 0))


def _copy(params):
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("kind", ["generator", "pool"])
def test_put_then_remove_is_clean_up_to_rounding_and_clean_exact_bit_for_bit(kind):
    params, engine = _engine(kind)
    w0 = _copy(params)
    snap = engine.snapshot(7, 1.0, _coefficients(params, 0.01, 0.05), CPU)
    engine.put(snap)
    assert engine.applied is snap and engine.noised
    for i, (p, w) in enumerate(zip(params, w0)):
        delta = engine.noise(i)
        assert delta.abs().max() > 0
        torch.testing.assert_close(p.detach(), w + delta, rtol=0, atol=1e-6)  # p holds W + δ (rounded once)
    noisy = _copy(params)
    with engine.clean_exact():  # inside: clean; afterwards: the exact noisy bits
        for p, w in zip(params, w0):
            torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-6)
    assert all(torch.equal(p, n) for p, n in zip(params, noisy)) and engine.applied is snap
    with engine.clean():  # the same inside; afterwards W + δ − δ + δ, equal up to rounding
        assert engine.applied is None
    assert engine.applied is snap
    for p, n in zip(params, noisy):
        torch.testing.assert_close(p.detach(), n, rtol=0, atol=1e-6)
    engine.remove()
    assert engine.applied is None
    for p, w in zip(params, w0):  # W + δ − δ: clean up to float rounding, not bit for bit
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-6)
    assert engine.noise(0) is None
    engine.remove()  # nothing applied: nothing happens


def test_zero_kappa_leaves_the_parameters_bit_for_bit():
    params, engine = _engine()
    w0 = _copy(params)
    zero = engine.snapshot(4, 0.0, _coefficients(params, None, 0.0), CPU)
    engine.put(zero)
    assert all(torch.equal(p, w) for p, w in zip(params, w0)) and not engine.noised
    assert engine.noise(1) is None
    engine.remove()
    assert all(torch.equal(p, w) for p, w in zip(params, w0))


def test_noise_is_regenerated_from_the_key():
    params, engine = _engine()
    engine.put(engine.snapshot(5, 1.0, _coefficients(params, None, 0.1), CPU))
    first = [engine.noise(i) for i in range(len(params))]
    assert all(torch.equal(a, engine.noise(i)) for i, a in enumerate(first))  # bit for bit, every time
    # the same step and seed in another engine (same parameters' shapes): the same δ
    params2, engine2 = _engine()
    engine2.put(engine2.snapshot(5, 1.0, _coefficients(params2, None, 0.1), CPU))
    assert all(torch.equal(a, engine2.noise(i)) for i, a in enumerate(first))
    engine.remove()
    engine.put(engine.snapshot(6, 1.0, _coefficients(params, None, 0.1), CPU))
    assert not torch.equal(first[0], engine.noise(0))  # another step: another draw
    assert not torch.equal(first[0][:8], first[0][8:])  # rows differ


@pytest.mark.parametrize("kind", ["generator", "pool"])
def test_differential_move_lands_on_the_new_step(kind):
    params, engine = _engine(kind)
    w0 = _copy(params)
    engine.move_to(engine.snapshot(1, 1.0, _coefficients(params, 0.02, 0.05), CPU))  # clean: a plain put
    new = engine.snapshot(2, 0.5, _coefficients(params, 0.01, 0.025), CPU)
    engine.move_to(new)  # += δ_2 − δ_1 in one pass
    assert engine.applied is new
    for i, (p, w) in enumerate(zip(params, w0)):
        torch.testing.assert_close(p.detach(), w + engine.noise(i), rtol=0, atol=1e-5)
    engine.move_to(engine.snapshot(3, 0.0, _coefficients(params, 0.0, 0.0), CPU))  # to κ = 0: noise removed
    for p, w in zip(params, w0):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("kind", "dist"), [("generator", "normal"), ("pool", "normal"), ("generator", "uniform")])
def test_noise_is_zero_mean_with_the_channel_std_and_a_shifts_it(kind, dist):
    w = nn.Parameter(torch.zeros(64, 4096))
    engine = ParamNoise([w], NoiseSource(kind, dist, seed=1, pool_numel=1 << 16 if kind == "pool" else 0))
    b = torch.linspace(0.5, 2.0, 64)
    unit_std = 1.0 if dist == "normal" else 12 ** -0.5
    n = w.shape[1]
    for step, a in ((0, None), (1, torch.full((64,), 0.3))):
        engine.put(engine.snapshot(step, 1.0, [(a, b)], CPU))
        delta = engine.noise(0)
        mean = torch.zeros(64) if a is None else a
        # per channel: mean a (0 without it) within 5 standard errors, std b·std(ε) within 10 %
        assert ((delta.mean(1) - mean).abs() < 5 * b * unit_std / n**0.5).all()
        torch.testing.assert_close(delta.std(1), b * unit_std, rtol=0.1, atol=0)
        engine.remove()
    # over the whole tensor, the zero-mean noise averages out
    engine.put(engine.snapshot(2, 1.0, [(None, b)], CPU))
    assert abs(float(engine.noise(0).mean())) < 5 * float(b.max()) * unit_std / w.numel() ** 0.5


def test_rounding_residual_rebuilds_the_noisy_weights_bit_for_bit():
    params, engine = _engine()
    snap = engine.snapshot(9, 1.0, _coefficients(params, 0.01, 0.3), CPU)
    engine.put(snap)
    noisy = _copy(params)
    residual = engine.rounding_residual(snap)
    clean = [p.detach() - engine.noise(i) for i, p in enumerate(params)]  # what a checkpoint holds
    # a resume: fresh parameters holding the clean weights, the same snapshot put back, the residual written
    params2 = [nn.Parameter(c.clone() if c.is_contiguous() else c.t().clone().t()) for c in clean]
    assert [p.is_contiguous() for p in params2] == [p.is_contiguous() for p in params]
    engine2 = ParamNoise(params2, NoiseSource("generator", "normal", 3))
    engine2.put(NoiseSnapshot(snap.step, snap.kappa, snap.a, snap.b))
    engine2.restore_residual(residual)
    assert all(torch.equal(p, n) for p, n in zip(params2, noisy))
    # a residual of another parameter list is ignored
    before = _copy(params2)
    engine2.restore_residual(residual[:1])
    assert all(torch.equal(p, b) for p, b in zip(params2, before))


def test_snapshot_layout_and_device_move():
    params, engine = _engine()
    snap = engine.snapshot(0, 1.0, _coefficients(params, 0.0, 1.0), CPU)
    # contiguous weights are updated as (channels, -1) rows; others broadcast over their own dims
    assert [tuple(t.shape) for t in snap.b] == [(16, 1), (8, 1), (12, 1)]
    assert all(t.dtype == p.dtype for t, p in zip(snap.b, params))
    moved = snap.to(CPU)
    assert moved.step == snap.step and all(torch.equal(x, y) for x, y in zip(moved.b, snap.b))
