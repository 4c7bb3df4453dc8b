"""Range observers: accumulate ``(lo, hi)`` over batches with one of the spec's observers.

``MinMaxObserver`` keeps the running min/max (or, with ``momentum``, an EMA of the batch min/max as used
during training); ``PercentileObserver`` and ``MSEObserver`` average their per-batch ranges (or take their
EMA with ``momentum``). All produce qparams through :func:`~flatq_lightning.quant.ops.qparams_from_range`, the
one place that turns a range into a grid.

The same classes serve training and PTQ: the :class:`~flatq_lightning.QuantErrorRecorder` keeps one observer
per layer input (the spec's observer, its ``momentum`` as the EMA momentum) and PTQ calibration builds the
same observer (:func:`make_observer`), so the ranges the noise is trained against are the ranges PTQ would
choose from the same batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import observe_range, qparams_from_range
from .spec import QuantSpec

__all__ = ["RangeObserver", "MinMaxObserver", "PercentileObserver", "MSEObserver", "make_observer"]


class RangeObserver:
    """Base class: ``update(x)`` per batch, then ``range()``/``qparams()``. Works without grad, float32."""

    def __init__(self, spec: QuantSpec, momentum: float | None = None) -> None:
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"observer momentum must be in [0, 1) or None, got {momentum}")
        self.spec = spec
        self.momentum = momentum
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Observe one batch: its range under the spec's observer, merged into the running range."""
        lo, hi = self.batch_range(x)
        self.merge(lo, hi)

    @torch.no_grad()
    def batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The range the spec's observer picks for one batch alone (nothing is merged)."""
        return observe_range(x.detach(), self.spec, check=False)

    def merge(self, lo: Tensor, hi: Tensor) -> None:
        """Merge one batch's range (from :meth:`batch_range`, possibly averaged over DDP ranks)."""
        self._merge(lo, hi)
        self.count += 1

    def merged(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """What the running range would be after merging ``(lo, hi)``, without changing the observer."""
        saved = (self.lo, self.hi)
        try:
            self._merge(lo, hi)
            return self.range()
        finally:
            self.lo, self.hi = saved

    def assign(self, lo: Tensor, hi: Tensor) -> None:
        """Set the running range after one more batch (a range :meth:`merged` computed, reduced over ranks)."""
        self.lo, self.hi = lo, hi
        self.count += 1

    def state_dict(self) -> dict[str, object]:
        return {"lo": self.lo, "hi": self.hi, "count": self.count}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.lo, self.hi, self.count = state.get("lo"), state.get("hi"), int(state.get("count", 0))  # type: ignore[assignment,arg-type]

    def _merge(self, lo: Tensor, hi: Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.momentum is not None:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi
        else:  # running mean of the batch ranges
            n = self.count
            self.lo = (self.lo * n + lo) / (n + 1)
            self.hi = (self.hi * n + hi) / (n + 1)

    def range(self) -> tuple[Tensor, Tensor]:
        if self.lo is None or self.hi is None:
            raise RuntimeError("observer has seen no data: call update() with at least one batch")
        return self.lo, self.hi

    def qparams(self) -> tuple[Tensor, Tensor]:
        lo, hi = self.range()
        return qparams_from_range(lo, hi, self.spec)


class MinMaxObserver(RangeObserver):
    """Running min/max over all batches, or an EMA of batch min/max when ``momentum`` is set."""

    def _merge(self, lo: Tensor, hi: Tensor) -> None:
        if self.lo is None or self.momentum is not None:
            super()._merge(lo, hi)
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)


class PercentileObserver(RangeObserver):
    """Mean over batches of the per-batch percentile range."""


class MSEObserver(RangeObserver):
    """Mean over batches of the per-batch MSE-optimal clipped range."""


_OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(spec: QuantSpec, momentum: float | None = None) -> RangeObserver:
    """The observer the spec names (``spec.observer``); ``momentum`` makes it an EMA of the batch ranges.

    Example:
        >>> obs = make_observer(QuantSpec.activation(4), momentum=0.9)
        >>> obs.update(torch.tensor([0.0, 1.0])); obs.update(torch.tensor([0.0, 2.0]))
        >>> round(float(obs.range()[1]), 4)
        1.1
    """
    return _OBSERVERS[spec.observer](spec, momentum)
