"""Hook suspension: one switch, owned by the quantization core, that every flatq forward hook obeys.

The recorder, the noise callbacks and the attention quant points check :func:`hooks_are_suspended` before they
act; code that needs the network without them (the quantized MSE forward, the clean BN pass, flatness measures,
PTQ) wraps its forward in :func:`hooks_suspended`. The switch is per thread and nests.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["hooks_are_suspended", "hooks_suspended"]

_state = threading.local()


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
