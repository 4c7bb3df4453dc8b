"""A small conv-BN-ReLU network for the quickstart's 8×8 or 16×16 digits."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (the second one strided), global average pool, linear classifier.

    Every conv is followed directly by its BN, so BN folding sees plain Conv→BN pairs.

    Example:
        >>> import torch
        >>> net = SmallCNN(num_classes=10, in_chans=1, width=16)
        >>> net(torch.randn(4, 1, 16, 16)).shape
        torch.Size([4, 10])
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"SmallCNN width must be >= 1, got {width}")
        w1, w2 = width, 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w1, 3, padding=1, bias=False),
            nn.BatchNorm2d(w1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w1, w2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w2),
            nn.ReLU(inplace=True),
            nn.Conv2d(w2, w2, 3, padding=1, bias=False),
            nn.BatchNorm2d(w2),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def small_cnn(num_classes: int = 10, in_chans: int = 1, width: int = 16) -> SmallCNN:
    """The quickstart network (about 12 k parameters at ``width=16``)."""
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, width=width)
