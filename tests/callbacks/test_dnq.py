"""DNQ, the one-callback form: same numbers as the three callbacks, state, explicit wiring, LightningCLI."""

from __future__ import annotations

import textwrap

import pytest
import torch
from lightning.pytorch import seed_everything

from flatq_lightning import DNQ, QuantErrorRecorder, QuantTarget, dnq_callbacks
from flatq_lightning.callbacks import (
    ActivationNoiseInjection,
    CallbackGroup,
    DifferentialNoiseInjection,
    NoiseMode,
    UniformNoise,
)
from tests.callbacks.lm import TinyLM, loaders, trainer


def _fit(callbacks, mse_weight=0.0, stats=None):
    seed_everything(0)
    model = TinyLM(mse_weight=mse_weight)
    if stats is not None:
        model.use_quant_stats(stats)
    train, val = loaders()
    trainer(max_epochs=2, callbacks=callbacks).fit(model, train, val)
    return model


def test_dnq_trains_bit_identically_to_the_three_callbacks():
    kw = dict(stats_every=2, p=0.5, seed=3)
    parts = dnq_callbacks("w4a4", **kw)
    a = _fit(parts)
    dnq = DNQ("w4a4", **kw)
    b = _fit([dnq])
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n
    rec_a = parts[0]
    assert isinstance(rec_a, QuantErrorRecorder) and rec_a.layers == dnq.recorder.layers
    for name in rec_a.weight_layers:
        assert torch.equal(rec_a.weight_var[name], dnq.recorder.weight_var[name])
    for name in rec_a.layers:
        assert torch.equal(rec_a.act_var[name], dnq.recorder.act_var[name])


def test_dnq_parts_switches_and_state():
    d = DNQ("w3a3", act_noise=False)
    assert isinstance(d, CallbackGroup) and d.act_noise is None and not d.recorder.record_activations
    assert [type(p) for p in d.parts] == [QuantErrorRecorder, DifferentialNoiseInjection]
    assert not d.recorder.refresh_weights  # the weight noise measures the clean weights itself
    assert set(d.state_dict()) == {"recorder", "weight_noise"}
    d2 = DNQ("w4a4", weight_noise=False)
    assert d2.weight_noise is None and d2.recorder.refresh_weights
    assert isinstance(d2.act_noise, ActivationNoiseInjection)
    with pytest.raises(ValueError, match="weight_noise must be True or False"):
        DNQ(weight_noise="yes")


def test_mse_term_uses_the_dnq_it_is_given_and_nothing_it_is_not():
    """use_quant_stats: the recorder's activation ranges are used when (and only when) the module is given them."""
    dnq = DNQ("w4a4", stats_every=1, weight_noise=False, act_noise=False)
    dnq.recorder.record_activations = True  # ranges without activation noise
    seen = []
    model = TinyLM(mse_weight=1.0)
    orig = dnq.recorder.act_qparams

    def spy(name):
        seen.append(name)
        return orig(name)

    dnq.recorder.act_qparams = spy
    seed_everything(0)
    train, val = loaders()
    trainer(max_epochs=1, callbacks=[dnq]).fit(model, train, val)
    assert not seen  # not given: the term found nothing by itself
    model.use_quant_stats(dnq)
    trainer(max_epochs=1, callbacks=[dnq]).fit(model, train, val)
    assert set(seen) == set(dnq.recorder.layers)
    with pytest.raises(ValueError, match="takes a DNQ or a QuantErrorRecorder"):
        model.use_quant_stats("w4a4")


def test_noise_modes_are_strategies():
    assert NoiseMode.from_name("uniform").distribution == "uniform"
    with pytest.raises(ValueError, match="mode must be one of"):
        NoiseMode.from_name("loud")

    class HalfUniform(UniformNoise):
        name = "half_uniform"

        def coefficients(self, recorder, layer, kappa):
            a, b = super().coefficients(recorder, layer, kappa)
            return a, 0.5 * b

    d = DNQ("w4a4", mode=HalfUniform(), act_noise=False, stats_every=2)
    assert d.weight_noise.mode == "half_uniform"
    _fit([d])
    assert d.weight_noise.settings()["dnq/weight_noise/mode"] == "half_uniform"


def test_activation_noise_layer_choice_is_overridable():
    class OnlyConv1(ActivationNoiseInjection):
        def should_perturb(self, layer, rng):
            rng.random()  # keep the draw sequence
            return layer.endswith("conv1")

    rec = QuantErrorRecorder("w4a4", stats_every=1)
    act = OnlyConv1(rec, p=1.0)
    seed_everything(0)
    model = TinyLM()
    train, val = loaders()
    t = trainer(max_epochs=1, callbacks=[rec, act])
    t.fit(model, train, val)
    act.on_train_batch_start(t, model, None, 0)
    assert act._active == {n for n in rec.layers if n.endswith("conv1")}
    assert act.kappa(0) == 1.0


