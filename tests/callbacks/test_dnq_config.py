"""DNQ's part configs: every option of the three parts reachable through DNQ (configs, mappings, flat arguments,
Hydra keys), disagreements refused with both names, and the warm-up as part of the noise schedule (the same κ at
every step, and the same training, as the warm-up arguments it replaces)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import seed_everything

from flatq_lightning import (
    DNQ,
    ActivationNoiseInjection,
    ActNoiseConfig,
    DifferentialNoiseInjection,
    QuantErrorRecorder,
    Ramp,
    RecorderConfig,
    Warmup,
    WeightNoiseConfig,
)
from flatq_lightning.callbacks.dnq_config import FLAT_OPTIONS
from flatq_lightning.callbacks.schedules import PiecewiseLinear, trapezoid
from tests.callbacks.lm import TinyLM, loaders, trainer

#: each part of DNQ: its callback class and its config
PARTS = {
    "recorder": (QuantErrorRecorder, RecorderConfig),
    "weight_noise": (DifferentialNoiseInjection, WeightNoiseConfig),
    "act_noise": (ActivationNoiseInjection, ActNoiseConfig),
}
#: arguments of the parts that DNQ sets itself (the wiring), or that are deprecated (the warm-up)
WIRED = {"target", "recorder", "name", "refresh_weights", "warmup_steps", "warmup_fraction"}
#: a value other than the part's default for every option
OTHER = {
    "recorder": dict(stats_every=3, momentum=0.5, log_sqnr=False, check_finite=False, placement="onnxruntime"),
    "weight_noise": dict(noise_scale=0.25, mode="add_remove", seed=7, noise_source="pool", pool_fraction=0.125,
                         clean_bn_batches=5),
    "act_noise": dict(p=0.75, noise_scale=0.5, seed=9, noise_source="generator", pool_numel=1024),
}
#: a value other than the part's default for every flat argument
FLAT = dict(stats_every=4, momentum=0.75, placement="onnxruntime", noise_scale=0.125, mode="uniform",
            clean_bn_batches=6, p=0.25, act_noise_scale=2.0, seed=8, noise_source="pool")


def _default(cls: type, name: str):
    return inspect.signature(cls).parameters[name].default


def test_each_config_names_every_option_of_its_part_and_states_no_default():
    for part, (cls, cfg) in PARTS.items():
        options = set(inspect.signature(cls).parameters) - WIRED
        assert {f.name for f in dataclasses.fields(cfg)} == options, part
        assert all(f.default is None for f in dataclasses.fields(cfg)), part  # the defaults are the parts'
        assert set(OTHER[part]) | ({"record_activations"} if part == "recorder" else set()) == options, part


@pytest.mark.parametrize("as_mapping", [False, True], ids=["configs", "mappings"])
def test_every_part_option_is_reachable_through_dnq(as_mapping):
    kw = {part: dict(v) if as_mapping else PARTS[part][1](**v) for part, v in OTHER.items()}
    dnq = DNQ("w4a4", **kw)
    for part, values in OTHER.items():
        cls, obj = PARTS[part][0], getattr(dnq, part)
        for k, v in values.items():
            assert v != _default(cls, k), (part, k)  # a real change
            assert getattr(obj, k) == v, (part, k)
    # nothing set: every option is the part's default
    plain = DNQ("w4a4")
    for part, (cls, cfg) in PARTS.items():
        for f in dataclasses.fields(cfg):
            assert getattr(getattr(plain, part), f.name) == _default(cls, f.name), (part, f.name)
    # record_activations: with the activation noise by default; True without it keeps the input statistics
    assert plain.recorder.record_activations and not DNQ("w4a4", act_noise=False).recorder.record_activations
    kept = DNQ("w4a4", act_noise=False, recorder={"record_activations": True})
    assert kept.act_noise is None and kept.recorder.record_activations


def test_flat_arguments_set_their_part_options():
    assert set(FLAT) == set(FLAT_OPTIONS)
    for arg, v in FLAT.items():
        dnq = DNQ("w4a4", **{arg: v})
        for option in FLAT_OPTIONS[arg]:
            part, field = option.split(".")
            assert v != _default(PARTS[part][0], field), option
            assert getattr(getattr(dnq, part), field) == v, option
    # a flat argument and a config of the same part: each sets its own option
    dnq = DNQ("w4a4", p=0.25, act_noise=ActNoiseConfig(pool_numel=2048), seed=3)
    assert (dnq.act_noise.p, dnq.act_noise.pool_numel, dnq.act_noise.seed, dnq.weight_noise.seed) == (0.25, 2048, 3, 3)
    # flat arguments of a part that is off are ignored, as before
    assert DNQ("w4a4", act_noise=False, p=0.3, act_noise_scale=2.0).act_noise is None


@pytest.mark.parametrize("arg", sorted(FLAT_OPTIONS))
def test_a_flat_argument_and_a_config_field_that_disagree_fail_naming_both(arg):
    for option in FLAT_OPTIONS[arg]:
        part, field = option.split(".")
        cls, cfg_cls = PARTS[part]
        default = _default(cls, field)
        # an explicit default on either side is a setting too, not "unset"
        for cfg_value, flat_value in ((default, FLAT[arg]), (FLAT[arg], default)):
            msg = re.escape(f"{arg}={flat_value!r} and {option}={cfg_value!r} disagree: set it in one place")
            for given in (cfg_cls(**{field: cfg_value}), {field: cfg_value}):
                with pytest.raises(ValueError, match=msg):
                    DNQ("w4a4", **{part: given, arg: flat_value})
        # the same value in both places is one setting
        dnq = DNQ("w4a4", **{part: cfg_cls(**{field: FLAT[arg]}), arg: FLAT[arg]})
        assert getattr(getattr(dnq, part), field) == FLAT[arg]


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(act_noise={"pool_fraction": 0.1}), r"act_noise: unknown option\(s\) \['pool_fraction'\]; the options of ActNoiseConfig"),
        (dict(recorder={"name": "x"}), r"recorder: unknown option\(s\) \['name'\]"),
        (dict(recorder=True), "recorder must be a RecorderConfig or a mapping of its options"),
        (dict(weight_noise="yes"), "weight_noise must be True or False, a WeightNoiseConfig or a mapping"),
        (dict(act_noise=WeightNoiseConfig()), "act_noise must be True or False, an ActNoiseConfig or a mapping"),
        (dict(recorder=RecorderConfig(record_activations=False)), r"recorder.record_activations=False and act_noise"),
        (dict(warmup_steps=4, warmup_fraction=0.5), r"give warmup_steps \(4\) or warmup_fraction \(0.5\), not both"),
        (dict(warmup_steps=-1), "warmup_steps must be an int >= 0"),
        (dict(warmup_fraction=1.0), r"warmup_fraction must be a float in \[0, 1\)"),
        (dict(warmup_steps=5, act_noise=ActNoiseConfig(noise_scale=Warmup(1.0, steps=5))),
         r"warmup_steps=5 and act_noise.noise_scale=Warmup\(1.0, steps=5\) both give a warm-up"),
        (dict(act_noise={"p": 2.0}), r"p must be a probability in \[0, 1\]"),  # the part checks the value
        (dict(weight_noise=WeightNoiseConfig(pool_fraction=0.0)), r"pool_fraction must be in \(0, 1\]"),
    ],
)
def test_bad_part_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DNQ("w4a4", **kw)


def test_hydra_keys_reach_every_part_option_and_keep_the_flat_keys(tmp_path):
    from flatq_lightning.app.train import instantiate_callbacks
    from tests.app.test_train import _compose

    def dnq(*overrides: str) -> DNQ:
        cfg = _compose(["callbacks=[dnq]", *overrides])
        return instantiate_callbacks(cfg.callbacks, checkpoint_dir=tmp_path)[0]

    d = dnq()  # the YAML's nulls leave the parts' defaults
    assert (d.act_noise.p, d.weight_noise.noise_scale, d.recorder.stats_every, d.weight_noise.warmup_steps) == (0.5, 1.0, 16, 0)
    d = dnq("callbacks.dnq.p=0.25", "callbacks.dnq.noise_scale=0.5", "callbacks.dnq.warmup_steps=3",
            "callbacks.dnq.act_noise={pool_numel:1024,noise_source:generator}",
            "callbacks.dnq.recorder={log_sqnr:false,check_finite:false}",
            "callbacks.dnq.weight_noise={pool_fraction:0.125,noise_scale:0.5}")
    assert (d.act_noise.p, d.act_noise.pool_numel, d.act_noise.noise_source) == (0.25, 1024, "generator")
    assert (d.weight_noise.pool_fraction, d.weight_noise.noise_scale.scale, d.weight_noise.warmup_steps) == (0.125, 0.5, 3)
    assert not d.recorder.log_sqnr and not d.recorder.check_finite
    assert dnq("callbacks.dnq.act_noise=false").act_noise is None
    # a schedule as a part option, instantiated by Hydra
    d = dnq("callbacks.dnq.act_noise={noise_scale:{_target_:flatq_lightning.Warmup,scale:0.5,steps:4}}")
    assert d.act_noise.kappa(3) == 0.0 and d.act_noise.kappa(4) == 0.5 and d.weight_noise.warmup_steps == 0
    with pytest.raises(ValueError, match=r"p=0.3 and act_noise.p=0.25 disagree"):  # the app's ConfigError
        dnq("callbacks.dnq.p=0.3", "callbacks.dnq.act_noise={p:0.25}")


# the warm-up ----------------------------------------------------------------------------------------------------
def _old_kappa(noise_scale, warmup_steps: int, warmup_fraction: float, total: int, step: int) -> float:
    """κ as the noise callbacks computed it with their warmup_steps/warmup_fraction arguments (the code this
    replaces: resolve_warmup + kappa_value of callbacks/noise_source.py before the warm-up became a schedule)."""
    if warmup_fraction:
        warmup_steps = int(warmup_fraction * total)
    if step < warmup_steps:
        return 0.0
    k = noise_scale(step) if callable(noise_scale) else noise_scale
    k = float(k)
    assert math.isfinite(k) and k >= 0
    return k


SCALES = [1.0, 0.5, 0.0, Ramp(end=2.0, steps=17), trapezoid(40, up=0.2, down=0.3),
          PiecewiseLinear([(0, 0.0), (7, 1.5), (30, 0.25)])]
WARMUPS = [(0, 0.0), (3, 0.0), (40, 0.0), (0, 0.5), (0, 0.25), (0, 0.99), (0, 0.01)]


def _three_ways(scale, steps: int, fraction: float):
    """The weight and activation noise of DNQ's flat arguments, of Warmup in the configs, and of the deprecated
    arguments of the parts."""
    flat = DNQ("w4a4", noise_scale=scale, act_noise_scale=scale, warmup_steps=steps, warmup_fraction=fraction)
    w = Warmup(scale, steps=steps, fraction=fraction)
    configs = DNQ("w4a4", weight_noise=WeightNoiseConfig(noise_scale=w), act_noise=ActNoiseConfig(noise_scale=w))
    rec = QuantErrorRecorder("w4a4", refresh_weights=False)
    with pytest.warns(FutureWarning, match=r"deprecated: the warm-up is part of the noise schedule"):
        old_w = DifferentialNoiseInjection(rec, noise_scale=scale, warmup_steps=steps, warmup_fraction=fraction)
    with pytest.warns(FutureWarning, match=r"noise_scale=Warmup\(noise_scale, "):
        old_a = ActivationNoiseInjection(rec, noise_scale=scale, warmup_steps=steps, warmup_fraction=fraction)
    return [flat.weight_noise, flat.act_noise, configs.weight_noise, configs.act_noise, old_w, old_a]


@pytest.mark.parametrize("steps, fraction", WARMUPS)
def test_the_warmup_schedule_gives_the_old_arguments_scales_at_every_step(steps, fraction):
    total = 40
    fit = SimpleNamespace(estimated_stepping_batches=total)
    for scale in SCALES:
        for cb in _three_ways(scale, steps, fraction):
            cb.resolve_schedule(fit)  # what on_fit_start/on_train_start do
            assert cb.warmup_steps == (int(fraction * total) if fraction else steps)
            assert cb.warmup_fraction == fraction
            for step in range(total + 5):
                k = cb.kappa(step)
                assert type(k) is float and k == _old_kappa(scale, steps, fraction, total, step), (scale, step)
            settings = cb.settings()
            prefix = "dnq/weight_noise" if isinstance(cb, DifferentialNoiseInjection) else "dnq/act_noise"
            # the hyperparameters are those the arguments gave: the scale without its warm-up, steps, fraction
            assert settings[f"{prefix}/noise_scale"] == (scale if isinstance(scale, float) else repr(scale))
            assert settings[f"{prefix}/warmup_steps"] == cb.warmup_steps
            assert settings[f"{prefix}/warmup_fraction"] == fraction


def test_warmup_of_zero_leaves_the_noise_scale_as_given():
    d = DNQ("w4a4", warmup_steps=0, warmup_fraction=0.0, noise_scale=0.5)
    assert d.weight_noise.noise_scale == 0.5 and d.act_noise.noise_scale == 1.0  # no Warmup around them
    assert DNQ("w4a4").weight_noise.noise_scale == 1.0


def test_warmup_through_dnq_configs_and_deprecated_arguments_trains_bit_identically():
    """DNQ(warmup_fraction=...), Warmup in the part configs and the parts' deprecated arguments: the same fit."""

    def fit(callbacks):
        seed_everything(0)
        model = TinyLM()
        train, val = loaders()
        trainer(max_epochs=2, callbacks=callbacks).fit(model, train, val)
        return model.state_dict()

    kw = dict(stats_every=2, seed=3)
    a = fit([DNQ("w4a4", warmup_fraction=0.25, **kw)])
    w = Warmup(fraction=0.25)
    b = fit([DNQ("w4a4", weight_noise=WeightNoiseConfig(noise_scale=w), act_noise=ActNoiseConfig(noise_scale=w), **kw)])
    rec = QuantErrorRecorder("w4a4", stats_every=2, refresh_weights=False)
    with pytest.warns(FutureWarning):
        parts = [rec, DifferentialNoiseInjection(rec, seed=3, warmup_fraction=0.25),
                 ActivationNoiseInjection(rec, seed=3, warmup_fraction=0.25)]
    c = fit(parts)
    plain = fit([DNQ("w4a4", **kw)])
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
    assert any(not torch.equal(a[k], plain[k]) for k in a)  # the warm-up changed the fit
    assert parts[1].warmup_steps == parts[2].warmup_steps == 4  # 16 steps, a quarter of them resolved at fit start
