"""Mixed-precision plans (flatq_lightning/ptq/mixed_precision.py): the exact knapsack against a hand-checked
case and brute force, the budget respected exactly, a uniform plan equal to uniform PTQ bit for bit, bad
budgets and choices."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from flatq_lightning.ptq.mixed_precision import MixedPrecisionPlan, parse_bits_choices, plan_bits
from flatq_lightning.quant import QuantSpec, QuantTarget, quantize_model


def test_hand_checked_case():
    # sizes 100, 100, 200 (400 weights); budget 4 bits/weight = 1600 bits.
    # all at 4: 1600 bits, cost 1+1+1 = 3. Best: "big" at 2 (400), "a" at 8 (800), "b" at 4 (400) = 1600 bits,
    # cost 0 + 1 + 1.5 = 2.5; any plan giving "big" 3 or more bits leaves too few for "a" at 8.
    costs = {"a": {2: 9.0, 3: 6.0, 4: 1.0, 8: 0.0},
             "b": {2: 9.0, 3: 4.0, 4: 1.0, 8: 0.0},
             "big": {2: 1.5, 3: 1.2, 4: 1.0, 8: 0.0}}
    sizes = {"a": 100, "b": 100, "big": 200}
    plan = plan_bits(costs, sizes, 4.0)
    assert plan.bits == {"a": 8, "b": 4, "big": 2}
    assert plan.cost == pytest.approx(2.5) and plan.total_bits == 1600 and plan.bits_per_weight == 4.0
    assert plan.histogram() == {2: 200, 4: 100, 8: 100}
    assert MixedPrecisionPlan.from_dict(plan.to_dict()) == plan
    assert "| big | 200 | 2 |" in plan.table()


def test_exact_against_brute_force_and_budget_respected():
    rng = random.Random(0)
    choices = (2, 3, 4, 8)
    for _ in range(150):
        sizes = {f"l{i}": rng.choice([3, 5, 8, 13, 40]) for i in range(rng.randint(1, 6))}
        costs = {n: {b: rng.random() * (9 - b) for b in choices} for n in sizes}
        budget = rng.uniform(2, 8)
        plan = plan_bits(costs, sizes, budget)
        cap = budget * sum(sizes.values())
        assert plan.total_bits <= cap + 1e-9
        best = min(sum(costs[n][b] for n, b in zip(sizes, combo))
                   for combo in itertools.product(choices, repeat=len(sizes))
                   if sum(sizes[n] * b for n, b in zip(sizes, combo)) <= cap + 1e-9)
        assert plan.cost == pytest.approx(best)


def test_uniform_plan_equals_uniform_ptq_bit_for_bit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    calib = [torch.randn(8, 3, 8, 8)]
    names = ["0", "3", "6"]
    sizes = {n: net.get_submodule(n).weight.numel() for n in names}
    plan = plan_bits({n: {3: 1.0} for n in names}, sizes, 3.0, choices=(3,))
    assert set(plan.bits.values()) == {3}
    uniform = QuantTarget(QuantSpec.weight(3), QuantSpec.activation(4), keep_first_last_8bit=False)
    planned = uniform.with_layer_bits({n: (b, None) for n, b in plan.bits.items()})
    a = quantize_model(net, uniform, calib, fold_bn=True)
    b = quantize_model(net, planned, calib, fold_bn=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(("budget", "match"), [
    (1.5, "below the smallest allowed width 2"),
    (9.0, "above the largest allowed width 8"),
    (float("nan"), "number of bits per weight"),
    (True, "number of bits per weight"),
    ("3", "number of bits per weight"),
])
def test_bad_budgets_fail_clearly(budget, match):
    with pytest.raises(ValueError, match=match):
        plan_bits({"a": {2: 1.0, 8: 0.0}}, {"a": 10}, budget)


def test_bad_choices_and_costs():
    assert parse_bits_choices("8,2, 4,3") == (2, 3, 4, 8) and parse_bits_choices([4, 4]) == (4,)
    for bad, match in (("2,x", "integers"), ("1,4", r"\[2, 8\]"), ("", "empty"), ([16], r"\[2, 8\]")):
        with pytest.raises(ValueError, match=match):
            parse_bits_choices(bad)
    with pytest.raises(ValueError, match="lack a cost"):
        plan_bits({"a": {2: 1.0}}, {"a": 10}, 2.0, choices=(2, 4))
    with pytest.raises(ValueError, match="different layers"):
        plan_bits({"a": {2: 1.0}}, {"b": 10}, 2.0)
    with pytest.raises(ValueError, match="no layers"):
        plan_bits({}, {}, 2.0)


def test_fixed_layers_count_in_the_budget_and_keep_their_width():
    costs = {n: {2: c, 4: c / 4, 8: 0.0} for n, c in (("first", 100.0), ("a", 2.0), ("b", 1.0), ("last", 100.0))}
    sizes = {"first": 10, "a": 100, "b": 100, "last": 10}
    plan = plan_bits(costs, sizes, 3.5, fixed={"first": 8, "last": 8})
    # 770 bits: first and last take 160, so a and b share 610: one at 4 and one at 2, a (the costlier) at 4
    assert plan.bits == {"first": 8, "a": 4, "b": 2, "last": 8} and plan.total_bits == 760
    assert plan.cost == pytest.approx(0.5 + 1.0)
    with pytest.raises(ValueError, match="no room"):
        plan_bits(costs, sizes, 2.1, fixed={"first": 8, "last": 8})
    with pytest.raises(ValueError, match="not among the planned layers"):
        plan_bits(costs, sizes, 3.0, fixed={"nope": 8})
