"""The classic CIFAR ResNets (He et al., 2016, section 4.2): 6n+2 layers, 3 stages of widths 16/32/64.

Shortcuts use option B (1×1 conv + BN) wherever the shape changes, so every conv that BatchNorm follows is a
Conv→BN pair that :func:`flatq_lightning.quant.fold_batchnorm` folds, and every weight is quantizable.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
]


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus shortcut, then ReLU.

    Example:
        >>> import torch
        >>> BasicBlock(16, 32, stride=2)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: stem conv 3×3/16, three stages of ``n`` blocks, global pool, linear.

    Example:
        >>> import torch
        >>> net = CifarResNet(depth=20, num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers = []
        in_planes = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet20(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    """ResNet-20 for CIFAR (about 0.27 M parameters)."""
    return CifarResNet(20, num_classes, in_chans)


def cifar_resnet32(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    """ResNet-32 for CIFAR (about 0.47 M parameters)."""
    return CifarResNet(32, num_classes, in_chans)


def cifar_resnet44(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    """ResNet-44 for CIFAR (about 0.66 M parameters)."""
    return CifarResNet(44, num_classes, in_chans)


def cifar_resnet56(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    """ResNet-56 for CIFAR (about 0.86 M parameters)."""
    return CifarResNet(56, num_classes, in_chans)
