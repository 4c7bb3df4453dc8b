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


def describe(value: object) -> object:
    """A logger-friendly hyperparameter: numbers, strings and bools as they are, anything else as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return ",".join(str(v) for v in value)
    return repr(value)


def recorder_settings(recorder: object) -> dict[str, object]:
    """The target quantizer and statistics settings of a QuantErrorRecorder, as ``dnq/...`` hyperparameters."""
    w, a = getattr(recorder, "weight_spec", None), getattr(recorder, "act_spec", None)
    return {
        "dnq/preset": describe(getattr(recorder, "name", None)),
        "dnq/weight_spec": describe(w),
        "dnq/act_spec": describe(a),
        "dnq/stats_every": describe(getattr(recorder, "stats_every", None)),
        "dnq/momentum": describe(getattr(recorder, "momentum", None)),
        "dnq/keep_first_last_8bit": describe(getattr(recorder, "keep_first_last_8bit", None)),
        "dnq/include": describe(getattr(recorder, "include", None)) or "",
        "dnq/exclude": describe(getattr(recorder, "exclude", None)) or "",
    }


def log_settings(trainer: object, settings: dict[str, object]) -> None:
    """Add ``settings`` to every logger's hyperparameters (each logger writes on rank zero only)."""
    from ..report import log_hyperparams

    for logger in getattr(trainer, "loggers", None) or []:
        log_hyperparams(logger, settings)


def log_every_n_steps(trainer: object, step: int) -> bool:
    """Whether ``step`` is one the Trainer writes logs on (Lightning's rule: ``(step + 1) % log_every_n_steps
    == 0``): per-step values are logged only then, so that logging a Python number costs no host-device copy
    on the other steps."""
    n = int(getattr(trainer, "log_every_n_steps", 1) or 1)
    return (step + 1) % n == 0
