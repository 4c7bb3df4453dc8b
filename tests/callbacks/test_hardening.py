"""Issue 13: shared parameters, weight averaging, non-finite runs, re-used callbacks, resume, sharded strategies."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import seed_everything

from flatq_lightning import DifferentialNoiseInjection, QuantErrorRecorder, Ramp, dnq_callbacks
from tests.callbacks.lm import TinyLM, loaders, trainer


class _DivergingLM(TinyLM):
    """The loss turns NaN from ``nan_at`` on (a diverged run)."""

    def __init__(self, nan_at: int = 3, **kw) -> None:
        super().__init__(**kw)
        self.nan_at = nan_at
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.steps_run += 1
        return loss * float("nan") if self.global_step >= self.nan_at else loss


# -- item 4: non-finite values -----------------------------------------------------------------------------


@pytest.mark.parametrize("weight_noise", [True, False])
def test_a_nan_loss_stops_the_fit_at_the_next_refresh_naming_step_and_layer(weight_noise):
    seed_everything(0)
    model = _DivergingLM(nan_at=3)
    train, val = loaders()
    cbs = dnq_callbacks("w4a4", stats_every=2, weight_noise=weight_noise)
    t = trainer(max_epochs=3, callbacks=cbs)
    with pytest.raises(FloatingPointError, match=r"non-finite (weight|activation) statistics at step 4 in layer 'model\.(conv\d|fc)'"):
        t.fit(model, train, val)
    assert model.steps_run in (4, 5)  # stopped at the step-4 refresh, not after 3 epochs x 8 steps
    assert all(not m._forward_pre_hooks for m in model.modules())  # hooks removed on the way out


def test_finite_check_costs_one_sync_per_refresh_and_can_be_turned_off():
    rec = QuantErrorRecorder("w4a4", check_finite=False)
    assert rec.check_finite is False
    seed_everything(0)
    model = _DivergingLM(nan_at=3)
    train, val = loaders()
    t = trainer(max_steps=6, callbacks=[rec], limit_val_batches=0)
    t.fit(model, train, val)  # trains on (the old behaviour), only when asked for
    assert model.steps_run == 6 and not torch.isfinite(model.model.conv2.weight).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scales_are_refused_in_the_constructors(bad):
    with pytest.raises(ValueError, match=r"noise_scale must be a finite float >= 0"):
        dnq_callbacks("w4a4", noise_scale=bad)
    with pytest.raises(ValueError, match=r"noise_scale must be a finite float >= 0"):
        dnq_callbacks("w4a4", act_noise_scale=bad)


class _NanAfter:
    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, step: int) -> float:
        return float("nan") if step >= self.at else 1.0

    def __repr__(self) -> str:
        return f"_NanAfter({self.at})"


@pytest.mark.parametrize("which", ["noise_scale", "act_noise_scale"])
def test_a_schedule_returning_nan_stops_the_fit_at_that_step(which):
    seed_everything(0)
    model = TinyLM()
    train, val = loaders()
    cbs = dnq_callbacks("w4a4", stats_every=2, **{which: _NanAfter(3)})
    with pytest.raises(ValueError, match=r"noise_scale must be finite and >= 0, the schedule _NanAfter\(3\) returned nan at step 3"):
        trainer(max_epochs=1, callbacks=cbs).fit(model, train, val)
    assert torch.isfinite(model.model.conv2.weight).all()
