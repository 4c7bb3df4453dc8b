"""What both noise callbacks draw and when: regenerable standard noise and the noise scale κ_t (with its
warm-up)."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..utils.checks import check_scale_value
from ..utils.logging import describe
from ._common import splitmix64
from .schedules import Warmup, check_warmup

__all__ = [
    "NOISE_SOURCES",
    "POOL_MIN_NUMEL",
    "NoiseSource",
    "ScheduledNoise",
    "kappa_value",
    "resolve_schedule",
    "schedule_settings",
    "warmup_of",
    "with_deprecated_warmup",
]

NOISE_SOURCES = ("auto", "generator", "pool")
#: below this many noisy elements the exact generator is cheap enough everywhere
POOL_MIN_NUMEL = 1 << 21


class NoiseSource:
    """Standard noise ε (N(0, 1) or U(-½, ½)) that can be regenerated exactly from a key.

    ``generator``: fresh values from a torch generator seeded by ``(seed, *key)``: exact i.i.d. noise.
    ``pool``: a random window (offset drawn from the key on the host) into a fixed pool of i.i.d. values,
    so regenerating noise costs no random-number generation at all; the pool is a few percent of the
    noisy tensors' size. Large rows are served in chunks, each with its own offset.
    """

    def __init__(self, kind: str, dist: str, seed: int, pool_numel: int = 0) -> None:
        if kind not in ("generator", "pool"):
            raise ValueError(f"noise source must be 'generator' or 'pool', got {kind!r}")
        if dist not in ("normal", "uniform"):
            raise ValueError(f"noise distribution must be 'normal' or 'uniform', got {dist!r}")
        self.kind, self.dist, self.seed = kind, dist, int(seed)
        self.pool_numel = int(pool_numel)
        self._pools: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def _fill(self, t: Tensor, g: torch.Generator) -> Tensor:
        if self.dist == "normal":
            return t.normal_(generator=g)
        return t.uniform_(-0.5, 0.5, generator=g)

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    def memory_bytes(self) -> int:
        """Bytes held by the pre-drawn pools (0 for the exact generator)."""
        return sum(t.numel() * t.element_size() for t in self._pools.values())

    def pool(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        if key not in self._pools:
            g = self._generator(device, splitmix64(self.seed, 0x5EED))
            self._pools[key] = self._fill(torch.empty(self.pool_numel, device=device, dtype=dtype), g)
        return self._pools[key]

    def chunks(self, key: tuple[int, ...], rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(r0, r1, eps)`` covering a (rows, cols) tensor with ε of shape (r1 - r0, cols)."""
        if self.kind == "generator":
            g = self._generator(device, splitmix64(self.seed, *key))
            yield 0, rows, self._fill(torch.empty(rows, cols, device=device, dtype=dtype), g)
            return
        pool = self.pool(device, dtype)
        window = self.pool_numel // 2
        rng = random.Random(splitmix64(self.seed, *key))
        if cols > window:  # a single row larger than a window: concatenate windows (rare, transient)
            for r in range(rows):
                parts, left = [], cols
                while left > 0:
                    n = min(left, window)
                    o = rng.randrange(self.pool_numel - n + 1)
                    parts.append(pool[o : o + n])
                    left -= n
                yield r, r + 1, torch.cat(parts).view(1, cols)
            return
        per = max(1, window // cols)
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            n = (r1 - r0) * cols
            o = rng.randrange(self.pool_numel - n + 1)
            yield r0, r1, pool[o : o + n].view(r1 - r0, cols)

    def full(self, key: tuple[int, ...], shape: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
        """ε of any shape: a view into the pool where one window holds it, otherwise a new tensor."""
        n = int(torch.Size(shape).numel())
        if self.kind == "generator":
            g = self._generator(device, splitmix64(self.seed, *key))
            return self._fill(torch.empty(shape, device=device, dtype=dtype), g)
        window = self.pool_numel // 2
        rows = -(-n // window)  # ceil: one window per row of a (rows, window) cover of the flat tensor
        parts = [e.reshape(-1) for _, _, e in self.chunks(key, rows, window, device, dtype)]
        flat = parts[0][:n] if len(parts) == 1 else torch.cat(parts)[:n]
        return flat.view(shape)


def resolve_schedule(
    noise_scale: float | Callable[[int], float], trainer: pl.Trainer
) -> float | Callable[[int], float]:
    """The noise scale for this fit: a :class:`~.schedules.Warmup` of a fraction resolved against the fit's
    optimizer steps (``trainer.estimated_stepping_batches``), anything else as it is."""
    if isinstance(noise_scale, Warmup) and not noise_scale.resolved:
        return noise_scale.resolve(trainer.estimated_stepping_batches)
    return noise_scale


def kappa_value(noise_scale: float | Callable[[int], float], step: int) -> float:
    """κ at ``step``: the float, or the schedule's value (checked: finite and >= 0)."""
    k = noise_scale(step) if callable(noise_scale) else noise_scale
    k = float(k)
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"noise_scale must be finite and >= 0, the schedule {noise_scale!r} returned {k} at step {step}")
    return k


class ScheduledNoise:
    """κ of a noise callback: :attr:`noise_scale` as given (a float or a schedule of the step, a
    :class:`~.schedules.Warmup` included) and, for the current fit, with a warm-up's fraction resolved
    (:meth:`resolve_schedule` at fit start)."""

    @property
    def noise_scale(self) -> float | Callable[[int], float]:
        """κ as given: a float or a schedule of the optimizer step, a ``Warmup`` included."""
        return self._noise_scale

    @noise_scale.setter
    def noise_scale(self, value: float | Callable[[int], float]) -> None:
        check_scale_value("noise_scale", value)
        self._noise_scale = self._schedule = value

    @property
    def warmup_steps(self) -> int:
        """The noise-free optimizer steps at the start of the fit (a fraction's: 0 until fit start resolves it)."""
        w = warmup_of(self._schedule)
        return w.steps if w is not None else 0

    @property
    def warmup_fraction(self) -> float:
        """The warm-up as a fraction of the fit's steps (0.0: none, or one given in steps)."""
        w = warmup_of(self._noise_scale)
        return w.fraction if w is not None else 0.0

    def resolve_schedule(self, trainer: pl.Trainer) -> None:
        """Resolve the warm-up's fraction against this fit's optimizer steps."""
        self._schedule = resolve_schedule(self._noise_scale, trainer)

    def kappa(self, step: int) -> float:
        """The noise scale κ at optimizer ``step`` (0 during the warm-up); override to change it."""
        return kappa_value(self._schedule, step)


def warmup_of(noise_scale: object) -> Warmup | None:
    """The schedule's warm-up (``None``: it has none)."""
    return noise_scale if isinstance(noise_scale, Warmup) else None


def with_deprecated_warmup(
    owner: str, noise_scale: float | Callable[[int], float], warmup_steps: int | None, warmup_fraction: float | None
) -> float | Callable[[int], float]:
    """``noise_scale`` with the warm-up given the old way (``warmup_steps=``/``warmup_fraction=`` of a noise
    callback: a ``FutureWarning``), as a :class:`~.schedules.Warmup`."""
    if warmup_steps is None and warmup_fraction is None:
        return noise_scale
    steps, fraction = 0 if warmup_steps is None else warmup_steps, 0.0 if warmup_fraction is None else warmup_fraction
    check_warmup(steps, fraction)
    given = f"fraction={fraction}" if fraction else f"steps={steps}"
    warnings.warn(
        f"{owner}(warmup_steps=..., warmup_fraction=...) is deprecated: the warm-up is part of the noise schedule, "
        f"noise_scale=Warmup(noise_scale, {given}) (flatq_lightning.Warmup; DNQ keeps its warmup_steps and "
        "warmup_fraction)",
        FutureWarning,
        stacklevel=3,
    )
    if not steps and not fraction:
        return noise_scale
    if isinstance(noise_scale, Warmup):
        raise ValueError(
            f"{owner}: the warm-up is given twice (warmup_steps/warmup_fraction and noise_scale={noise_scale!r})"
        )
    return Warmup(noise_scale, steps=steps, fraction=fraction)


def schedule_settings(prefix: str, cb: Any) -> dict[str, object]:
    """When a noise callback's noise is on and how strong, as ``<prefix>/...`` hyperparameters: the scale without
    its warm-up, the warm-up's steps (resolved) and fraction, the seed."""

    w = warmup_of(cb.noise_scale)
    return {
        f"{prefix}/noise_scale": describe(cb.noise_scale if w is None else w.scale),
        f"{prefix}/warmup_steps": cb.warmup_steps,
        f"{prefix}/warmup_fraction": cb.warmup_fraction,
        f"{prefix}/seed": cb.seed,
    }
