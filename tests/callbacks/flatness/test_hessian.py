"""Hessian estimates (trace, per-parameter trace, diagonal, top eigenvalue) on hand-checkable quadratics and a tiny
conv net."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatq_lightning.callbacks.flatness import (
    classification_loss,
    hessian_diagonal,
    hessian_trace,
    hessian_trace_per_param,
    top_eigenvalue,
)
from tests.callbacks.flatness.helpers import Quadratic, assert_unchanged, conv_setup, quad_loss, snapshot, spd


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
    for fn in (hessian_trace_per_param, hessian_diagonal):
        with pytest.raises(ValueError, match="n_probes must be a positive int"):
            fn(model, classification_loss, batches, n_probes=0)


# --------------------------------------------------------------------------- per parameter, diagonal
class _Two(nn.Module):
    """L = 2·Σu² + 5·Σv² + u₀·v₀: H = diag(4, 4, 10, 10, 10) plus the off-diagonal block (u₀, v₀) = 1."""

    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.ones(2, dtype=torch.float64))
        self.v = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return 2.0 * (self.u**2).sum() + 5.0 * (self.v**2).sum() + self.u[0] * self.v[0]


def _two_loss(model: nn.Module, batch: object) -> torch.Tensor:
    return model()


def test_per_param_traces_are_the_diagonal_blocks_and_add_up_to_the_trace():
    m = _Two()
    per = hessian_trace_per_param(m, _two_loss, [None], n_probes=64, seed=1)
    # each block's trace; the coupling u₀·v₀ only adds noise: v_u·(Hv)_u = 8 ± v_u0·v_v0 per probe
    assert per[0] == pytest.approx(8.0, abs=3 / math.sqrt(64)) and per[1] == pytest.approx(30.0, abs=3 / math.sqrt(64))
    total = hessian_trace(m, _two_loss, [None], n_probes=64, seed=1)
    assert sum(per) == pytest.approx(total, rel=1e-12)  # the same probes
    assert hessian_trace_per_param(m, _two_loss, [None], n_probes=1, params=[m.v]) == pytest.approx([30.0])


def test_diagonal_exact_for_a_diagonal_hessian_and_sums_to_the_per_param_trace():
    a = torch.diag(torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64))
    model = Quadratic(a)
    (d,) = hessian_diagonal(model, quad_loss, [1.0, 3.0], n_probes=1)  # mean Hessian 2·A
    assert d.shape == model.w.shape and d.dtype == model.w.dtype and not d.requires_grad
    torch.testing.assert_close(d.view(-1), 2 * torch.diag(a), rtol=0, atol=1e-12)
    model, batches = conv_setup()
    before = snapshot(model)
    diag = hessian_diagonal(model, classification_loss, batches, n_probes=2, seed=3)
    per = hessian_trace_per_param(model, classification_loss, batches, n_probes=2, seed=3)
    assert [t.shape for t in diag] == [p.shape for p in model.parameters()]
    assert [float(t.double().sum()) for t in diag] == pytest.approx(per, rel=1e-4, abs=1e-6)
    assert_unchanged(model, before)


def test_diagonal_dense_hessian_within_hutchinson_tolerance():
    a = spd([5.0, 2.0, 1.0, 0.5], seed=4)
    n = 4000
    (d,) = hessian_diagonal(Quadratic(a), quad_loss, [1.0], n_probes=n, seed=2)
    off = (a - torch.diag(torch.diag(a))) ** 2
    std = (off.sum(1) / n).sqrt()  # an element's Rademacher variance: Σ_{j≠i} A_ij²
    assert ((d.view(-1) - torch.diag(a)).abs() < 4 * std).all()


@pytest.mark.gpu
def test_cuda_matches_cpu():
    model, batches = conv_setup()
    model.eval()
    t_cpu = hessian_trace(model, classification_loss, batches, n_probes=2)
    e_cpu = top_eigenvalue(model, classification_loss, batches, iters=5)
    d_cpu = hessian_diagonal(model, classification_loss, batches, n_probes=2)
    model.cuda()
    before = snapshot(model)
    assert hessian_trace(model, classification_loss, batches, n_probes=2) == pytest.approx(t_cpu, rel=1e-3)
    assert top_eigenvalue(model, classification_loss, batches, iters=5) == pytest.approx(e_cpu, rel=1e-3)
    for a, b in zip(hessian_diagonal(model, classification_loss, batches, n_probes=2), d_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-5)
    assert_unchanged(model, before)
