"""Flatness measures on hand-checkable quadratics and a tiny conv net."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flatq_lightning.callbacks.flatness.measures import (
    classification_loss,
    filter_normalized_direction,
    hessian_trace,
    loss_landscape_1d,
    loss_landscape_2d,
    plot_landscape_1d,
    plot_landscape_2d,
    top_eigenvalue,
)
from tests.helpers import SmallConvNet, blob_data


class Quadratic(nn.Module):
    """L(w) = ½·c·wᵀAw with w of shape (1, n) (one "filter") and the batch as the scale c."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("a", a)
        n = a.shape[0]
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, n, dtype=a.dtype).view(1, n) if w is None else w)

    def forward(self, c: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.w.view(-1)
        return 0.5 * c * w @ self.a @ w


def quad_loss(model: nn.Module, batch: object) -> torch.Tensor:
    return model(batch)


def spd(eigs: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


def conv_setup() -> tuple[SmallConvNet, list[tuple[torch.Tensor, torch.Tensor]]]:
    model = SmallConvNet(width=4)
    x, y = blob_data(32)
    model.train()
    with torch.no_grad():  # non-trivial BN running statistics
        model(x)
    return model, [(x[:16], y[:16]), (x[16:], y[16:])]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------- trace
def test_trace_exact_for_diagonal_hessian_with_one_probe():
    a = torch.diag(torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64))
    assert hessian_trace(Quadratic(a), quad_loss, [1.0], n_probes=1) == pytest.approx(4.5, abs=1e-12)


def test_trace_averages_over_batches():
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    # batches scale the loss by 1 and 3: the Hessian of the mean loss is 2·A
    assert hessian_trace(Quadratic(a), quad_loss, [1.0, 3.0], n_probes=2) == pytest.approx(12.0, abs=1e-12)


def test_trace_dense_hessian_within_hutchinson_tolerance():
    a = spd([5.0, 2.0, 1.0, 0.5])
    n = 2000
    est = hessian_trace(Quadratic(a), quad_loss, [1.0], n_probes=n, seed=3)
    off = a - torch.diag(torch.diag(a))
    std = math.sqrt(2.0 * float((off**2).sum()) / n)  # Rademacher variance: 2·Σ_{i≠j} A_ij²
    assert abs(est - 8.5) < 4 * std
    assert hessian_trace(Quadratic(a), quad_loss, [1.0], n_probes=n, seed=3) == est  # seeded


def test_trace_on_given_params_only():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.u = nn.Parameter(torch.ones(2, dtype=torch.float64))
            self.v = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self) -> torch.Tensor:
            return 2.0 * (self.u**2).sum() + 5.0 * (self.v**2).sum()  # H = diag(4,4,10,10,10)

    m = Two()
    loss = lambda model, b: model()  # noqa: E731
    assert hessian_trace(m, loss, [None], n_probes=1) == pytest.approx(38.0)
    assert hessian_trace(m, loss, [None], n_probes=1, params=[m.u]) == pytest.approx(8.0)


def test_linear_loss_has_zero_curvature():
    m = nn.Linear(3, 1)
    loss = lambda model, b: model(b).sum()  # noqa: E731
    x = torch.randn(4, 3)
    assert hessian_trace(m, loss, [x], n_probes=2) == 0.0
    assert top_eigenvalue(m, loss, [x], iters=3) == 0.0


# --------------------------------------------------------------------------------------------- eigen
def test_top_eigenvalue_of_quadratic():
    a = spd([5.0, 2.0, 1.0, 0.5], seed=1)
    assert top_eigenvalue(Quadratic(a), quad_loss, [1.0], iters=50, tol=1e-8) == pytest.approx(5.0, rel=1e-6)


def test_top_eigenvalue_averages_batches():
    a = spd([4.0, 1.0, 0.25], seed=2)
    est = top_eigenvalue(Quadratic(a), quad_loss, [1.0, 2.0], iters=60, tol=1e-10)
    assert est == pytest.approx(6.0, rel=1e-6)  # mean Hessian 1.5·A


