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
