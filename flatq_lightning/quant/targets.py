"""Which modules are quantized, and at which bit-width (first/last-layer policy)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import replace

from torch import nn

from .spec import QuantSpec

#: layer types whose weight and input are quantized
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

__all__ = ["QUANTIZABLE_TYPES", "select_modules", "first_last_names", "layer_specs"]


def _as_patterns(p: str | Iterable[str] | None) -> list[str]:
    if p is None:
        return []
    if isinstance(p, str):
        return [p]
    return list(p)


def select_modules(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: tuple[type[nn.Module], ...] = QUANTIZABLE_TYPES,
) -> list[tuple[str, nn.Module]]:
    """Quantizable layers of ``model`` as ordered ``(name, module)`` pairs (registration order).

    ``include``/``exclude`` are shell-style patterns on the qualified name (``"layer1.*"``, ``"*.fc"``);
    a layer is kept when it matches an include pattern (or none are given) and no exclude pattern.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
        >>> [n for n, _ in select_modules(net)]
        ['0', '3']
        >>> [n for n, _ in select_modules(net, exclude="3")]
        ['0']
    """
    inc, exc = _as_patterns(include), _as_patterns(exclude)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, types) or not name:
            continue
        if inc and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        out.append((name, mod))
    return out


def first_last_names(selected: Sequence[tuple[str, nn.Module]]) -> set[str]:
    """Names of the first and the last selected layer (the input stem and the classifier, usually)."""
    if not selected:
        return set()
    return {selected[0][0], selected[-1][0]}


def layer_specs(
    selected: Sequence[tuple[str, nn.Module]],
    weight_spec: QuantSpec,
    act_spec: QuantSpec,
    keep_first_last_8bit: bool = True,
) -> dict[str, tuple[QuantSpec, QuantSpec]]:
    """Per-layer ``(weight_spec, act_spec)``: the first and last layer at ``max(bits, 8)`` when asked."""
    keep = first_last_names(selected) if keep_first_last_8bit else set()
    specs = {}
    for name, _ in selected:
        w, a = weight_spec, act_spec
        if name in keep:
            w = replace(w, bits=max(w.bits, 8))
            a = replace(a, bits=max(a.bits, 8))
        specs[name] = (w, a)
    return specs