def test_top_eigenvalue_stops_early_at_tolerance():
    a = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    calls = []

    def counting(model, b):
        calls.append(1)
        return model(b)

    top_eigenvalue(Quadratic(a), counting, [1.0], iters=100, tol=1e-2)
    assert 2 <= len(calls) < 100


# -------------------------------------------------------------------------------- model guarantees
def test_hessian_functions_restore_model_modes_and_grads():
    model, batches = conv_setup()
    model.bn2.eval()  # a submodule in its own mode stays so
    before = snapshot(model)
    t = hessian_trace(model, classification_loss, batches, n_probes=2)
    e = top_eigenvalue(model, classification_loss, batches, iters=3)
    assert math.isfinite(t) and math.isfinite(e) and e > 0
    assert_unchanged(model, before)  # eval mode: BN running stats untouched
    assert model.training and model.bn1.training and not model.bn2.training


def test_hessian_in_eval_mode_uses_running_stats():
    model, batches = conv_setup()
    t_eval = hessian_trace(model, classification_loss, batches[:1], n_probes=2)
    model.eval()
    assert hessian_trace(model, classification_loss, batches[:1], n_probes=2) == t_eval
    t_train = hessian_trace(model, classification_loss, batches[:1], n_probes=2, train_mode=True)
    assert t_train != t_eval


def test_hessian_trace_works_inside_inference_mode():
    model, batches = conv_setup()
    ref = hessian_trace(model, classification_loss, batches, n_probes=2)
    with torch.inference_mode():
        inf_batches = [(x.clone(), y.clone()) for x, y in batches]
        assert hessian_trace(model, classification_loss, inf_batches, n_probes=2) == pytest.approx(
            ref, rel=1e-5
        )


def test_argument_errors():
    model, batches = conv_setup()
    with pytest.raises(ValueError, match="n_probes must be a positive int"):
        hessian_trace(model, classification_loss, batches, n_probes=0)
    with pytest.raises(ValueError, match="iters must be a positive int"):
        top_eigenvalue(model, classification_loss, batches, iters=0)
    with pytest.raises(ValueError, match="tol must be"):
        top_eigenvalue(model, classification_loss, batches, tol=-1.0)
    with pytest.raises(ValueError, match="batches is empty"):
        hessian_trace(model, classification_loss, [])
    with pytest.raises(TypeError, match="list of batches"):
        hessian_trace(model, classification_loss, batches[0][0])
    with pytest.raises(ValueError, match="scalar Tensor"):
        hessian_trace(model, lambda m, b: m(b[0]), batches)
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        loss_landscape_1d(model, classification_loss, batches, steps=1)
    with pytest.raises(ValueError, match="span must be"):
        loss_landscape_1d(model, classification_loss, batches, span=0.0)
    with pytest.raises(ValueError, match="direction must hold one tensor per parameter"):
        loss_landscape_1d(model, classification_loss, batches, direction=[torch.zeros(1)])
    with pytest.raises(ValueError, match="requires_grad"):
        hessian_trace(model, classification_loss, batches, params=[torch.zeros(2)])
    with pytest.raises(ValueError, match="inputs, targets"):
        classification_loss(model, batches[0][0])


# --------------------------------------------------------------------------------------- landscape
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


@pytest.mark.gpu
def test_cuda_matches_cpu():
    model, batches = conv_setup()
    model.eval()
    t_cpu = hessian_trace(model, classification_loss, batches, n_probes=2)
    e_cpu = top_eigenvalue(model, classification_loss, batches, iters=5)
    _, l_cpu = loss_landscape_1d(model, classification_loss, batches, steps=3)
    model.cuda()
    before = snapshot(model)
    assert hessian_trace(model, classification_loss, batches, n_probes=2) == pytest.approx(t_cpu, rel=1e-3)
    assert top_eigenvalue(model, classification_loss, batches, iters=5) == pytest.approx(e_cpu, rel=1e-3)
    _, l_gpu = loss_landscape_1d(model, classification_loss, batches, steps=3)
    np.testing.assert_allclose(l_gpu, l_cpu, rtol=1e-3)
    assert_unchanged(model, before)
