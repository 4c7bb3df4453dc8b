import pickle

import pytest

from flatq_lightning.callbacks.schedules import PiecewiseLinear, Ramp, Warmup, trapezoid


def test_piecewise_linear_values_and_pickle():
    s = PiecewiseLinear([(0, 0.0), (10, 2.0), (20, 2.0), (30, 0.0)])
    assert [s(t) for t in (-5, 0, 5, 10, 15, 25, 30, 99)] == [0.0, 0.0, 1.0, 2.0, 2.0, 1.0, 0.0, 0.0]
    assert pickle.loads(pickle.dumps(s))(5) == 1.0


def test_trapezoid_shape():
    k = trapezoid(100, up=0.2, down=0.3, peak=2.0)
    assert k(0) == 0.0 and k(10) == pytest.approx(1.0) and k(20) == 2.0 and k(70) == 2.0 and k(100) == 0.0
    flat = trapezoid(100, up=0.0, down=0.0)
    assert flat(0) == 1.0 and flat(100) == 1.0


@pytest.mark.parametrize(
    "knots,msg", [([], "at least one"), ([(5, 1.0), (1, 1.0)], "non-decreasing"), ([(0, -1.0)], ">= 0")]
)
def test_piecewise_errors(knots, msg):
    with pytest.raises(ValueError, match=msg):
        PiecewiseLinear(knots)


def test_trapezoid_errors():
    with pytest.raises(ValueError, match="up \\+ down <= 1"):
        trapezoid(100, up=0.7, down=0.5)


def test_warmup_is_a_schedule_with_a_clean_start():
    w = Warmup(Ramp(end=2.0, steps=10), steps=3)
    assert [w(t) for t in (0, 2, 3, 5, 10, 50)] == [0.0, 0.0, 0.6, 1.0, 2.0, 2.0]  # the ramp sees the step itself
    assert w.resolved and w.resolve(1000) is w and pickle.loads(pickle.dumps(w))(5) == 1.0
    assert Warmup(0.5)(0) == 0.5 and repr(Warmup(0.5, steps=3)) == "Warmup(0.5, steps=3)"


def test_warmup_fraction_is_resolved_against_the_fit():
    w = Warmup(0.5, fraction=0.3)
    assert not w.resolved and w.steps == 0 and repr(w) == "Warmup(0.5, fraction=0.3)"
    with pytest.raises(ValueError, match="does not know the fit's length yet"):
        w(0)
    r = w.resolve(101)
    assert r is not w and not w.resolved  # a copy: the fraction stays for the next fit
    assert (r.steps, r.total_steps, r.fraction) == (30, 101, 0.3) and (r(29), r(30)) == (0.0, 0.5)
    assert pickle.loads(pickle.dumps(r)).steps == 30
    with pytest.raises(ValueError, match="warmup_fraction needs a finite run"):
        w.resolve(float("inf"))


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(steps=-1), "Warmup steps must be an int >= 0"),
        (dict(steps=2.5), "Warmup steps must be an int >= 0"),
        (dict(fraction=1.0), r"Warmup fraction must be a float in \[0, 1\)"),
        (dict(steps=3, fraction=0.5), r"give Warmup steps \(3\) or Warmup fraction \(0.5\), not both"),
        (dict(scale=-1.0), "Warmup scale must be a finite float >= 0"),
        (dict(scale=Warmup(1.0, steps=2)), "Warmup scale is itself a warm-up"),
    ],
)
def test_warmup_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Warmup(**kw)


def test_schedules_refuse_non_finite_values():
    from flatq_lightning import Ramp
    from flatq_lightning.callbacks.schedules import PiecewiseLinear

    with pytest.raises(ValueError, match=r"Ramp end must be a finite float >= 0 \(a noise scale\), got nan"):
        Ramp(end=float("nan"))
    with pytest.raises(ValueError, match=r"Ramp start must be a finite float >= 0"):
        Ramp(start=float("inf"))
    with pytest.raises(ValueError, match=r"PiecewiseLinear values must be finite and >= 0"):
        PiecewiseLinear([(0, 0.0), (10, float("nan"))])
