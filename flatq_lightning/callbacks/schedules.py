"""Picklable noise-strength schedules (callables of the optimizer step) for the DNQ callbacks."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["PiecewiseLinear", "Ramp", "trapezoid"]


class PiecewiseLinear:
    """Linear interpolation through ``(step, value)`` knots, constant beyond the ends.

    Example:
        >>> s = PiecewiseLinear([(0, 0.0), (100, 1.0), (900, 1.0), (1000, 0.0)])
        >>> s(0), s(50), s(500), s(950), s(5000)
        (0.0, 0.5, 1.0, 0.5, 0.0)
    """

    def __init__(self, knots: Sequence[tuple[int, float]]) -> None:
        pts = [(int(s), float(v)) for s, v in knots]
        if not pts:
            raise ValueError("PiecewiseLinear needs at least one (step, value) knot")
        if any(b[0] < a[0] for a, b in zip(pts, pts[1:])):
            raise ValueError(f"PiecewiseLinear knots must have non-decreasing steps, got {pts}")
        if any(not math.isfinite(v) or v < 0 for _, v in pts):
            raise ValueError(f"PiecewiseLinear values must be finite and >= 0 (noise scales), got {pts}")
        self.knots = pts

    def __call__(self, step: int) -> float:
        pts = self.knots
        if step <= pts[0][0]:
            return pts[0][1]
        for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
            if step <= s1:
                return v1 if s1 == s0 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
        return pts[-1][1]

    def __repr__(self) -> str:
        return f"PiecewiseLinear({self.knots})"


def trapezoid(total_steps: int, up: float = 0.2, down: float = 0.2, peak: float = 1.0) -> PiecewiseLinear:
    """Ramp from 0 to ``peak`` over the first ``up`` fraction of training, hold, and cool down to 0 over the
    last ``down`` fraction (the clean weights settle while the learning rate is small).

    Example:
        >>> kappa = trapezoid(1000, up=0.1, down=0.2)
        >>> kappa(50), kappa(500), kappa(900), kappa(1000)
        (0.5, 1.0, 0.5, 0.0)
    """
    if total_steps < 1 or not (0 <= up <= 1 and 0 <= down <= 1 and up + down <= 1):
        raise ValueError(f"trapezoid needs total_steps >= 1 and fractions up + down <= 1, got {total_steps}, {up}, {down}")
    a, b = int(round(up * total_steps)), int(round((1 - down) * total_steps))
    return PiecewiseLinear([(0, 0.0 if up > 0 else peak), (a, peak), (b, peak), (total_steps, 0.0 if down > 0 else peak)])


class Ramp:
    """A picklable schedule: ``start`` → ``end`` linearly over ``steps`` optimizer steps, then ``end``.

    Example:
        >>> kappa = Ramp(end=1.0, steps=100)
        >>> kappa(0), kappa(50), kappa(500)
        (0.0, 0.5, 1.0)
    """

    def __init__(self, end: float = 1.0, steps: int = 1000, start: float = 0.0) -> None:
        if steps < 1:
            raise ValueError(f"Ramp steps must be >= 1, got {steps}")
        for name, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Ramp {name} must be a finite float >= 0 (a noise scale), got {v!r}")
        self.start, self.end, self.steps = float(start), float(end), int(steps)

    def __call__(self, step: int) -> float:
        f = min(max(step / self.steps, 0.0), 1.0)
        return self.start + (self.end - self.start) * f

    def __repr__(self) -> str:
        return f"Ramp(start={self.start}, end={self.end}, steps={self.steps})"
