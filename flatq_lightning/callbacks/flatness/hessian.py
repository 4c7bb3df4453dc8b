"""Hessian estimates of a loss: Hutchinson's trace (whole, per parameter, diagonal) and the top eigenvalue.

Every estimate takes ``loss_fn(model, batch) -> scalar Tensor`` and a list of batches (:mod:`.loss`: the
convention, :func:`~.loss.classification_loss`, and the guarantees: eval mode by default, nothing written to
``param.grad``, batches moved to the model's device, seeded CPU draws). H is the Hessian of the loss averaged
over the batches, taken over ``params`` (default: every parameter with ``requires_grad``).

How the Hutchinson estimates are computed (:func:`_hutchinson`, shared by the three of them): per batch, one
forward and one first-order gradient graph (``create_graph=True``); per probe, one Rademacher vector ``v`` over
*all* parameters and one Hessian-vector product (double backward) over all of them at once, so the cost does not
grow with the number of layers. Each parameter's part of ``(v, Hv)`` then gives its own diagonal block:
``v_p·(Hv)_p`` estimates Tr(H_pp) and ``v_p ⊙ (Hv)_p`` estimates diag(H_pp). With the same ``seed`` and
``params`` the three functions draw the very same probes, so the per-parameter traces add up to
:func:`hessian_trace` (up to float rounding) and each is the sum of its diagonal estimate. For per-layer
estimates pass the layers' weights as ``params`` (or map the per-parameter results back with
``model.named_parameters()``): the Hessian blocks between two parameters are never formed.

Double backward is needed; a few fused kernels (e.g. flash attention in ``scaled_dot_product_attention``) do not
support it: measure such models with the math backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .loss import (
    LossFn,
    _as_batch_list,
    _check_loss,
    _check_positive_int,
    _grad_context,
    _mode,
    _model_device,
    _resolve_params,
    _to_device,
)

__all__ = ["hessian_diagonal", "hessian_trace", "hessian_trace_per_param", "top_eigenvalue"]


# ------------------------------------------------------------------------------------- building blocks
def _gradients(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    """First-order gradients with their graph (``create_graph=True``), for Hessian-vector products."""
    return list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))


def _hvp(grads: Sequence[Tensor | None], params: Sequence[Tensor], vs: Sequence[Tensor]) -> list[Tensor]:
    """H·v from first-order grads built with ``create_graph=True``; unused or constant grads contribute 0."""
    terms = [(g * v).sum() for g, v in zip(grads, vs) if g is not None and g.requires_grad]
    if not terms:
        return [torch.zeros_like(p) for p in params]
    hv = torch.autograd.grad(torch.stack(terms).sum(), params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Σ_p ⟨a_p, b_p⟩ over all parameters, accumulated in float64."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _rademacher(params: Sequence[Tensor], gen: torch.Generator) -> list[Tensor]:
    """One probe: ±1 entries shaped like each parameter, drawn on the CPU generator ``gen`` (identical draws on
    every device), moved to the parameter's device and dtype."""
    return [
        (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(device=p.device, dtype=p.dtype) for p in params
    ]


#: ``visit(batch_index, v, Hv)``: called once per (batch, probe) by :func:`_hutchinson`, with one tensor per
#: parameter in each list (``Hv`` detached from the graph only where the caller detaches it)
ProbeVisitor = Callable[[int, Sequence[Tensor], Sequence[Tensor]], None]


def _hutchinson(
    model: nn.Module,
    loss_fn: LossFn,
    data: Sequence[Any],
    params: Sequence[Tensor],
    n_probes: int,
    seed: int,
    train_mode: bool,
    visit: ProbeVisitor,
) -> None:
    """The Hutchinson loop behind every trace/diagonal estimate: for each batch (in order), build the gradient
    graph once and call ``visit(batch_index, v, Hv)`` for ``n_probes`` Rademacher probes ``v`` (drawn from a CPU
    generator seeded with ``seed``, batch by batch and probe by probe), each ``Hv`` one double backward over all
    ``params`` at once. The callers accumulate what they need from ``(v, Hv)``; the graph of a batch is freed
    before the next one."""
    device = _model_device(model, params)
    gen = torch.Generator().manual_seed(seed)
    with _mode(model, train_mode), _grad_context():
        for b, batch in enumerate(data):
            loss = _check_loss(loss_fn(model, _to_device(batch, device)))
            grads = _gradients(loss, params)
            for _ in range(n_probes):
                vs = _rademacher(params, gen)
                visit(b, vs, _hvp(grads, params, vs))
            del loss, grads


# ------------------------------------------------------------------------------------------- Hessian
def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    n_probes: int = 8,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    train_mode: bool = False,
) -> float:
    """Hutchinson estimate of Tr(H) of the loss averaged over ``batches``: mean over Rademacher probes v of vᵀHv.

    For every batch the gradient graph is built once and ``n_probes`` Hessian-vector products (double backward)
    are taken from it; the per-batch estimates are averaged (the Hessian of the mean loss is the mean Hessian).
    The estimate is unbiased, exact for a diagonal Hessian, and its variance is 2·Σ_{i≠j} H_ij² / n_probes.

    Args:
        model: the network; restored to its own train/eval flags afterwards.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: a list of batches (a DataLoader would be iterated in full).
        n_probes: Rademacher probes per batch.
        seed: seed of the probes (a CPU generator: identical on every device).
        params: the parameters H is taken over; default every parameter with ``requires_grad``.
        train_mode: run the model in train mode (BatchNorm on batch statistics, dropout on); default eval.

    Example:
        >>> from flatq_lightning.callbacks.flatness import classification_loss
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> t = hessian_trace(model, classification_loss, [batch], n_probes=4)
        >>> isinstance(t, float)
        True
    """
    _check_positive_int("n_probes", n_probes)
    ps = _resolve_params(model, params)
    data = _as_batch_list(batches)
    per_batch = [0.0] * len(data)  # Σ over the batch's probes of vᵀHv

    def visit(b: int, vs: Sequence[Tensor], hvs: Sequence[Tensor]) -> None:
        per_batch[b] += _dot(vs, hvs)

    _hutchinson(model, loss_fn, data, ps, n_probes, seed, train_mode, visit)
    total = 0.0
    for acc in per_batch:
        total += acc / n_probes
    return total / len(data)


