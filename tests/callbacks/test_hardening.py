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


# -- item 1: shared parameters ------------------------------------------------------------------------------


class _TiedLM(TinyLM):
    """Two Linear layers sharing one weight (and, through ``emb``, an embedding-style alias of it)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.model = torch.nn.Module()
        self.model.a = torch.nn.Linear(64, 16)
        self.model.b = torch.nn.Linear(16, 16)
        self.model.c = torch.nn.Linear(16, 16)
        self.model.c.weight = self.model.b.weight  # tied
        self.model.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.model.a(x.flatten(1)))
        h = torch.relu(self.model.b(h))
        h = torch.relu(self.model.c(h))
        return self.model.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass




def test_a_shared_parameter_is_noised_once_and_every_alias_key_is_clean_in_checkpoints(tmp_path):
    from lightning.pytorch import Callback

    seed_everything(0)
    model = _TiedLM(lr=0.0)  # lr = 0: the clean weight stays W0, so param - W0 is exactly the injected noise
    w0 = model.model.b.weight.detach().clone()
    cbs = dnq_callbacks("w4a4", stats_every=2, act_noise=False)
    dnq = cbs[1]
    seen = []

    class Check(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                delta = dnq.current_noise("model.b")
                assert torch.equal(delta, dnq.current_noise("model.c"))
                seen.append((pl_module.model.b.weight.detach() - w0, delta))
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    train, val = loaders()
    trainer(max_steps=4, callbacks=[*cbs, Check()], limit_val_batches=0).fit(model, train, val)
    (inside, delta), = seen
    assert float(delta.abs().max()) > 1e-4
    torch.testing.assert_close(inside, delta, rtol=0, atol=1e-6)  # once, not twice
    sd = torch.load(tmp_path / "mid.ckpt", weights_only=True)["state_dict"]
    for key in ("model.b.weight", "model.c.weight"):
        torch.testing.assert_close(sd[key], w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.model.b.weight.detach(), w0, rtol=0, atol=1e-6)  # clean after fit
    assert model.model.b.weight is model.model.c.weight
