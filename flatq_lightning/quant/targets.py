"""The quantization target: which modules are quantized, and at which bit-width.

:class:`QuantTarget` is the one value that says it: the weight and activation :class:`QuantSpec` (a ``None``
side stays float), the layers in scope (``include``/``exclude`` patterns, attention points), the first/last
layer policy and per-layer bit-width overrides (a mixed-precision plan). :meth:`QuantTarget.preset` is the one
reader of ``"w4a4"``-style strings. Every part of the package that quantizes (``quantize_model``, the DNQ
callbacks, the MSE term, PTQ) takes a target, or a preset string that becomes one.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import Tensor, nn

from .attention import QuantPoint
from .spec import FLOAT_BITS, MAX_BITS, MIN_BITS, QuantSpec

#: layer types whose weight and input are quantized
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

__all__ = ["QUANTIZABLE_TYPES", "QuantTarget", "as_target", "select_modules", "first_last_names", "has_weight"]

_PRESET = re.compile(r"^\s*w(\d+)a(\d+)\s*$", re.IGNORECASE)


def _parse_preset(preset: object) -> tuple[int, int]:
    """``"w4a8"`` → ``(4, 8)``; ``ValueError`` naming the expected form and the range. The one parser of presets."""
    if not isinstance(preset, str):
        raise ValueError(f"a bit-width preset must be a string like 'w4a4', got {preset!r}")
    m = _PRESET.match(preset)
    if m is None:
        raise ValueError(
            f"cannot parse bit-width preset {preset!r}: expected 'w<bits>a<bits>' with bits in "
            f"[{MIN_BITS}, {MAX_BITS}], e.g. 'w8a8', 'w4a8', 'w4a4', 'w3a3', 'w2a4', 'w4a16'"
        )
    wb, ab = int(m.group(1)), int(m.group(2))
    for name, b in (("weight", wb), ("activation", ab)):
        if not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(
                f"preset {preset!r}: {name} bits must be in [{MIN_BITS}, {MAX_BITS}], got {b}"
            )
    return wb, ab


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


def _patterns(field: str, value: object) -> tuple[str, ...]:
    """``None``/a pattern/an iterable of patterns → a tuple of patterns (``ValueError`` naming the field)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        items = tuple(value)
        if all(isinstance(v, str) for v in items):
            return items
    raise ValueError(
        f"QuantTarget.{field} must be a pattern string or a sequence of patterns like ['layer1.*', '*.fc'], "
        f"got {value!r}"
    )


def _layer_bit(name: str, side: str, bits: object) -> int | None:
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits < FLOAT_BITS:
        raise ValueError(
            f"QuantTarget.layer_bits[{name!r}]: {side} bits must be an int in [{MIN_BITS}, {FLOAT_BITS - 1}] or "
            f"None (the target's width), got {bits!r} (a layer left in float is not a bit-width: exclude it instead)"
        )
    return int(bits)


