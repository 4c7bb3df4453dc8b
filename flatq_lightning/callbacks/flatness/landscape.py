"""Loss-landscape measures: filter-normalised random directions (Li et al. 2018), the mean loss along a 1-D
line or on a 2-D plane through the weights, and their plots.

The loss convention and the guarantees (eval mode by default, parameters restored bit for bit, seeded CPU
draws) are those of :mod:`.loss`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .loss import LossFn, _as_batch_list, _check_loss, _mode, _model_device, _resolve_params, _to_device

__all__ = [
    "filter_normalized_direction",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "plot_landscape_1d",
    "plot_landscape_2d",
]


def filter_normalized_direction(
    model: nn.Module,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    ignore_1d: bool = True,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """A random Gaussian direction, filter-normalised as in Li et al. 2018 ("Visualizing the loss landscape").

    For every parameter with two or more dimensions, each filter (slice along dim 0, i.e. an output channel or
    an output row of a Linear) of the direction is rescaled to the norm of the same filter of the weight. One-
    dimensional parameters (biases, BatchNorm affine) get a zero direction when ``ignore_1d`` (the paper's
    ``ignore biasbn``), otherwise they are normalised as a single filter.

    Args:
        model: source of the parameters (default: every parameter with ``requires_grad``).
        seed: seed of the CPU generator (ignored when ``generator`` is given).
        params: explicit parameter list, in the order the direction is returned.
        ignore_1d: zero the direction of 1-d parameters.
        generator: a CPU ``torch.Generator`` to draw from (for several directions from one stream).

    Example:
        >>> model = nn.Conv2d(3, 4, 3)
        >>> d = filter_normalized_direction(model, seed=1)
        >>> torch.allclose(d[0].flatten(1).norm(dim=1), model.weight.flatten(1).norm(dim=1))
        True
    """
    ps = _resolve_params(model, params)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for p in ps:
            d = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=torch.float32)
            w = p.detach().float()
            if p.dim() <= 1:
                if ignore_1d:
                    d.zero_()
                else:
                    d.mul_(w.norm() / (d.norm() + 1e-10))
            else:
                wn = w.flatten(1).norm(dim=1)
                dn = d.flatten(1).norm(dim=1)
                d.mul_((wn / (dn + 1e-10)).view(-1, *([1] * (p.dim() - 1))))
            out.append(d.to(p.dtype))
    return out


def _mean_loss(model: nn.Module, loss_fn: LossFn, data: Sequence[Any], device: torch.device) -> float:
    total = 0.0
    for batch in data:
        total += float(_check_loss(loss_fn(model, _to_device(batch, device))).detach().double())
    return total / len(data)


def _check_directions(ps: Sequence[Tensor], direction: Sequence[Tensor], name: str) -> list[Tensor]:
    d = list(direction)
    if len(d) != len(ps) or any(a.shape != p.shape for a, p in zip(d, ps)):
        raise ValueError(
            f"{name} must hold one tensor per parameter with the parameter's shape "
            f"({len(ps)} parameters), got {len(d)} tensors"
        )
    return [a.to(device=p.device, dtype=p.dtype) for a, p in zip(d, ps)]


def _landscape(
    model: nn.Module,
    loss_fn: LossFn,
    data: Sequence[Any],
    ps: Sequence[Tensor],
    dirs: Sequence[Sequence[Tensor]],
    coords: Sequence[Sequence[float]],
    train_mode: bool,
) -> list[float]:
    """Mean loss at w0 + Σ_k c_k·d_k for every coefficient tuple in ``coords``; parameters restored exactly."""
    device = _model_device(model, ps)
    originals = [p.detach().clone() for p in ps]
    losses = []
    try:
        with _mode(model, train_mode), torch.no_grad():
            for cs in coords:
                for p, w0, *ds in zip(ps, originals, *dirs):
                    p.copy_(w0)
                    for c, d in zip(cs, ds):
                        if c != 0.0:
                            p.add_(d, alpha=c)
                losses.append(_mean_loss(model, loss_fn, data, device))
    finally:
        with torch.no_grad():
            for p, w0 in zip(ps, originals):
                p.copy_(w0)
    return losses


def _check_grid(steps: int, span: float) -> np.ndarray:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    if not (isinstance(span, (int, float)) and span > 0 and math.isfinite(span)):
        raise ValueError(f"span must be a finite number > 0, got {span!r}")
    grid = np.linspace(-span, span, steps)
    if steps % 2 == 1:
        grid[steps // 2] = 0.0  # exact centre: the loss there is the unperturbed model's
    return grid


def loss_landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    steps: int = 21,
    span: float = 1.0,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    direction: Sequence[Tensor] | None = None,
    ignore_1d: bool = True,
    train_mode: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss along w + α·d for α in ``linspace(-span, span, steps)``, d filter-normalised (Li et al. 2018).

    With an odd ``steps`` the centre is exactly α = 0 and its loss equals the unperturbed model's loss.

    Returns:
        ``(alphas, losses)``: two float64 numpy arrays of length ``steps``.

    Args:
        model, loss_fn, batches, params, train_mode: as in :func:`.hessian.hessian_trace`.
        steps: number of points (>= 2).
        span: the largest |α|.
        seed, ignore_1d: passed to :func:`filter_normalized_direction`.
        direction: use this direction (one tensor per parameter) instead of drawing one.

    Example:
        >>> from flatq_lightning.callbacks.flatness import classification_loss
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> alphas, losses = loss_landscape_1d(model, classification_loss, [batch], steps=5)
        >>> alphas.tolist()
        [-1.0, -0.5, 0.0, 0.5, 1.0]
    """
    ps = _resolve_params(model, params)
    data = _as_batch_list(batches)
    alphas = _check_grid(steps, span)
    d = (
        filter_normalized_direction(model, seed=seed, params=ps, ignore_1d=ignore_1d)
        if direction is None
        else _check_directions(ps, direction, "direction")
    )
    losses = _landscape(model, loss_fn, data, ps, [d], [(float(a),) for a in alphas], train_mode)
    return alphas, np.asarray(losses, dtype=np.float64)


