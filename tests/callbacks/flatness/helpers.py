"""What the flatness tests share: a quadratic with a known Hessian, a small conv net with BatchNorm, snapshots."""

from __future__ import annotations

import torch
from torch import nn

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
