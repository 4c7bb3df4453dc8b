"""Argument checks whose messages name the argument and the value."""

from __future__ import annotations

__all__ = ["check_bool", "check_int", "check_scale_value"]


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an int, or ``TypeError``/``ValueError`` naming ``name`` (bools and strings are refused)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is True or False; otherwise ``TypeError`` naming ``name`` (``"no"`` is not False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_scale_value(name: str, value: object) -> None:
    """A noise scale: a finite number >= 0 or a callable of the step (checked again where it is used)."""
    import math

    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0 or a callable of the step, got {value!r}")
