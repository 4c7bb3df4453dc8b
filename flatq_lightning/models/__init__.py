"""Model factory: a few local CIFAR/quickstart networks, everything else from ``timm``.

Example:
    >>> import torch
    >>> net = create_model("cifar_resnet20", num_classes=10)
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sorted(LOCAL_MODELS)[:2]
    ['cifar_resnet20', 'cifar_resnet32']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .cifar_resnet import (
    BasicBlock,
    CifarResNet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
)
from .small import SmallCNN, small_cnn
from .vit import vit_cifar

__all__ = [
    "LOCAL_MODELS",
    "BasicBlock",
    "CifarResNet",
    "SmallCNN",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "create_model",
    "is_model",
    "small_cnn",
    "vit_cifar",
]

#: networks defined in this package (no pretrained weights); every other name goes to ``timm.create_model``
LOCAL_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet32": cifar_resnet32,
    "cifar_resnet44": cifar_resnet44,
    "cifar_resnet56": cifar_resnet56,
    "small_cnn": small_cnn,
    "vit_cifar": vit_cifar,
}


def is_model(name: str) -> bool:
    """Whether :func:`create_model` knows ``name`` (a local network or a timm architecture)."""
    if name in LOCAL_MODELS:
        return True
    import timm

    return bool(timm.is_model(name))


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r}: local models are {sorted(LOCAL_MODELS)}; any other name must be a timm "
        "architecture (list them with `timm.list_models('resnet*')`), e.g. 'resnet18', 'resnet50', "
        "'vit_tiny_patch16_224', 'vit_base_patch16_224'"
    )


def create_model(name: str, num_classes: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a classifier by name.

    Local names (``LOCAL_MODELS``) are built here and accept ``in_chans`` (and ``width`` for ``small_cnn``);
    any other name is passed to ``timm.create_model(name, pretrained=..., num_classes=..., **kwargs)``, so
    timm options such as ``in_chans``, ``img_size`` (ViTs) or ``drop_path_rate`` work. ``pretrained=True``
    needs the weights in timm's/Hugging Face's local cache or network access; local models have none.

    Raises:
        ValueError: unknown name (the message lists the local choices and points to timm), bad
            ``num_classes``, or ``pretrained=True`` for a local model.

    Example:
        >>> create_model("small_cnn", num_classes=10, in_chans=1).fc.out_features
        10
    """
    if not isinstance(name, str) or not name:
        raise _unknown(str(name))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"create_model: num_classes must be a positive int, got {num_classes!r}")
    if name in LOCAL_MODELS:
        if pretrained:
            raise ValueError(
                f"create_model: the local model {name!r} has no pretrained weights; use pretrained=False "
                "or a timm architecture"
            )
        try:
            return LOCAL_MODELS[name](num_classes=num_classes, **kwargs)
        except TypeError as err:
            raise ValueError(f"create_model: bad keyword arguments for {name!r}: {err}") from err
    import timm

    if not timm.is_model(name):
        raise _unknown(name)
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
