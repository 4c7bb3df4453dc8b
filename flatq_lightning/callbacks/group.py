"""A callback made of callbacks: every Lightning hook goes to each part, in order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from lightning.pytorch.callbacks import Callback

__all__ = ["CallbackGroup", "flatten_callbacks"]

#: the Lightning hooks a group hands on (everything of ``Callback`` but its state, handled below)
_HOOKS = tuple(
    name for name in vars(Callback) if (name.startswith("on_") or name in ("setup", "teardown"))
)


class CallbackGroup(Callback):
    """One callback that runs its ``parts`` (callbacks) as if each were in the Trainer's list, in order.

    The Trainer sees one callback, with one ``state_key``; its state holds each part's state under
    :meth:`part_names` (``part0``, ``part1``, … unless a subclass names them). A checkpoint written with the parts
    as separate callbacks restores into the group (their own state keys are read when the group's is absent).
    """

    def __init__(self, parts: Sequence[Callback]) -> None:
        if not parts or not all(isinstance(p, Callback) for p in parts):
            raise ValueError(f"a CallbackGroup needs one or more Callback parts, got {parts!r}")
        self._parts: tuple[Callback, ...] = tuple(parts)
        # per hook, the parts that implement it (Callback's own hooks do nothing: no call for them)
        self._implementing: dict[str, tuple[Callback, ...]] = {
            name: tuple(p for p in self._parts if getattr(type(p), name) is not getattr(Callback, name))
            for name in _HOOKS
        }

    @property
    def parts(self) -> tuple[Callback, ...]:
        return self._parts

    def part_names(self) -> list[str]:
        """The keys of the parts' states in :meth:`state_dict` (override for readable names)."""
        return [f"part{i}" for i in range(len(self._parts))]

    def state_dict(self) -> dict[str, Any]:
        return {k: p.state_dict() for k, p in zip(self.part_names(), self._parts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k, p in zip(self.part_names(), self._parts):
            if k in state_dict:
                p.load_state_dict(state_dict[k])

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        for p in self._parts:
            p.on_load_checkpoint(trainer, pl_module, checkpoint)
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:  # written by the parts as separate callbacks
            for p in self._parts:
                if p.state_key in states:
                    p.load_state_dict(states[p.state_key])


def _forward(name: str) -> Any:
    def hook(self: CallbackGroup, *args: Any, **kwargs: Any) -> None:
        for part in self._implementing[name]:
            getattr(part, name)(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"``{name}`` of every part, in order."
    return hook


for _name in _HOOKS:
    if _name not in vars(CallbackGroup):
        setattr(CallbackGroup, _name, _forward(_name))


def flatten_callbacks(callbacks: Sequence[Callback]) -> Iterator[Callback]:
    """Every callback of a list, a group's parts in place of the group (recursively)."""
    for c in callbacks:
        if isinstance(c, CallbackGroup):
            yield from flatten_callbacks(c.parts)
        else:
            yield c
