"""The options of DNQ's three parts as small frozen configs, and how DNQ's flat arguments fill them.

Each config names every option of its part (:class:`QuantErrorRecorder`, :class:`DifferentialNoiseInjection`,
:class:`ActivationNoiseInjection`) that DNQ does not set itself (DNQ wires the recorder, the target, the name and
the recorder's ``refresh_weights``). A field left ``None`` is not set: DNQ's flat argument for it, if given, else
the part's own default (the defaults live in the parts' signatures, nowhere else). A mapping of the same keys
(a Hydra YAML node) is accepted wherever a config is.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .act_noise import ActivationNoiseInjection
from .noise_modes import NoiseMode
from .schedules import Warmup, check_warmup
from .weight_noise import DifferentialNoiseInjection

__all__ = ["FLAT_OPTIONS", "ActNoiseConfig", "RecorderConfig", "WeightNoiseConfig", "resolve_part_configs"]


@dataclasses.dataclass(frozen=True)
class RecorderConfig:
    """Options of DNQ's :class:`~flatq_lightning.callbacks.recorder.QuantErrorRecorder` (``None``: not set).

    ``stats_every``, ``momentum``, ``log_sqnr``, ``check_finite``, ``placement``: the recorder's arguments.
    ``record_activations``: ``None`` records the layer inputs when the activation noise runs; ``True`` without
    activation noise keeps their ranges and error statistics anyway (for the MSE term or the logs).

    Example:
        >>> from flatq_lightning import DNQ
        >>> DNQ("w4a4", recorder=RecorderConfig(log_sqnr=False)).recorder.log_sqnr
        False
    """

    stats_every: int | None = None
    momentum: float | None = None
    log_sqnr: bool | None = None
    check_finite: bool | None = None
    record_activations: bool | None = None
    placement: str | None = None


@dataclasses.dataclass(frozen=True)
class WeightNoiseConfig:
    """Options of DNQ's :class:`~flatq_lightning.callbacks.weight_noise.DifferentialNoiseInjection` (``None``:
    not set): ``noise_scale`` (a float or a schedule of the step, a
    :class:`~flatq_lightning.callbacks.schedules.Warmup` included), ``mode``, ``seed``, ``noise_source``,
    ``pool_fraction``, ``clean_bn_batches``.

    Example:
        >>> from flatq_lightning import DNQ
        >>> DNQ("w4a4", weight_noise=WeightNoiseConfig(pool_fraction=1 / 64)).weight_noise.pool_fraction
        0.015625
    """

    noise_scale: float | Callable[[int], float] | None = None
    mode: str | NoiseMode | None = None
    seed: int | None = None
    noise_source: str | None = None
    pool_fraction: float | None = None
    clean_bn_batches: int | None = None


@dataclasses.dataclass(frozen=True)
class ActNoiseConfig:
    """Options of DNQ's :class:`~flatq_lightning.callbacks.act_noise.ActivationNoiseInjection` (``None``: not
    set): ``p``, ``noise_scale`` (κ_a: a float or a schedule of the step, a ``Warmup`` included), ``seed``,
    ``noise_source``, ``pool_numel``.

    Example:
        >>> from flatq_lightning import DNQ
        >>> DNQ("w4a4", act_noise=ActNoiseConfig(pool_numel=1 << 20)).act_noise.pool_numel
        1048576
    """

    p: float | None = None
    noise_scale: float | Callable[[int], float] | None = None
    seed: int | None = None
    noise_source: str | None = None
    pool_numel: int | None = None


#: each flat argument of DNQ and the part options (``part.field``) it sets
FLAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "stats_every": ("recorder.stats_every",),
    "momentum": ("recorder.momentum",),
    "placement": ("recorder.placement",),
    "noise_scale": ("weight_noise.noise_scale",),
    "mode": ("weight_noise.mode",),
    "clean_bn_batches": ("weight_noise.clean_bn_batches",),
    "p": ("act_noise.p",),
    "act_noise_scale": ("act_noise.noise_scale",),
    "seed": ("weight_noise.seed", "act_noise.seed"),
    "noise_source": ("weight_noise.noise_source", "act_noise.noise_source"),
}

_C = TypeVar("_C", RecorderConfig, WeightNoiseConfig, ActNoiseConfig)


def _as_config(cls: type[_C], value: object, arg: str) -> _C:
    """``value`` (a ``cls`` or a mapping of its fields) as a ``cls``."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in value if k not in names)
        if unknown:
            raise ValueError(f"{arg}: unknown option(s) {unknown}; the options of {cls.__name__} are {names}")
        return cls(**{str(k): v for k, v in value.items()})
    raise ValueError(f"{arg} must be {_a(cls)} or a mapping of its options, got {value!r}")