@pytest.mark.slow
def test_lightning_cli_sets_up_dnq_and_ptq_from_a_yaml_file(tmp_path, image_folder):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    from flatq_lightning.app.data import ImageNetDataModule
    from flatq_lightning.app.module import ImageClassifier

    cfg = tmp_path / "config.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          accelerator: cpu
          max_epochs: 1
          limit_train_batches: 4
          limit_val_batches: 1
          enable_progress_bar: false
          enable_checkpointing: false
          default_root_dir: {tmp_path}
          callbacks:
            - class_path: flatq_lightning.DNQ
              init_args:
                target: w4a4
                stats_every: 2
                p: 0.5
            - class_path: flatq_lightning.PostTrainingQuantization
              init_args:
                bits: [w8a8, w4a4]
                calib_batches: 1
                save_dir: {tmp_path / "ptq"}
                progress: false
                print_report: false
        model:
          model: test_resnet
          num_classes: 3
          lr: 0.05
        data:
          root: {image_folder}
          image_size: 32
          batch_size: 4
          num_workers: 0
        """))
    # the real kind of input: JPEGs in an ImageFolder (train/ and val/), with Lightning's default logger on
    cli = LightningCLI(ImageClassifier, ImageNetDataModule, args=["fit", "--config", str(cfg)], run=True)
    dnq = next(c for c in cli.trainer.callbacks if isinstance(c, DNQ))
    assert dnq.recorder.layers and dnq.recorder.weight_mean  # it recorded
    assert dnq.weight_noise.noisy_bn_state is not None  # noise was applied; the end of fit cleaned BN
    assert (tmp_path / "ptq" / "ptq_report.json").is_file()
    assert (tmp_path / "ptq" / "ptq_report.png").is_file()
    assert cli.trainer.logger is not None and cli.trainer.global_step > 0


def test_a_checkpoint_of_the_three_callbacks_resumes_into_dnq_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = dict(stats_every=2, seed=5)

    def run(callbacks, epochs, ckpt=None, **tkw):
        seed_everything(0)
        model = TinyLM()
        train, val = loaders()
        trainer(max_epochs=epochs, callbacks=callbacks, **tkw).fit(model, train, val, ckpt_path=ckpt)
        return model

    ck = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    run([*dnq_callbacks("w4a4", **kw), ck], 1, enable_checkpointing=True)
    last = str(tmp_path / "last.ckpt")
    a = run(dnq_callbacks("w4a4", **kw), 2, ckpt=last)
    dnq = DNQ("w4a4", **kw)
    b = run([dnq], 2, ckpt=last)
    assert dnq.recorder.weight_mean  # the recorder's statistics came back from the old keys
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n


def test_dnq_clean_weights_is_the_weight_noise_s_and_a_no_op_without_it():
    from lightning.pytorch.callbacks import Callback

    from flatq_lightning import SharpnessMonitor

    dnq = DNQ("w4a4", stats_every=2, act_noise=False)
    seen = {}

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step != 3:
                return
            w = pl_module.model.conv2.weight
            seen["noisy"] = w.detach().clone()
            with dnq.clean_weights():
                seen["dnq"] = w.detach().clone()
            with dnq.weight_noise.clean_weights():
                seen["part"] = w.detach().clone()
            seen["after"] = w.detach().clone()

    assert SharpnessMonitor(weight_noise=dnq).weight_noise is dnq  # a DNQ is accepted as the noise's owner
    _fit([dnq, Probe()])
    # the same clean weights (each round trip of the noise may leave float rounding behind), far from the noisy
    assert torch.allclose(seen["dnq"], seen["part"], atol=1e-6)
    assert float((seen["dnq"] - seen["noisy"]).abs().max()) > 1e-3
    assert torch.allclose(seen["after"], seen["noisy"], atol=1e-6)  # the noise is back (up to float rounding)
    quiet = DNQ("w4a4", weight_noise=False, act_noise=False)
    with quiet.clean_weights():
        pass
    with pytest.raises(ValueError, match="weight_noise must be a DNQ or a DifferentialNoiseInjection"):
        SharpnessMonitor(weight_noise=object())


def test_two_dnq_in_one_trainer_need_their_own_names_and_the_second_is_refused_at_setup():
    # identical: one state key, which Lightning refuses when the Trainer is built (before any hook of ours);
    # DNQ's docstring, where Lightning's message sends the user, says what to do
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `DNQ`"):
        trainer(callbacks=[DNQ("w4a4"), DNQ("w4a4")])
    assert "name=" in DNQ.__doc__ and "One DNQ per Trainer" in DNQ.__doc__
    # with its own name a DNQ has its own state key and metric prefix (the default stays the preset's)
    a, b = DNQ("w4a4"), DNQ("w4a4", name="w4a4_b")
    assert (a.recorder.name, b.recorder.name) == ("w4a4", "w4a4_b") and a.state_key != b.state_key
    assert a.state_key == DNQ("w4a4", p=0.25).state_key  # the name, not the settings, keys the state
    # both with weight noise: refused at setup, by us, saying to keep one DNQ
    with pytest.raises(ValueError, match=r"two weight-noise callbacks in one Trainer.*one DNQ\(\.\.\.\).*name="):
        _fit([a, b])
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        DNQ("w4a4", name="")


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
