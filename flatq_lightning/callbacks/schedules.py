"""Picklable noise-strength schedules (callables of the optimizer step) for the DNQ callbacks, and the warm-up
(:class:`Warmup`: no noise for the first steps of the fit, then another schedule)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

from ..utils.checks import check_scale_value

__all__ = ["PiecewiseLinear", "Ramp", "Warmup", "check_warmup", "trapezoid"]


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


def check_warmup(steps: object, fraction: object, names: tuple[str, str] = ("warmup_steps", "warmup_fraction")) -> None:
    """A warm-up of ``steps`` optimizer steps or a ``fraction`` of the fit (at most one of them non-zero), or
    ``ValueError`` naming the argument (``names``: how the caller calls them)."""
    s_name, f_name = names
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{s_name} must be an int >= 0, got {steps!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"{f_name} must be a float in [0, 1), got {fraction!r}")
    if steps and fraction:
        raise ValueError(f"give {s_name} ({steps}) or {f_name} ({fraction}), not both")


class Warmup:
    """The warm-up of a noise schedule: no noise (κ = 0) for the first ``steps`` optimizer steps, or the first
    ``fraction`` of the fit's steps, then ``scale`` (a float, or a schedule called with the step itself: the
    warm-up does not shift it). Clean training first.

    A fraction needs the fit's length: the noise callbacks resolve it at fit start from
    ``trainer.estimated_stepping_batches`` (``int(fraction * total)`` steps; a run without ``max_epochs`` or
    ``max_steps`` cannot, and fails there); :meth:`resolve` does it by hand. An unresolved fraction refuses to
    give a value.

    Example:
        >>> kappa = Warmup(0.5, steps=100)
        >>> kappa(99), kappa(100)
        (0.0, 0.5)
        >>> half = Warmup(Ramp(end=2.0, steps=1000), fraction=0.5).resolve(1000)
        >>> half.steps, half(499), half(500)
        (500, 0.0, 1.0)
    """

    def __init__(self, scale: float | Callable[[int], float] = 1.0, steps: int = 0, fraction: float = 0.0) -> None:
        if isinstance(scale, Warmup):
            raise ValueError(f"Warmup scale is itself a warm-up ({scale!r}): give one, with its steps or fraction")
        check_scale_value("Warmup scale", scale)
        check_warmup(steps, fraction, ("Warmup steps", "Warmup fraction"))
        self.scale = scale
        #: the noise-free steps (for a fraction: 0 until :meth:`resolve` sets them)
        self.steps = int(steps)
        self.fraction = float(fraction)
        #: the fit's optimizer steps a fraction was resolved against (``None``: not resolved, or no fraction)
        self.total_steps: int | None = None

    @property
    def resolved(self) -> bool:
        """Whether the warm-up's length is known (always, for a number of steps)."""
        return not self.fraction or self.total_steps is not None

    def resolve(self, total_steps: float) -> Warmup:
        """This warm-up for a fit of ``total_steps`` optimizer steps: a fraction becomes ``int(fraction *
        total_steps)`` steps (a copy; ``self`` is unchanged). A warm-up of a number of steps is returned as is."""
        if not self.fraction:
            return self
        if not math.isfinite(total_steps):
            raise ValueError("warmup_fraction needs a finite run (max_epochs or max_steps); give warmup_steps instead")
        out = copy.copy(self)
        out.steps, out.total_steps = int(self.fraction * total_steps), int(total_steps)
        return out

    def __call__(self, step: int) -> float:
        if not self.resolved:
            raise ValueError(
                f"{self!r} does not know the fit's length yet: the noise callbacks resolve it at fit start, "
                "or call .resolve(total_steps)"
            )
        if step < self.steps:
            return 0.0
        return self.scale(step) if callable(self.scale) else self.scale

    def __repr__(self) -> str:
        when = f"fraction={self.fraction}" if self.fraction else f"steps={self.steps}"
        return f"Warmup({self.scale!r}, {when})"
