"""Loss-landscape slices, filter-normalised directions and their plots, on quadratics and a tiny conv net."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatq_lightning.callbacks.flatness import (
    classification_loss,
    filter_normalized_direction,
    loss_landscape_1d,
    loss_landscape_2d,
    plot_landscape_1d,
    plot_landscape_2d,
)
from tests.callbacks.flatness.helpers import Quadratic, assert_unchanged, conv_setup, quad_loss, snapshot, spd
from tests.helpers import SmallConvNet


def test_filter_normalized_direction():
    model = SmallConvNet(width=4)
    d = filter_normalized_direction(model, seed=5)
    for p, di in zip(model.parameters(), d):
        assert di.shape == p.shape
        if p.dim() > 1:
            torch.testing.assert_close(di.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))
        else:
            assert torch.count_nonzero(di) == 0
    d_all = filter_normalized_direction(model, seed=5, ignore_1d=False)
    torch.testing.assert_close(d_all[-1].norm(), model.fc.bias.detach().norm())
    assert all(torch.equal(a, b) for a, b in zip(d, filter_normalized_direction(model, seed=5)))


def test_landscape_1d_on_quadratic_matches_formula():
    a = spd([3.0, 1.0, 0.5])
    model = Quadratic(a)
    w0 = model.w.detach().clone()
    alphas, losses = loss_landscape_1d(model, quad_loss, [1.0], steps=7, span=1.5, seed=4)
    (d,) = filter_normalized_direction(model, seed=4)
    assert d.norm() == pytest.approx(w0.norm().item())  # one filter: ‖d‖ = ‖w‖
    expected = [float(0.5 * (w0 + t * d).view(-1) @ a @ (w0 + t * d).view(-1)) for t in alphas]
    np.testing.assert_allclose(losses, expected, rtol=1e-12)
    assert alphas[3] == 0.0 and losses[3] == float(model(1.0).detach())
    assert torch.equal(model.w, w0) and model.w.grad is None


def test_landscape_1d_conv_center_equals_model_loss_and_restores():
    model, batches = conv_setup()
    before = snapshot(model)
    alphas, losses = loss_landscape_1d(model, classification_loss, batches, steps=5, span=0.5)
    assert_unchanged(model, before)
    assert model.training
    model.eval()
    with torch.no_grad():
        ref = sum(float(classification_loss(model, b).double()) for b in batches) / len(batches)
    assert alphas.tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert losses[2] == ref
    assert losses.shape == (5,) and np.all(np.isfinite(losses))
    assert losses[0] > losses[2] or losses[-1] > losses[2]


def test_landscape_restores_parameters_after_an_error():
    model, batches = conv_setup()
    before = snapshot(model)
    calls = []

    def failing(m, b):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return classification_loss(m, b)

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape_1d(model, failing, batches[:1], steps=5)
    assert_unchanged(model, before)


def test_landscape_2d_on_quadratic():
    a = spd([2.0, 1.0, 0.5], seed=7)
    model = Quadratic(a)
    w0 = model.w.detach().clone()
    al, be, z = loss_landscape_2d(model, quad_loss, [1.0], steps=5, span=1.0, seed=2)
    assert z.shape == (5, 5) and al.tolist() == be.tolist()
    gen = torch.Generator().manual_seed(2)
    (d1,) = filter_normalized_direction(model, generator=gen)
    (d2,) = filter_normalized_direction(model, generator=gen)
    for i, j in [(0, 4), (1, 3), (4, 0)]:
        w = (w0 + al[i] * d1 + be[j] * d2).view(-1)
        assert z[i, j] == pytest.approx(float(0.5 * w @ a @ w), rel=1e-12)
    assert z[2, 2] == float(model(1.0).detach())
    assert torch.equal(model.w, w0)
    with pytest.raises(ValueError, match="directions must be a pair"):
        loss_landscape_2d(model, quad_loss, [1.0], directions=(d1,))


def test_plots_write_files(tmp_path):
    model, batches = conv_setup()
    r1 = loss_landscape_1d(model, classification_loss, batches[:1], steps=5)
    r2 = loss_landscape_2d(model, classification_loss, batches[:1], steps=3)
    p1 = plot_landscape_1d({"plain": r1, "DNQ": (r1[0], r1[1] * 0.5)}, tmp_path / "a" / "l1d.png", title="t")
    p2 = plot_landscape_2d({"plain": r2, "DNQ": (r2[0], r2[1], r2[2] * 0.5)}, tmp_path / "l2d.png", levels=8)
    assert p1.stat().st_size > 1000 and p2.stat().st_size > 1000
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_landscape_1d({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="3-tuple"):
        plot_landscape_2d({"plain": r1}, tmp_path / "x.png")


def test_argument_errors():
    model, batches = conv_setup()
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        loss_landscape_1d(model, classification_loss, batches, steps=1)
    with pytest.raises(ValueError, match="span must be"):
        loss_landscape_1d(model, classification_loss, batches, span=0.0)
    with pytest.raises(ValueError, match="direction must hold one tensor per parameter"):
        loss_landscape_1d(model, classification_loss, batches, direction=[torch.zeros(1)])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    model, batches = conv_setup()
    model.eval()
    _, l_cpu = loss_landscape_1d(model, classification_loss, batches, steps=3)
    model.cuda()
    before = snapshot(model)
    _, l_gpu = loss_landscape_1d(model, classification_loss, batches, steps=3)
    np.testing.assert_allclose(l_gpu, l_cpu, rtol=1e-3)
    assert_unchanged(model, before)
