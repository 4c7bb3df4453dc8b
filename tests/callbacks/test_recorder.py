"""QuantErrorRecorder: the target quantizer's error statistics, measured on the live model."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from flatq_lightning import DifferentialNoiseInjection, QuantErrorRecorder, dnq_callbacks
from flatq_lightning.quant import compute_qparams, quant_error_stats
from tests.callbacks.lm import TinyLM, loaders, trainer


def _fit(callbacks, epochs=2, **kw):
    seed_everything(0)
    model = TinyLM()
    train, val = loaders()
    t = trainer(max_epochs=epochs, callbacks=callbacks, **kw)
    t.fit(model, train, val)
    return model, t


def test_first_weight_measurement_is_the_quantizer_error_of_the_weights():
    rec = QuantErrorRecorder("w4a4", stats_every=10_000, record_activations=False)
    seed_everything(0)
    model = TinyLM()
    w0 = {n: m.weight.detach().clone() for n, m in model.model.named_modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() > 1}
    t = trainer(max_epochs=1, callbacks=[rec], limit_train_batches=1)
    t.fit(model, *loaders())
    for n in rec.weight_layers:
        w = w0[n.removeprefix("model.")]
        spec = rec.specs[n][0]
        mean, var = quant_error_stats(w, spec, *compute_qparams(w, spec))
        assert torch.equal(rec.weight_mean[n], mean) and torch.equal(rec.weight_var[n], var), n


def test_refresh_schedule_and_who_refreshes_the_weights():
    rec = QuantErrorRecorder("w4a4", stats_every=3)
    _fit([rec], epochs=1, limit_train_batches=7)
    assert rec.weight_refreshed_at == 6 and rec.act_refreshed_at == 6  # steps 0, 3, 6
    quiet = QuantErrorRecorder("w4a4", stats_every=3, refresh_weights=False)
    _fit([quiet], epochs=1, limit_train_batches=7)
    assert quiet.weight_refreshed_at == -1 and not quiet.weight_mean  # left to its caller
    assert quiet.act_refreshed_at == 6


def test_two_recorders_coexist(tmp_path):
    r4 = QuantErrorRecorder("w4a4", stats_every=2, refresh_weights=False)
    r3 = QuantErrorRecorder("w3a3", stats_every=2)
    assert r4.state_key != r3.state_key
    ck = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit([r4, DifferentialNoiseInjection(r4), r3, ck], epochs=1, enable_checkpointing=True, default_root_dir=str(tmp_path))
    cb_state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert r4.state_key in cb_state and r3.state_key in cb_state
    n = r4.layers[1]
    assert (r3.weight_var[n] > r4.weight_var[n]).all()  # 3-bit error is larger than 4-bit


def test_bad_recorder_arguments():
    with pytest.raises(ValueError, match="cannot parse bit-width preset"):
        QuantErrorRecorder("w4x4")
    with pytest.raises(ValueError, match="cannot parse bit-width preset"):
        dnq_callbacks("4bit")
    with pytest.raises(ValueError, match="stats_every must be an int >= 1"):
        QuantErrorRecorder("w4a4", stats_every=0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        QuantErrorRecorder("w4a4", momentum=1.0)
    with pytest.raises(ValueError, match=r"refresh_weights=False"):  # it would measure the noisy weights
        DifferentialNoiseInjection(QuantErrorRecorder("w4a4"))
    DifferentialNoiseInjection(QuantErrorRecorder("w4a4", refresh_weights=False))


def test_model_without_quantizable_layers_fails_at_setup():
    import torch.nn as nn

    class NoLayers(TinyLM):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Flatten(), nn.ReLU())

    with pytest.raises(ValueError, match="has no quantizable layers"):
        _fit(dnq_callbacks("w4a4"), epochs=1) if False else trainer(callbacks=dnq_callbacks("w4a4")).fit(NoLayers(), *loaders())


def test_recorder_flags_must_be_bools():
    for flag in ("record_activations", "log_sqnr", "check_finite"):
        with pytest.raises(TypeError, match=rf"{flag} must be True or False, got 'no'"):
            QuantErrorRecorder("w4a4", **{flag: "no"})
