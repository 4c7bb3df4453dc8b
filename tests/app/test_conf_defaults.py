"""Defaults stated in a callback's YAML are the Python defaults: a config file that restates a default
must not drift from the code."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[2] / "conf" / "callbacks"

#: values the app sets on purpose, unlike the Python default (the app evaluates PTQ on the test split and prints
#: its own table)
APP_CHOICES = {"ptq.yaml": {"stage": "test", "print_report": False}}


@pytest.mark.parametrize("file, key", [("dnq.yaml", "dnq"), ("ptq.yaml", "ptq")])
def test_yaml_defaults_equal_the_python_defaults(file, key):
    from hydra.utils import get_class

    node = OmegaConf.to_container(OmegaConf.load(CONF / file)[key], resolve=False)
    cls = get_class(node["_target_"])
    params = inspect.signature(cls.__init__).parameters
    checked = 0
    for name, value in node.items():
        if name.startswith("_") or (isinstance(value, str) and "${" in value):
            continue  # set from another config group (an interpolation): not a restated default
        assert name in params, f"{file}: {name!r} is not an argument of {cls.__name__}"
        default = params[name].default
        if default is inspect.Parameter.empty:
            continue
        if name in APP_CHOICES.get(file, {}):
            assert value == APP_CHOICES[file][name] and value != default, f"{file}: {name}: update APP_CHOICES"
            continue
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        assert value == default, f"{file}: {name}: {value!r} in the YAML, {default!r} in {cls.__name__}"
        checked += 1
    assert checked > 0


def test_quant_base_restates_the_target_defaults_and_the_methods_quantizers():
    """conf/quant/base/method.yaml names every field so that users can set it (``quant.keep_first_last_8bit=false``,
    ``quant.act.observer=percentile``): its values are QuantTarget's defaults and the QuantSpecs of
    ``QuantTarget.preset`` (the method's quantizers), only the bits left to the preset files."""
    import dataclasses

    from flatq_lightning import QuantSpec, QuantTarget

    node = OmegaConf.to_container(OmegaConf.load(CONF.parent / "quant" / "base" / "method.yaml"), resolve=False)
    assert node.pop("_target_") == "flatq_lightning.QuantTarget"
    for side, method in (("weight", QuantSpec.weight(4)), ("act", QuantSpec.activation(4))):
        spec = node.pop(side)
        assert spec.pop("_target_") == "flatq_lightning.QuantSpec" and spec.pop("bits") == "???"
        assert spec == {k: v for k, v in method.to_dict().items() if k != "bits"}, side
    defaults = {f.name: f.default for f in dataclasses.fields(QuantTarget)}
    assert set(node) <= set(defaults), set(node) - set(defaults)
    for name, value in node.items():
        assert (tuple(value) if isinstance(value, list) else value) == defaults[name], name
    for preset in ("w2a4", "w3a3", "w4a4", "w4a8", "w8a8"):  # each preset file sets the bits and nothing else
        own = OmegaConf.to_container(OmegaConf.load(CONF.parent / "quant" / f"{preset}.yaml"))
        assert own == {"defaults": ["base/method@_here_", "_self_"], "weight": {"bits": int(preset[1])},
                       "act": {"bits": int(preset[3])}}, preset
