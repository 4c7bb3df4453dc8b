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

import os
from collections.abc import Callable
from pathlib import Path
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
    "PretrainedWeightsError",
    "CifarResNet",
    "SmallCNN",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "check_pretrained_available",
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


class PretrainedWeightsError(ValueError):
    """Pretrained weights were asked for but cannot be had (not cached, hub unreachable, bad local file).

    The message is one line naming what to pass instead (``model.pretrained_file=PATH`` / ``--pretrained-file``).
    """


_HOW = (
    "pass a local timm checkpoint file (a state dict, .pth/.bin/.safetensors) with model.pretrained_file=PATH "
    "(flatq-train) or --pretrained-file PATH (examples), or train from scratch (model.pretrained=false)"
)


def _reachable(url: str, timeout_s: float = 5.0) -> bool:
    """Whether ``url``'s server answers at all (any HTTP status), honouring the proxy environment variables."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def _weights_cached(load_from: str, location: str, cfg: dict[str, Any]) -> bool:
    if load_from == "hf-hub":
        from huggingface_hub import try_to_load_from_cache

        repo, _, rev = location.partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
        names += ["model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"]
        return any(isinstance(try_to_load_from_cache(repo, n, revision=rev or None), str) for n in names)
    if load_from == "url":
        import torch.hub

        return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(location.split("?")[0])).is_file()
    return True  # file / state_dict: nothing to download


def check_pretrained_available(name: str) -> None:
    """Fail fast, in one line, when timm would have to download ``name``'s weights and cannot.

    timm's own attempt retries the hub for about a minute offline and ends in a long traceback. Weights in
    the Hugging Face / torch hub cache, or a reachable hub, pass; ``HF_HUB_OFFLINE=1`` counts as unreachable.

    Raises:
        PretrainedWeightsError: naming the model and what to pass (``model.pretrained_file=PATH``).
    """
    from dataclasses import asdict

    from timm.models import get_pretrained_cfg
    from timm.models._builder import _resolve_pretrained_source

    pcfg = get_pretrained_cfg(name)  # the default tag's config (or the tag in "name.tag")
    cfg = asdict(pcfg) if pcfg is not None else {}
    load_from, location = _resolve_pretrained_source(cfg) if cfg else ("", "")
    if not load_from:
        raise PretrainedWeightsError(f"timm has no pretrained weights for {name!r}: {_HOW}")
    if _weights_cached(load_from, location, cfg):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    url = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co") if load_from == "hf-hub" else location
    if offline or not _reachable(url):
        why = "HF_HUB_OFFLINE is set" if offline else f"{url.split('/')[2] if '//' in url else url} cannot be reached"
        raise PretrainedWeightsError(
            f"the pretrained weights of {name!r} ({location}) are not in the local cache and {why}: {_HOW}"
        )


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r}: local models are {sorted(LOCAL_MODELS)}; any other name must be a timm "
        "architecture (list them with `timm.list_models('resnet*')`), e.g. 'resnet18', 'resnet50', "
        "'vit_tiny_patch16_224', 'vit_base_patch16_224'"
    )


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier by name.

    Local names (``LOCAL_MODELS``) are built here and accept ``in_chans`` (and ``width`` for ``small_cnn``);
    any other name is passed to ``timm.create_model(name, pretrained=..., num_classes=..., **kwargs)``, so
    timm options such as ``in_chans``, ``img_size`` (ViTs) or ``drop_path_rate`` work. ``pretrained=True``
    needs the weights in timm's/Hugging Face's local cache or network access (checked first: offline, it
    fails at once with :class:`PretrainedWeightsError`); local models have none. ``pretrained_file`` loads a
    local timm checkpoint (a state dict saved with ``torch.save`` or safetensors) instead, through timm's
    ``pretrained_cfg_overlay=dict(file=...)``: timm adapts it as it does hub weights (a classifier with another
    number of classes is re-initialised, ``in_chans`` adapted); it implies ``pretrained``.

    Raises:
        ValueError: unknown name (the message lists the local choices and points to timm), bad
            ``num_classes``, or ``pretrained=True`` for a local model.
        PretrainedWeightsError: ``pretrained_file`` missing, or hub weights neither cached nor reachable.

    Example:
        >>> create_model("small_cnn", num_classes=10, in_chans=1).fc.out_features
        10
    """
    if not isinstance(name, str) or not name:
        raise _unknown(str(name))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"create_model: num_classes must be a positive int, got {num_classes!r}")
    if pretrained_file is not None:
        f = Path(os.path.expandvars(os.path.expanduser(str(pretrained_file))))
        if not f.is_file():
            raise PretrainedWeightsError(f"pretrained_file: no checkpoint file at {str(f)!r} (a timm state dict)")
        pretrained_file = f.resolve()
    if name in LOCAL_MODELS:
        if pretrained or pretrained_file is not None:
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
    if pretrained_file is not None:
        overlay = {**dict(kwargs.pop("pretrained_cfg_overlay", None) or {}), "file": str(pretrained_file)}
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs
        )
    if pretrained:
        check_pretrained_available(name)
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