def _layer_bits(value: object) -> tuple[tuple[str, int | None, int | None], ...]:
    """``{name: (weight_bits, act_bits)}`` or ``[(name, weight_bits, act_bits), ...]`` → the sorted tuple form."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = []
        for name, pair in value.items():
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Iterable) or len(pair := tuple(pair)) != 2:
                raise ValueError(
                    f"QuantTarget.layer_bits[{name!r}] must be a (weight_bits, act_bits) pair (None keeps the "
                    f"target's width for that side), got {pair!r}"
                )
            items.append((name, *pair))
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        items = []
        for row in value:
            if isinstance(row, (str, bytes)) or not isinstance(row, Iterable) or len(row := tuple(row)) != 3:
                raise ValueError(
                    "QuantTarget.layer_bits must be a mapping {layer: (weight_bits, act_bits)} or a sequence of "
                    f"(layer, weight_bits, act_bits) triples, got the entry {row!r}"
                )
            items.append(row)
    else:
        raise ValueError(
            "QuantTarget.layer_bits must be a mapping {layer: (weight_bits, act_bits)} or a sequence of "
            f"(layer, weight_bits, act_bits) triples, got {value!r}"
        )
    out: dict[str, tuple[str, int | None, int | None]] = {}
    for name, wb, ab in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"QuantTarget.layer_bits: a layer name must be a non-empty string, got {name!r}")
        if name in out:
            raise ValueError(f"QuantTarget.layer_bits names layer {name!r} twice")
        out[name] = (name, _layer_bit(name, "weight", wb), _layer_bit(name, "act", ab))
    return tuple(out[k] for k in sorted(out))


def _spec_bits(spec: QuantSpec | None) -> int:
    return spec.bits if spec is not None else FLOAT_BITS


@dataclass(frozen=True)
class QuantTarget:
    """What is quantized, and how: the one value the quantizing parts of the package take.

    Args:
        weight: the weight quantizer (``None``: weights stay float).
        act: the activation quantizer of the layer inputs (``None``: activations stay float).
        include, exclude: shell-style patterns on qualified layer names (:func:`select_modules`); a string or a
            sequence, kept as a tuple.
        keep_first_last_8bit: the first and the last selected layer with a weight run at ``max(bits, 8)``.
        attention_points: on timm ViTs also quantize attention's Q, K, V and softmax output
            (:func:`~flatq_lightning.quant.attention.attach_attention_points`).
        layer_bits: per-layer overrides ``(name, weight_bits, act_bits)`` (a mixed-precision plan; ``None`` keeps
            the target's width for that side), applied after the first/last policy; a mapping
            ``{name: (weight_bits, act_bits)}`` is accepted and kept in sorted tuple form. A name may be the end of
            the qualified name after a dot (:meth:`layer_specs`).

    Frozen and hashable; a preset string (``"w4a4"``, :meth:`preset`) is accepted wherever a target is.

    Example:
        >>> t = QuantTarget.preset("w4a4", exclude="*.head")
        >>> t.name, t.weight.bits, t.act.granularity, t.exclude
        ('w4a4', 4, 'per_tensor', ('*.head',))
        >>> t.at("w3a3").name, QuantTarget.preset("w4a16").act is None
        ('w3a3', True)
        >>> t.with_layer_bits({"fc": (8, None)}).name
        'w4a4-mixed'
        >>> net = nn.Sequential(nn.Linear(4, 4), QuantPoint(), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> specs = t.layer_specs(t.select(net))
        >>> [(n, w and w.bits, a.bits) for n, (w, a) in specs.items()]
        [('0', 8, 8), ('1', 4, 4), ('2', 4, 4), ('3', 8, 8)]
    """

    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_first_last_8bit: bool = True
    attention_points: bool = True
    layer_bits: tuple[tuple[str, int | None, int | None], ...] = ()

    def __post_init__(self) -> None:
        for side in ("weight", "act"):
            spec = getattr(self, side)
            if spec is not None and not isinstance(spec, QuantSpec):
                hint = " (for a preset string use QuantTarget.preset(...))" if isinstance(spec, str) else ""
                raise ValueError(f"QuantTarget.{side} must be a QuantSpec or None (float), got {spec!r}{hint}")
        for flag in ("keep_first_last_8bit", "attention_points"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"QuantTarget.{flag} must be True or False, got {getattr(self, flag)!r}")
        object.__setattr__(self, "include", _patterns("include", self.include))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))
        object.__setattr__(self, "layer_bits", _layer_bits(self.layer_bits))

    # construction --------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, preset: str, observer: str = "minmax", act_observer: str | None = None, **fields_: Any) -> QuantTarget:
        """The target of a ``"w<bits>a<bits>"`` preset: the method's quantizers at those widths.

        Weights symmetric per output channel, activations asymmetric per tensor (:meth:`QuantSpec.weight`,
        :meth:`QuantSpec.activation`); ``observer`` picks the weight observer and, unless ``act_observer`` is
        given, the activation observer. A side at 16 bits stays float (``None``): ``"w4a16"`` quantizes weights
        only, ``"w16a4"`` activations only. ``fields_``: the other fields (``include``, ``exclude``,
        ``keep_first_last_8bit``, ``attention_points``, ``layer_bits``).

        Example:
            >>> t = QuantTarget.preset("w4a4", "mse", act_observer="percentile", keep_first_last_8bit=False)
            >>> (t.weight.observer, t.act.observer, t.act.symmetric, t.keep_first_last_8bit)
            ('mse', 'percentile', False, False)
        """
        wb, ab = _parse_preset(preset)
        own = {f.name for f in fields(cls)} - {"weight", "act"}
        bad = sorted(set(fields_) - own)
        if bad:
            raise ValueError(
                f"QuantTarget.preset({preset!r}): unknown field(s) {bad}; the preset sets weight and act, the other "
                f"fields are {sorted(own)}"
            )
        w = QuantSpec.weight(wb, observer=observer) if wb < FLOAT_BITS else None
        a = QuantSpec.activation(ab, observer=act_observer or observer) if ab < FLOAT_BITS else None
        return cls(weight=w, act=a, **fields_)

    def at(self, bits: str | tuple[int, int], observer: str | None = None, act_observer: str | None = None) -> QuantTarget:
        """The same target (scope, first/last policy, layer overrides, quantizer settings) at other widths.

        ``bits``: a preset (``"w3a3"``) or a ``(weight_bits, act_bits)`` pair; a side at 16 bits stays float, a
        side that was float gets the method's quantizer. ``observer``/``act_observer`` replace the observers
        (``act_observer`` defaults to ``observer`` when that is given; otherwise each side keeps its own).

        Example:
            >>> QuantTarget.preset("w4a4", "mse").at("w8a16").weight
            QuantSpec(bits=8, granularity='per_channel', symmetric=True, observer='mse', percentile=99.99, ch_axis=0, mse_grid=20)
        """
        if isinstance(bits, tuple) and len(bits) == 2 and all(type(b) is int for b in bits):
            bits = f"w{bits[0]}a{bits[1]}"
        if not isinstance(bits, str):
            raise ValueError(f"QuantTarget.at: bits must be a preset like 'w4a4' or a (weight_bits, act_bits) pair "
                             f"of ints, got {bits!r}")
        wb, ab = _parse_preset(bits)
        w_obs = observer or (self.weight.observer if self.weight is not None else "minmax")
        a_obs = act_observer or observer or (self.act.observer if self.act is not None else w_obs)
        w = a = None
        if wb < FLOAT_BITS:
            w = replace(self.weight, bits=wb, observer=w_obs) if self.weight is not None else QuantSpec.weight(wb, w_obs)
        if ab < FLOAT_BITS:
            a = replace(self.act, bits=ab, observer=a_obs) if self.act is not None else QuantSpec.activation(ab, a_obs)
        return replace(self, weight=w, act=a)

    def with_layer_bits(
        self, layer_bits: Mapping[str, tuple[int | None, int | None]] | Iterable[tuple[str, int | None, int | None]]
    ) -> QuantTarget:
        """This target with the per-layer overrides ``layer_bits`` (replacing any it had; ``{}`` removes them)."""
        return replace(self, layer_bits=layer_bits)

    # reading -------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """``"w4a4"`` (a float side at 16: ``"w4a16"``), with ``"-mixed"`` when there are per-layer overrides."""
        base = f"w{_spec_bits(self.weight)}a{_spec_bits(self.act)}"
        return f"{base}-mixed" if self.layer_bits else base

    def select(self, model: nn.Module, points: bool | None = None) -> list[tuple[str, nn.Module]]:
        """The layers of ``model`` in this target's scope, in registration order (:func:`select_modules` with
        ``include``/``exclude``). ``points``: select the weightless :class:`QuantPoint` s too (attention and
        placement points); default ``attention_points``."""
        return select_modules(
            model, include=self.include, exclude=self.exclude,
            attention_points=self.attention_points if points is None else points,
        )

    def layer_specs(
        self, selected: Sequence[tuple[str, nn.Module]]
    ) -> dict[str, tuple[QuantSpec | None, QuantSpec | None]]:
        """Per-layer ``(weight_spec, act_spec)`` of the ``selected`` layers (:meth:`select`).

        The first and the last layer with a weight run at ``max(bits, 8)`` when ``keep_first_last_8bit``, then
        the ``layer_bits`` overrides apply (they win over the first/last policy). Weightless points get the pair
        too (only the act spec applies to them); a ``None`` (float) side stays ``None``. An override names a
        selected layer by its qualified name, or by the end of it after a dot when that is unique (``"conv2"`` is
        ``"model.conv2"`` of a LightningModule around the network: one plan serves DNQ, which selects on the
        module, and PTQ, which selects on its network). An override naming no selected layer (or several), giving
        a weight width to a weightless point or a width to a float side raises ``ValueError``.
        """
        keep = first_last_names(selected) if self.keep_first_last_8bit else set()
        specs: dict[str, tuple[QuantSpec | None, QuantSpec | None]] = {}
        for name, _ in selected:
            w, a = self.weight, self.act
            if name in keep:
                w = None if w is None else replace(w, bits=max(w.bits, 8))
                a = None if a is None else replace(a, bits=max(a.bits, 8))
            specs[name] = (w, a)
        if not self.layer_bits:
            return specs
        modules = dict(selected)
        done: dict[str, str] = {}
        for given, wb, ab in self.layer_bits:
            name = _resolve_layer(given, list(specs))
            if name in done:
                raise ValueError(f"QuantTarget.layer_bits names layer {name!r} twice ({done[name]!r} and {given!r})")
            done[name] = given
            w, a = specs[name]
            if wb is not None:
                if self.weight is None:
                    raise ValueError(f"QuantTarget.layer_bits[{name!r}]: weight bits {wb}, but the target's weights "
                                     "stay float (weight=None)")
                if not has_weight(modules[name]):
                    raise ValueError(f"QuantTarget.layer_bits[{name!r}]: weight bits {wb}, but {name!r} is a "
                                     "weightless quantization point: give None")
                w = replace(self.weight, bits=wb)
            if ab is not None:
                if self.act is None:
                    raise ValueError(f"QuantTarget.layer_bits[{name!r}]: act bits {ab}, but the target's activations "
                                     "stay float (act=None)")
                a = replace(self.act, bits=ab)
            specs[name] = (w, a)
        return specs


def _resolve_layer(name: str, selected: list[str]) -> str:
    """The selected layer ``name`` names: itself, else the one selected name that ends with ``"." + name``."""
    if name in selected:
        return name
    hits = [n for n in selected if n.endswith("." + name)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ValueError(f"QuantTarget.layer_bits names {name!r}, the end of several selected layers {hits}: give "
                         "the full name")
    raise ValueError(
        f"QuantTarget.layer_bits names {name!r}, which is not a selected layer; the selected layers are {selected}"
    )


def as_target(target: object, what: str = "target") -> QuantTarget:
    """``target`` as a :class:`QuantTarget`: a target is returned as it is, a string is a preset
    (:meth:`QuantTarget.preset`); anything else is a ``ValueError`` naming ``what``."""
    if isinstance(target, QuantTarget):
        return target
    if isinstance(target, str):
        return QuantTarget.preset(target)
    hint = ""
    if isinstance(target, QuantSpec) or (isinstance(target, tuple) and any(isinstance(s, QuantSpec) for s in target)):
        hint = " (QuantSpecs go into a target: QuantTarget(weight=..., act=...))"
    raise ValueError(f"{what} must be a QuantTarget or a preset string like 'w4a4', got {target!r}{hint}")
