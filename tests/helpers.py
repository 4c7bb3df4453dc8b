"""Tiny models and data shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

#: ``timeout=`` for the subprocesses the tests run: a hang guard, not a speed check. pytest-timeout (the per-test
#: ``timeout`` in pyproject.toml, or a test's own ``@pytest.mark.timeout``) is the bound that fires first and says
#: where the test hung; this one only matters where pytest-timeout is not installed. The old fixed values (120 s to
#: 900 s per call) were sized for an idle machine and could expire on a loaded 2-core one.
SUBPROCESS_TIMEOUT_S = 3600


class SmallConvNet(nn.Module):
    """conv-bn-relu ×2, pool, linear: big enough to have a first, middle and last layer."""

    def __init__(self, num_classes: int = 4, width: int = 8, in_ch: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width * 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width * 2)
        self.conv3 = nn.Conv2d(width * 2, width * 2, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(width * 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(self.pool(x).flatten(1))


def blob_data(n: int = 256, num_classes: int = 4, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a bright quadrant: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, 1, size, size, generator=g) * 0.5
    h = size // 2
    for c in range(num_classes):
        r, q = divmod(c, 2)
        x[y == c, :, r * h : (r + 1) * h, q * h : (q + 1) * h] += 1.5
    return x, y


def train_small(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150, lr: float = 0.05) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for i in range(steps):
        idx = torch.arange(i * 32, i * 32 + 32) % len(x)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_image_folder(root, classes: int = 3, train_per_class: int = 4, val_per_class: int = 2, size=(40, 48)):
    """A tiny ImageNet-style ImageFolder ``root/{train,val}/class<k>/*.jpg`` (class k: channel k saturated)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
                a[..., c % 3] = 255
                Image.fromarray(a).save(d / f"img{i}.jpg", quality=90)
    return root