def loss_landscape_2d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    steps: int = 21,
    span: float = 1.0,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    directions: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
    ignore_1d: bool = True,
    train_mode: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean loss on the plane w + α·d1 + β·d2 with two filter-normalised random directions (Li et al. 2018).

    Both directions are drawn from one generator seeded with ``seed``; costs ``steps²`` evaluations of the loss
    over ``batches``.

    Returns:
        ``(alphas, betas, losses)`` with ``losses[i, j]`` the loss at ``(alphas[i], betas[j])``; float64 numpy.

    Args:
        as in :func:`loss_landscape_1d`; ``directions`` is an optional pair of directions.

    Example:
        >>> from flatq_lightning.callbacks.flatness import classification_loss
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> a, b, z = loss_landscape_2d(model, classification_loss, [batch], steps=3)
        >>> z.shape
        (3, 3)
    """
    ps = _resolve_params(model, params)
    data = _as_batch_list(batches)
    grid = _check_grid(steps, span)
    if directions is None:
        gen = torch.Generator().manual_seed(seed)
        d1 = filter_normalized_direction(model, params=ps, ignore_1d=ignore_1d, generator=gen)
        d2 = filter_normalized_direction(model, params=ps, ignore_1d=ignore_1d, generator=gen)
    else:
        if len(directions) != 2:
            raise ValueError(f"directions must be a pair (d1, d2), got {len(directions)} items")
        d1 = _check_directions(ps, directions[0], "directions[0]")
        d2 = _check_directions(ps, directions[1], "directions[1]")
    coords = [(float(a), float(b)) for a in grid for b in grid]
    losses = _landscape(model, loss_fn, data, ps, [d1, d2], coords, train_mode)
    return grid.copy(), grid.copy(), np.asarray(losses, dtype=np.float64).reshape(steps, steps)


# ------------------------------------------------------------------------------------------- plotting
def _figure(ncols: int = 1, width: float = 5.0, height: float = 4.0) -> tuple[Any, Any]:
    # Object-oriented Agg figure: no pyplot global state, no backend switch for the rest of the process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _check_results(results: Mapping[str, Any], arity: int, fn: str) -> None:
    if not isinstance(results, Mapping) or not results:
        raise ValueError(f"{fn} needs a non-empty dict name -> landscape result")
    for name, value in results.items():
        if not isinstance(value, (tuple, list)) or len(value) != arity:
            raise ValueError(
                f"{fn}: results[{name!r}] must be a {arity}-tuple, as returned by loss_landscape_*"
            )


def plot_landscape_1d(
    results: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    title: str | None = None,
    log_scale: bool = False,
) -> Path:
    """Draw several 1-D slices on one axis (e.g. ``{"plain": ..., "DNQ": ...}``) and save the figure to ``path``.

    Returns the path written (its suffix picks the format: .png, .pdf, .svg).

    Example:
        >>> import tempfile, os
        >>> res = {"plain": (np.linspace(-1, 1, 5), np.linspace(-1, 1, 5) ** 2)}
        >>> p = plot_landscape_1d(res, os.path.join(tempfile.mkdtemp(), "l1d.png"))
        >>> p.exists()
        True
    """
    _check_results(results, 2, "plot_landscape_1d")
    fig, (ax,) = _figure()
    for name, (alphas, losses) in results.items():
        ax.plot(np.asarray(alphas), np.asarray(losses), marker=".", label=str(name))
    ax.set_xlabel("α (filter-normalised direction)")
    ax.set_ylabel("loss")
    if log_scale:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_landscape_2d(
    results: Mapping[str, tuple[Any, Any, Any]],
    path: str | Path,
    levels: int = 20,
    title: str | None = None,
) -> Path:
    """Contour plots of 2-D slices side by side with shared contour levels, saved to ``path``.

    Example:
        >>> import tempfile, os
        >>> g = np.linspace(-1, 1, 5)
        >>> res = {"plain": (g, g, g[:, None] ** 2 + g[None] ** 2), "DNQ": (g, g, 0.5 * g[:, None] ** 2 + g[None] ** 2)}
        >>> plot_landscape_2d(res, os.path.join(tempfile.mkdtemp(), "l2d.png")).exists()
        True
    """
    _check_results(results, 3, "plot_landscape_2d")
    if not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    zs = [np.asarray(v[2], dtype=np.float64) for v in results.values()]
    finite = np.concatenate([z[np.isfinite(z)].ravel() for z in zs])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    lv = np.linspace(lo, hi if hi > lo else lo + 1.0, levels)
    fig, axes = _figure(ncols=len(results), width=4.5)
    cs = None
    for ax, (name, (alphas, betas, z)) in zip(axes, results.items()):
        # losses[i, j] is at (alphas[i], betas[j]): x = alpha along columns needs the transpose.
        cs = ax.contourf(np.asarray(alphas), np.asarray(betas), np.asarray(z).T, levels=lv, cmap="viridis")
        ax.contour(
            np.asarray(alphas), np.asarray(betas), np.asarray(z).T, levels=lv, colors="k", linewidths=0.3
        )
        ax.plot([0.0], [0.0], "r+")
        ax.set_title(str(name))
        ax.set_xlabel("α")
        ax.set_ylabel("β")
        ax.set_aspect("equal")
    if cs is not None:
        fig.colorbar(cs, ax=list(axes), label="loss")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
