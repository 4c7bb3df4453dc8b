"""Helpers shared by the callbacks: hook suspension, seeding, finding the network and sibling callbacks."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_MASK64 = (1 << 64) - 1
_state = threading.local()


def splitmix64(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (e.g. base seed, step, layer): cheap and host-only."""
    z = 0x9E3779B97F4A7C15
    for k in keys:
        z = (z + (int(k) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z = z ^ (z >> 31)
    return z & ((1 << 63) - 1)


@contextlib.contextmanager
def hooks_suspended() -> Iterator[None]:
    """Inside this block the recorder and noise hooks do nothing (used for the quantized MSE forward)."""
    depth = getattr(_state, "suspended", 0)
    _state.suspended = depth + 1
    try:
        yield
    finally:
        _state.suspended = depth


def hooks_are_suspended() -> bool:
    return getattr(_state, "suspended", 0) > 0


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
