"""The weight-noise guards: shared parameters, weight averaging, non-finite runs, re-used callbacks, resume, sharded strategies."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything

from flatq_lightning import QuantErrorRecorder, dnq_callbacks
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


# -- non-finite values -----------------------------------------------------------------------------


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


def test_the_finite_check_can_be_turned_off():
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


# -- shared parameters ------------------------------------------------------------------------------


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


# -- resume ----------------------------------------------------------------------------------------


def _fit(callbacks, epochs, tmp_path=None, ckpt_path=None, **tkw):
    seed_everything(0)
    model = TinyLM()
    train, val = loaders()
    t = trainer(tmp_path, max_epochs=epochs, callbacks=callbacks, **tkw)
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("validate", [True, False])
def test_resume_from_an_epoch_boundary_continues_bit_for_bit(tmp_path, validate):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def cbs():
        return dnq_callbacks("w4a4", stats_every=3, seed=3)

    val = {} if validate else {"limit_val_batches": 0}
    full = _fit(cbs(), epochs=3, **val)
    ck = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit([*cbs(), ck], epochs=2, tmp_path=tmp_path, enable_checkpointing=True, **val)
    last = tmp_path / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    res = saved["callbacks"][cbs()[1].state_key]["residual"]
    assert res is not None and sum(i.numel() for i, _ in res) > 0  # there was rounding to undo
    resumed = _fit(cbs(), epochs=3, tmp_path=tmp_path, ckpt_path=str(last), **val)
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k].float() - b[k].float()).abs().max())


# -- weight averaging ---------------------------------------------------------------------------------


def _averagers():
    from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    return [lambda: EMAWeightAveraging(decay=0.5), lambda: StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)]


@pytest.mark.parametrize("make_avg", _averagers(), ids=["ema", "swa"])
@pytest.mark.parametrize("avg_first", [True, False])
@pytest.mark.parametrize("mode", ["differential", "uniform"])
def test_weight_averaging_of_noisy_weights_is_refused_in_either_order(make_avg, avg_first, mode):
    cbs = dnq_callbacks("w4a4", mode=mode, act_noise=False)
    avg = make_avg()
    order = [avg, *cbs] if avg_first else [*cbs, avg]
    with pytest.raises(ValueError, match=rf"{type(avg).__name__} next to DifferentialNoiseInjection\(mode='{mode}'\) would average the noisy weights.*mode='add_remove'"):
        _fit(order, epochs=1)


@pytest.mark.parametrize("avg_first", [True, False])
def test_ema_with_add_remove_noise_averages_the_clean_weights(avg_first):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    # lr = 0: the clean weights never move (but for the float rounding of W + δ − δ, ~1e-8), so the average must
    # be W0; the noise itself is ~1e-2 and would show
    seed_everything(0)
    model = TinyLM(lr=0.0)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cbs = dnq_callbacks("w4a4", mode="add_remove", stats_every=2)
    avg = EMAWeightAveraging(decay=0.5)
    train, val = loaders()
    trainer(max_epochs=1, callbacks=[avg, *cbs] if avg_first else [*cbs, avg]).fit(model, train, val)
    assert avg._average_model is not None
    for k, v in avg._average_model.module.state_dict().items():
        if k.endswith("weight") and "bn" not in k:
            torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-6)
    # the weights handed back at the end of fit are that average (EMA copies it in)
    torch.testing.assert_close(model.model.conv2.weight.detach(), w0["model.conv2.weight"], rtol=0, atol=1e-6)


def test_mode_off_is_not_refused_next_to_weight_averaging():
    from lightning.pytorch.callbacks import EMAWeightAveraging

    _fit([*dnq_callbacks("w4a4", mode="off", act_noise=False), EMAWeightAveraging(decay=0.5)], epochs=1)


# -- sharded strategies --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharded_strategies_are_refused_in_setup(strategy):
    from types import SimpleNamespace

    import lightning.pytorch.strategies as strategies

    cls = getattr(strategies, strategy)
    fake = SimpleNamespace(strategy=cls.__new__(cls), callbacks=[])  # no process group or deepspeed needed
    dnq = dnq_callbacks("w4a4")[1]
    with pytest.raises(ValueError, match=rf"DifferentialNoiseInjection does not support the {strategy}: it adds noise in place.*strategy='ddp'"):
        dnq.setup(fake, TinyLM(), "fit")
    dnq.setup(fake, TinyLM(), "validate")  # only fitting touches the weights


# -- re-used callbacks ----------------------------------------------------------------------------


class _WideLM(TinyLM):
    def __init__(self, width: int) -> None:
        super().__init__()
        from tests.helpers import SmallConvNet

        self.model = SmallConvNet(width=width)


def test_a_callback_list_reused_on_another_model_starts_afresh():
    cbs = dnq_callbacks("w4a4", stats_every=2)
    train, val = loaders()
    seed_everything(0)
    trainer(max_steps=3, callbacks=cbs, limit_val_batches=0).fit(_WideLM(8), train, val)
    seed_everything(1)
    second = _WideLM(12)  # another width: the old statistics would not even fit
    trainer(max_steps=3, callbacks=cbs, limit_val_batches=0).fit(second, train, val)
    # ... and the statistics are the second model's alone: equal to a fresh set's on the same fit
    fresh = dnq_callbacks("w4a4", stats_every=2)
    seed_everything(1)
    again = _WideLM(12)
    trainer(max_steps=3, callbacks=fresh, limit_val_batches=0).fit(again, train, val)
    for n in fresh[0].weight_layers:
        assert torch.equal(cbs[0].weight_mean[n], fresh[0].weight_mean[n])
        assert torch.equal(cbs[0].act_var[n], fresh[0].act_var[n])
    for k, v in again.state_dict().items():
        assert torch.equal(v, second.state_dict()[k]), k


def test_two_weight_noise_sets_in_one_trainer_are_refused_clearly():
    a = dnq_callbacks("w4a4")
    b = dnq_callbacks("w3a3")  # distinct state keys: Lightning accepts the list, the noise callbacks do not
    with pytest.raises(ValueError, match=r"two weight-noise callbacks in one Trainer.*one DNQ\(\.\.\.\)"):
        _fit([*a, *b], epochs=1)


def test_a_second_recorder_with_its_own_name_may_monitor_another_width():
    extra = QuantErrorRecorder("w4a4", name="w4a4_monitor", stats_every=2)
    _fit([*dnq_callbacks("w4a4", stats_every=2), extra], epochs=1)
    assert extra.weight_mean and extra.act_var