def hessian_trace_per_param(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    n_probes: int = 8,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    train_mode: bool = False,
) -> list[float]:
    """Hutchinson estimates of Tr(H_pp), the trace of each parameter's own diagonal block of H, in one pass.

    One list entry per parameter, in the order of ``params`` (default: ``model.parameters()`` with
    ``requires_grad``). The probes and Hessian-vector products are those of :func:`hessian_trace` with the same
    arguments (one HVP per probe over every parameter at once), so the entries add up to its result, up to float
    rounding; each is accumulated in float64. Per layer: pass the layers' weights as ``params``.

    Args:
        as in :func:`hessian_trace`.

    Example:
        >>> from flatq_lightning.callbacks.flatness import classification_loss
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> per = hessian_trace_per_param(model, classification_loss, [batch], n_probes=4)
        >>> len(per) == len(list(model.parameters()))
        True
        >>> t = hessian_trace(model, classification_loss, [batch], n_probes=4)
        >>> math.isclose(sum(per), t, rel_tol=1e-6, abs_tol=1e-9)
        True
    """
    _check_positive_int("n_probes", n_probes)
    ps = _resolve_params(model, params)
    data = _as_batch_list(batches)
    sums = [0.0] * len(ps)

    def visit(b: int, vs: Sequence[Tensor], hvs: Sequence[Tensor]) -> None:
        for i, (v, h) in enumerate(zip(vs, hvs)):
            sums[i] += float((v.double() * h.double()).sum())

    _hutchinson(model, loss_fn, data, ps, n_probes, seed, train_mode, visit)
    return [s / (n_probes * len(data)) for s in sums]


def hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    n_probes: int = 8,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    train_mode: bool = False,
) -> list[Tensor]:
    """Hutchinson estimate of diag(H): the mean over probes (and batches) of v ⊙ Hv, one tensor per parameter.

    Each tensor has its parameter's shape and dtype and lies on its device, detached. Unbiased, exact for a
    diagonal Hessian; an element's variance is Σ_{j≠i} H_ij² / (n_probes · batches). The probes are those of
    :func:`hessian_trace` with the same arguments, so ``d.sum()`` of a parameter's tensor is its entry of
    :func:`hessian_trace_per_param` (up to float rounding). Memory: one accumulator per parameter, besides
    what one Hessian-vector product needs.

    Args:
        as in :func:`hessian_trace`.

    Example:
        >>> from flatq_lightning.callbacks.flatness import classification_loss
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> d = hessian_diagonal(model, classification_loss, [batch], n_probes=4)
        >>> [t.shape for t in d] == [p.shape for p in model.parameters()]
        True
    """
    _check_positive_int("n_probes", n_probes)
    ps = _resolve_params(model, params)
    data = _as_batch_list(batches)
    acc = [torch.zeros(p.shape, device=p.device, dtype=torch.float64) for p in ps]

    def visit(b: int, vs: Sequence[Tensor], hvs: Sequence[Tensor]) -> None:
        for a, v, h in zip(acc, vs, hvs):
            a.add_(v.detach().double() * h.detach().double())

    _hutchinson(model, loss_fn, data, ps, n_probes, seed, train_mode, visit)
    return [(a / (n_probes * len(data))).to(p.dtype) for a, p in zip(acc, ps)]


def top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    train_mode: bool = False,
) -> float:
    """Dominant eigenvalue of the Hessian of the loss averaged over ``batches``, by power iteration with HVPs.

    Each iteration takes H·v = mean over batches of H_b·v (one forward and a double backward per batch, the
    graphs are not kept between iterations to bound memory) and stops when the Rayleigh quotient vᵀHv changes by
    less than ``tol`` relatively. Power iteration finds the eigenvalue of largest *magnitude*; near a minimum
    that is the largest positive one (the sharpness), but a dominant negative curvature would be returned as
    a negative number.

    Args:
        model, loss_fn, batches, seed, params, train_mode: as in :func:`hessian_trace`.
        iters: maximum number of power iterations.
        tol: relative change of the eigenvalue estimate that ends the iteration.

    Example:
        >>> from flatq_lightning.callbacks.flatness import classification_loss
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> top_eigenvalue(model, classification_loss, [batch], iters=10) >= 0.0
        True
    """
    _check_positive_int("iters", iters)
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    ps = _resolve_params(model, params)
    data = _as_batch_list(batches)
    device = _model_device(model, ps)
    gen = torch.Generator().manual_seed(seed)

    def normalize(vs: list[Tensor]) -> list[Tensor] | None:
        norm = math.sqrt(_dot(vs, vs))
        if norm == 0.0 or not math.isfinite(norm):
            return None
        return [v / norm for v in vs]

    v = normalize([torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype) for p in ps])
    assert v is not None
    eig: float | None = None
    with _mode(model, train_mode), _grad_context():
        for _ in range(iters):
            hv = [torch.zeros_like(p) for p in ps]
            for batch in data:
                loss = _check_loss(loss_fn(model, _to_device(batch, device)))
                for acc, h in zip(hv, _hvp(_gradients(loss, ps), ps, v)):
                    acc.add_(h.detach(), alpha=1.0 / len(data))
                del loss
            new = _dot(v, hv)
            converged = eig is not None and abs(new - eig) <= tol * max(abs(eig), 1e-12)
            eig = new
            nv = normalize(hv)
            if nv is None or converged:
                break
            v = nv
    return float(eig if eig is not None else 0.0)
