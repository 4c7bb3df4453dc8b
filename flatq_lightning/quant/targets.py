"""Which modules are quantized, and at which bit-width (first/last-layer policy)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import replace

from torch import Tensor, nn

from .attention import QuantPoint
from .spec import QuantSpec

#: layer types whose weight and input are quantized
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

__all__ = ["QUANTIZABLE_TYPES", "select_modules", "first_last_names", "has_weight", "layer_specs"]


def has_weight(module: nn.Module) -> bool:
    """Whether ``module`` has a weight tensor to quantize (a :class:`QuantPoint` has none: input only).

    Example:
        >>> has_weight(nn.Linear(2, 2)), has_weight(QuantPoint())
        (True, False)
    """
    return isinstance(getattr(module, "weight", None), Tensor)


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
    attention_points: bool = True,
) -> list[tuple[str, nn.Module]]:
    """Quantizable layers of ``model`` as ordered ``(name, module)`` pairs (registration order).

    ``include``/``exclude`` are shell-style patterns on the qualified name (``"layer1.*"``, ``"*.fc"``);
    a layer is kept when it matches an include pattern (or none are given) and no exclude pattern.
    :class:`~flatq_lightning.quant.attention.QuantPoint` modules (weightless input-only points, e.g. the
    attention operands added by ``attach_attention_points``) are selected too unless ``attention_points``
    is False; patterns apply to them as well (``exclude="*.quant_attn"``).

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
        point = isinstance(mod, QuantPoint)
        if not name or not (isinstance(mod, types) or (point and attention_points)):
            continue
        if inc and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        out.append((name, mod))
    return out


def first_last_names(selected: Sequence[tuple[str, nn.Module]]) -> set[str]:
    """Names of the first and the last selected layer *with a weight* (the input stem and the classifier,
    usually); weightless points never count as first or last."""
    weighted = [name for name, mod in selected if has_weight(mod)]
    if not weighted:
        return set()
    return {weighted[0], weighted[-1]}


def layer_specs(
    selected: Sequence[tuple[str, nn.Module]],
    weight_spec: QuantSpec | None,
    act_spec: QuantSpec | None,
    keep_first_last_8bit: bool = True,
) -> dict[str, tuple[QuantSpec | None, QuantSpec | None]]:
    """Per-layer ``(weight_spec, act_spec)``: the first and last weighted layer at ``max(bits, 8)`` when asked.

    Weightless points get the pair too (only the act spec applies to them); a ``None`` side (stays float)
    stays ``None``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), QuantPoint(), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> specs = layer_specs(select_modules(net), *QuantSpec.parse("w4a4"))
        >>> [(n, a.bits) for n, (w, a) in specs.items()]
        [('0', 8), ('1', 4), ('2', 4), ('3', 8)]
    """
    keep = first_last_names(selected) if keep_first_last_8bit else set()
    specs = {}
    for name, _ in selected:
        w, a = weight_spec, act_spec
        if name in keep:
            w = None if w is None else replace(w, bits=max(w.bits, 8))
            a = None if a is None else replace(a, bits=max(a.bits, 8))
        specs[name] = (w, a)
    return specs