def _switch(cls: type[_C], value: object, arg: str) -> _C | None:
    """A part's argument of DNQ: ``True`` (on, its defaults), ``False`` (off: ``None``), or its config."""
    if isinstance(value, bool):
        return cls() if value else None
    if isinstance(value, (cls, Mapping)):
        return _as_config(cls, value, arg)
    raise ValueError(f"{arg} must be True or False, {_a(cls)} or a mapping of its options, got {value!r}")


def _a(cls: type) -> str:
    return f"{'an' if cls.__name__[0] in 'AEIOU' else 'a'} {cls.__name__}"


def _same(a: object, b: object) -> bool:
    """The same setting (``True`` is not ``1``; values that cannot be compared are not the same)."""
    if a is b:
        return True
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _part_default(cls: type, name: str) -> Any:
    return inspect.signature(cls).parameters[name].default


def _add_warmup(configs: dict[str, Any], warmup_steps: object, warmup_fraction: object) -> None:
    """Both noise scales inside a :class:`Warmup` of DNQ's ``warmup_steps``/``warmup_fraction``."""
    if warmup_steps is None and warmup_fraction is None:
        return
    steps = 0 if warmup_steps is None else warmup_steps
    fraction = 0.0 if warmup_fraction is None else warmup_fraction
    check_warmup(steps, fraction)
    if not steps and not fraction:
        return
    given = f"warmup_fraction={fraction!r}" if fraction else f"warmup_steps={steps!r}"
    for part, cls in (("weight_noise", DifferentialNoiseInjection), ("act_noise", ActivationNoiseInjection)):
        cfg = configs[part]
        if cfg is None:
            continue
        scale = _part_default(cls, "noise_scale") if cfg.noise_scale is None else cfg.noise_scale
        if isinstance(scale, Warmup):
            raise ValueError(f"{given} and {part}.noise_scale={scale!r} both give a warm-up: set it in one place")
        configs[part] = dataclasses.replace(cfg, noise_scale=Warmup(scale, steps=steps, fraction=fraction))


def resolve_part_configs(
    recorder: object, weight_noise: object, act_noise: object, flat: Mapping[str, object]
) -> dict[str, Any]:
    """DNQ's part arguments and flat arguments as ``{"recorder": RecorderConfig, "weight_noise":
    WeightNoiseConfig | None, "act_noise": ActNoiseConfig | None}`` (``None``: the part is off).

    A flat argument fills the part options :data:`FLAT_OPTIONS` names; one that a config also sets, to another
    value, is a ``ValueError`` naming both. ``warmup_steps``/``warmup_fraction`` put both noise scales inside a
    :class:`~flatq_lightning.callbacks.schedules.Warmup`. Flat arguments of a part that is off are ignored.
    """
    configs: dict[str, Any] = {
        "recorder": RecorderConfig() if recorder is None else _as_config(RecorderConfig, recorder, "recorder"),
        "weight_noise": _switch(WeightNoiseConfig, weight_noise, "weight_noise"),
        "act_noise": _switch(ActNoiseConfig, act_noise, "act_noise"),
    }
    for arg, value in flat.items():
        if arg in ("warmup_steps", "warmup_fraction") or value is None:
            continue
        for option in FLAT_OPTIONS[arg]:
            part, field = option.split(".")
            cfg = configs[part]
            if cfg is None:
                continue
            have = getattr(cfg, field)
            if have is None:
                configs[part] = dataclasses.replace(cfg, **{field: value})
            elif not _same(have, value):
                raise ValueError(f"{arg}={value!r} and {option}={have!r} disagree: set it in one place")
    _add_warmup(configs, flat.get("warmup_steps"), flat.get("warmup_fraction"))
    rec = configs["recorder"]
    if rec.record_activations is False and configs["act_noise"] is not None:
        raise ValueError(
            "recorder.record_activations=False and act_noise: the activation noise needs the recorder's activation "
            "statistics (act_noise=False, or leave record_activations unset)"
        )
    return configs


def part_kwargs(config: object) -> dict[str, Any]:
    """The fields a config sets (not ``None``), as keyword arguments of its part."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if getattr(config, f.name) is not None}
