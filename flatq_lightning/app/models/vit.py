"""A small ViT for 32×32 images (CIFAR), built with timm (no pretrained weights)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["vit_cifar"]


def vit_cifar(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """ViT-Tiny layout for CIFAR: 32×32 input, patch 4 (64 tokens + class token), depth 6, width 192, 3 heads.

    A ``timm`` VisionTransformer (its attention is ``timm.layers.Attention``, so the attention quantization
    points apply); extra keyword arguments (``depth``, ``drop_path_rate``, …) go to ``timm.create_model``.

    Example:
        >>> import torch
        >>> net = vit_cifar(num_classes=10, depth=1)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    import timm

    opts: dict[str, Any] = dict(img_size=32, patch_size=4, depth=6, embed_dim=192, num_heads=3)
    opts.update(kwargs)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, in_chans=in_chans, **opts
    )
