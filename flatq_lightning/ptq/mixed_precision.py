"""A mixed-precision plan: per-layer weight bit-widths that minimise the total predicted (or measured) cost
under a weight-size budget, by an exact multiple-choice knapsack.

Each layer ``l`` takes one width ``b`` of the allowed ones; its size is ``numelₗ·b`` bits and its cost
``costₗ(b)`` (for example the predicted loss increase of :mod:`~flatq_lightning.ptq.sensitivity`). The plan
minimises ``Σ costₗ(bₗ)`` subject to ``Σ numelₗ·bₗ ≤ budget``. The solver is exact: it keeps, layer by layer,
the Pareto frontier of (size, cost) over all partial assignments (a dominated partial plan can never become
optimal), which is small at these sizes because many layers share a size. (A width whose estimated cost exceeds a
narrower width's is never chosen: the narrower one is smaller and cheaper.)

Example:
    >>> plan = plan_bits({"a": {2: 5.0, 4: 1.0, 8: 0.0}, "b": {2: 1.0, 4: 0.5, 8: 0.0}}, {"a": 10, "b": 10},
    ...                  budget=3.0)
    >>> plan.bits, plan.bits_per_weight
    ({'a': 4, 'b': 2}, 3.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..quant import QuantTarget
from .runner import ptq_network
from .sensitivity import predict_sensitivity

__all__ = ["MixedPrecisionPlan", "parse_bits_choices", "plan_bits", "plan_mixed_precision"]


def parse_bits_choices(choices: str | Iterable[int]) -> tuple[int, ...]:
    """``"2,3,4,8"`` or ``[2, 3, 4, 8]`` → ``(2, 3, 4, 8)``; widths must be ints in [2, 8]."""
    items = [c for c in choices.split(",") if c.strip()] if isinstance(choices, str) else list(choices)
    out = []
    for c in items:
        try:
            b = int(c)
        except (TypeError, ValueError):
            raise ValueError(f"bits choices must be integers like '2,3,4,8', got {choices!r}") from None
        if isinstance(c, bool) or not 2 <= b <= 8:
            raise ValueError(f"bits choices must be in [2, 8], got {c!r}")
        out.append(b)
    if not out:
        raise ValueError("bits choices are empty: give at least one width, e.g. '2,3,4,8'")
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """Per-layer weight widths, the total size they take and the total cost they are expected to cost."""

    bits: dict[str, int]
    sizes: dict[str, int]
    cost: float
    #: the budget the plan was made under, in average bits per weight
    budget: float
    choices: tuple[int, ...] = ()
    source: str = "predicted"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bits(self) -> int:
        return sum(self.sizes[n] * b for n, b in self.bits.items())

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / sum(self.sizes.values())

    @property
    def size_bytes(self) -> float:
        return self.total_bits / 8

    def histogram(self) -> dict[int, int]:
        """``{width: number of weights at that width}``."""
        out: dict[int, int] = {}
        for n, b in self.bits.items():
            out[b] = out.get(b, 0) + self.sizes[n]
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "sizes": self.sizes, "cost": self.cost, "budget": self.budget,
                "bits_per_weight": self.bits_per_weight, "size_bytes": self.size_bytes,
                "choices": list(self.choices), "source": self.source, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MixedPrecisionPlan:
        return cls(bits={k: int(v) for k, v in d["bits"].items()}, sizes={k: int(v) for k, v in d["sizes"].items()},
                   cost=float(d["cost"]), budget=float(d["budget"]), choices=tuple(d.get("choices", ())),
                   source=str(d.get("source", "predicted")), meta=dict(d.get("meta", {})))

    def layer_bits(self) -> dict[str, tuple[int, None]]:
        """The plan as :attr:`QuantTarget.layer_bits <flatq_lightning.quant.QuantTarget>` (weights only)."""
        return {n: (b, None) for n, b in self.bits.items()}

    def table(self) -> str:
        lines = ["| layer | weights | bits |", "|---|---:|---:|"]
        lines += [f"| {n} | {self.sizes[n]} | {b} |" for n, b in self.bits.items()]
        lines.append(f"\n{self.bits_per_weight:.3f} bits per weight on average ({self.size_bytes / 1024:.1f} KiB of "
                     f"weights; budget {self.budget:g}), {self.source} cost {self.cost:.4g}")
        return "\n".join(lines)


def plan_bits(
    costs: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int],
    budget: float,
    choices: Iterable[int] | None = None,
    source: str = "predicted",
    fixed: Mapping[str, int] | None = None,
) -> MixedPrecisionPlan:
    """The exact minimum-cost plan with at most ``budget`` bits per weight on average (see the module docstring).

    ``costs``: ``{layer: {bits: cost}}`` for every allowed width (``choices``, default: the widths every layer
    has). ``sizes``: ``{layer: weight count}``. ``fixed``: ``{layer: bits}`` kept at that width (PTQ's first/last
    layers at 8 bits, say): they count in the budget and the plan, and are not chosen. A budget below the smallest
    width or above the largest one is an error (nothing fits, or there is nothing to choose: use the uniform
    width), as is one the fixed layers leave no room in.
    """
    if not costs:
        raise ValueError("plan_bits: no layers to plan")
    missing = sorted(set(costs) ^ set(sizes))
    if missing:
        raise ValueError(f"plan_bits: costs and sizes name different layers: {missing}")
    common = set.intersection(*(set(c) for c in costs.values()))
    ch = tuple(sorted(common)) if choices is None else parse_bits_choices(choices)
    lacking = sorted(n for n, c in costs.items() if not set(ch) <= set(c))
    if lacking:
        raise ValueError(f"plan_bits: layers {lacking} lack a cost for some of the widths {list(ch)}")
    if not ch:
        raise ValueError("plan_bits: the layers share no width to choose from")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not np.isfinite(budget):
        raise ValueError(f"budget must be a number of bits per weight, got {budget!r}")
    if budget < ch[0]:
        raise ValueError(f"budget {budget:g} bits per weight is below the smallest allowed width {ch[0]}: "
                         "no plan fits")
    if budget > ch[-1]:
        raise ValueError(f"budget {budget:g} bits per weight is above the largest allowed width {ch[-1]}: "
                         "there is nothing to choose (quantize every layer at that width)")
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(costs))
    if unknown:
        raise ValueError(f"plan_bits: fixed layers {unknown} are not among the planned layers")
    total_weights = sum(int(sizes[n]) for n in costs)
    names = [n for n in costs if n not in fixed]
    cap = int(np.floor(budget * total_weights + 1e-9)) - sum(int(sizes[n]) * int(b) for n, b in fixed.items())
    if cap < sum(int(sizes[n]) for n in names) * ch[0]:
        raise ValueError(f"budget {budget:g} bits per weight leaves no room for the other layers at {ch[0]} bits "
                         f"once the fixed layers {fixed} are counted")
    # Pareto frontier of partial plans: sizes ascending, costs strictly descending
    f_size, f_cost = np.zeros(1, dtype=np.int64), np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []  # per layer: (index into the previous frontier, choice)
    # the bits the layers after each one take at the smallest width: a partial plan leaving them no room is dropped
    rest = np.cumsum([0] + [int(sizes[n]) * ch[0] for n in reversed(names)])[::-1][1:]
    for n, room in zip(names, rest):
        c = [float(costs[n][b]) for b in ch]
        sz = np.concatenate([f_size + int(sizes[n]) * b for b in ch])
        co = np.concatenate([f_cost + c[i] for i in range(len(ch))])
        prev = np.tile(np.arange(len(f_size)), len(ch))
        pick = np.repeat(np.arange(len(ch)), len(f_size))
        ok = sz <= cap - int(room)
        sz, co, prev, pick = sz[ok], co[ok], prev[ok], pick[ok]
        order = np.lexsort((co, sz))
        sz, co, prev, pick = sz[order], co[order], prev[order], pick[order]
        run_min = np.minimum.accumulate(co)
        keep = np.ones(len(co), dtype=bool)
        keep[1:] = co[1:] < run_min[:-1]
        f_size, f_cost = sz[keep], co[keep]
        back.append((prev[keep], pick[keep]))
    best = int(np.argmin(f_cost))  # the cheapest plan that fits (frontier costs descend: the largest size)
    bits: dict[str, int] = {}
    i = best
    for n, (prev, pick) in zip(reversed(names), reversed(back)):
        bits[n] = ch[int(pick[i])]
        i = int(prev[i])
    bits.update({n: int(b) for n, b in fixed.items()})
    bits = {n: bits[n] for n in costs}
    fixed_cost = sum(float(costs[n].get(b, 0.0)) for n, b in fixed.items())
    plan = MixedPrecisionPlan(bits=bits, sizes={n: int(sizes[n]) for n in costs}, cost=float(f_cost[best]) + fixed_cost,
                              budget=float(budget), choices=ch, source=source)
    return plan



def plan_mixed_precision(
    model: nn.Module,
    predict_batches: Iterable[Any],
    budget: float,
    choices: str | Iterable[int] = (2, 3, 4, 8),
    recipe: Any = "practical",
    target: QuantTarget | None = None,
    probes: int = 2,
    hessian_batches: int | None = 2,
    seed: int = 0,
    error_stats: Mapping[str, Any] | None = None,
) -> MixedPrecisionPlan:
    """The plan for ``model`` (a network or a LightningModule with a ``model``) at ``budget`` bits per weight:
    the predicted per-layer costs (:func:`~flatq_lightning.ptq.sensitivity.predict_sensitivity` on the labelled
    held-out ``predict_batches``) at every width of ``choices``, then :func:`plan_bits`. With
    ``target.keep_first_last_8bit`` (the default) the first and last layer stay at 8 bits, as in PTQ's uniform
    rows, and count in the budget. The plan's layer names are the network's (``ptq_network``)."""
    ch = parse_bits_choices(choices)
    scope = target if target is not None else QuantTarget()
    net = ptq_network(model)
    pred = predict_sensitivity(net, predict_batches, ch, (), recipe, scope, probes=probes,
                               hessian_batches=hessian_batches, seed=seed, error_stats=error_stats)
    costs: dict[str, dict[int, float]] = {}
    for (name, _, b), (value, _) in pred.items():
        costs.setdefault(name, {})[b] = value
    sizes = {n: int(net.get_submodule(n).weight.numel()) for n in costs}
    names = list(costs)
    fixed = {names[0]: 8, names[-1]: 8} if scope.keep_first_last_8bit and len(names) > 1 else {}
    return plan_bits(costs, sizes, budget, ch, fixed=fixed)
