"""Bad arguments of the DNQ callbacks and schedules raise a named error (its type, and a message naming the
parameter). The rest of this file's cases moved beside the modules they test (tests/quant, tests/ptq, tests/app);
these three follow once the callbacks' own test files settle."""

from __future__ import annotations

import pytest

from flatq_lightning import QuantErrorRecorder, QuantTarget, dnq_callbacks


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        ({"seed": "abc"}, TypeError, r"seed must be an int, got 'abc'"),
        ({"seed": 1.5}, TypeError, r"seed must be an int, got 1\.5"),
        ({"momentum": "abc"}, ValueError, r"momentum must be in \[0, 1\) \(a float\), got 'abc'"),
        ({"momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\)"),
        ({"target": QuantTarget.preset("w4a16")}, ValueError, r"'w4a16': DNQ trains against a quantizer on both sides"),
        ({"target": 4}, ValueError, r"target must be a QuantTarget or a preset string like 'w4a4', got 4"),
        ({"noise_scale": float("nan")}, ValueError, r"noise_scale must be a finite float >= 0"),
        ({"act_noise_scale": float("inf")}, ValueError, r"noise_scale must be a finite float >= 0"),
    ],
)
def test_dnq_callbacks_name_the_bad_argument(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        dnq_callbacks(**{"target": "w4a4", **kwargs})


def test_recorder_flags_must_be_bools():
    for flag in ("record_activations", "log_sqnr", "check_finite"):
        with pytest.raises(TypeError, match=rf"{flag} must be True or False, got 'no'"):
            QuantErrorRecorder("w4a4", **{flag: "no"})


def test_schedules_refuse_non_finite_values():
    from flatq_lightning import Ramp
    from flatq_lightning.callbacks.schedules import PiecewiseLinear

    with pytest.raises(ValueError, match=r"Ramp end must be a finite float >= 0 \(a noise scale\), got nan"):
        Ramp(end=float("nan"))
    with pytest.raises(ValueError, match=r"Ramp start must be a finite float >= 0"):
        Ramp(start=float("inf"))
    with pytest.raises(ValueError, match=r"PiecewiseLinear values must be finite and >= 0"):
        PiecewiseLinear([(0, 0.0), (10, float("nan"))])
