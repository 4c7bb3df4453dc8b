import pickle

import pytest

from flatq_lightning.callbacks.schedules import PiecewiseLinear, trapezoid


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
