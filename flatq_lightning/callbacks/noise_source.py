"""What both noise callbacks draw and when: regenerable standard noise, the warm-up and the noise scale κ_t."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ._common import splitmix64

__all__ = [
    "NOISE_SOURCES",
    "POOL_MIN_NUMEL",
    "NoiseSource",
    "check_warmup",
    "kappa_value",
    "resolve_warmup",
    "schedule_settings",
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


def check_warmup(warmup_steps: int, warmup_fraction: float) -> None:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if isinstance(warmup_fraction, bool) or not isinstance(warmup_fraction, (int, float)) or not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be a float in [0, 1), got {warmup_fraction!r}")
    if warmup_steps and warmup_fraction:
        raise ValueError(f"give warmup_steps ({warmup_steps}) or warmup_fraction ({warmup_fraction}), not both")


def resolve_warmup(warmup_steps: int, warmup_fraction: float, trainer: pl.Trainer) -> int:
    """The noise-free steps: ``warmup_steps``, or ``warmup_fraction`` of the fit's optimizer steps."""
    if not warmup_fraction:
        return warmup_steps
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("warmup_fraction needs a finite run (max_epochs or max_steps); give warmup_steps instead")
    return int(warmup_fraction * total)


def kappa_value(noise_scale: float | Callable[[int], float], warmup_steps: int, step: int) -> float:
    if step < warmup_steps:
        return 0.0
    k = noise_scale(step) if callable(noise_scale) else noise_scale
    k = float(k)
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"noise_scale must be finite and >= 0, the schedule {noise_scale!r} returned {k} at step {step}")
    return k


def schedule_settings(prefix: str, cb: Any) -> dict[str, object]:
    """When a noise callback's noise is on and how strong, as ``<prefix>/...`` hyperparameters."""
    from ..utils.logging import describe

    return {
        f"{prefix}/noise_scale": describe(cb.noise_scale),
        f"{prefix}/warmup_steps": cb.warmup_steps,
        f"{prefix}/warmup_fraction": cb.warmup_fraction,
        f"{prefix}/seed": cb.seed,
    }
