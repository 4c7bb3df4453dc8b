"""Which layers are quantized, and with which spec: QuantTarget (preset, at, select, layer_specs, layer_bits),
select_modules, first_last_names."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from flatq_lightning import QuantSpec, QuantTarget, quantize_model, select_modules
from flatq_lightning.quant import QuantPoint, as_target, first_last_names, has_weight
from tests.helpers import SmallConvNet


def test_select_modules_patterns_and_order():
    net = SmallConvNet()
    names = [n for n, _ in select_modules(net)]
    assert names == ["conv1", "conv2", "conv3", "fc"]
    assert [n for n, _ in select_modules(net, include="conv*", exclude="conv2")] == ["conv1", "conv3"]
    assert [n for n, _ in select_modules(net, include=["fc", "conv3"])] == ["conv3", "fc"]  # model order


def test_only_conv_and_linear_with_a_weight_and_points_are_selected():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), QuantPoint(), nn.Linear(4, 2))
    names = [n for n, _ in select_modules(net)]
    assert names == ["0", "4", "5"]
    assert [has_weight(m) for _, m in select_modules(net)] == [True, False, True]


def test_first_and_last_weighted_layers_stay_at_8_bits():
    net = SmallConvNet()
    sel = select_modules(net)
    assert first_last_names(sel) == {"conv1", "fc"}
    t = QuantTarget.preset("w3a3")
    specs = t.layer_specs(sel)
    assert {n: (ws.bits, as_.bits) for n, (ws, as_) in specs.items()} == {
        "conv1": (8, 8), "conv2": (3, 3), "conv3": (3, 3), "fc": (8, 8)
    }
    specs = dataclasses.replace(t, keep_first_last_8bit=False).layer_specs(sel)
    assert {ws.bits for ws, _ in specs.values()} == {3}
    # the granularity and observer of the spec are kept, only the bits change
    t_mse = QuantTarget(weight=QuantSpec.weight(3, observer="mse"), act=t.act)
    assert t_mse.layer_specs(sel)["conv1"][0] == QuantSpec.weight(8, observer="mse")


def test_selection_sees_through_shared_modules_once():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(4, 2))
    selected = select_modules(net)
    assert [n for n, _ in selected] == ["0", "3"]  # the shared Linear once, under its first name
    assert selected[0][1] is lin


# QuantTarget ---------------------------------------------------------------------------------------------------
def test_preset_builds_the_methods_quantizers_and_a_float_side_is_none():
    t = QuantTarget.preset("W4A8")
    assert (t.weight, t.act) == (QuantSpec.weight(4), QuantSpec.activation(8))
    assert t.name == "w4a8" and t.keep_first_last_8bit and t.attention_points and t.include == ()
    assert QuantTarget.preset("w4a16").act is None and QuantTarget.preset("w4a16").name == "w4a16"
    assert QuantTarget.preset("w16a4").weight is None and QuantTarget().name == "w16a16"
    t = QuantTarget.preset("w3a3", "mse", act_observer="percentile", include="conv*", keep_first_last_8bit=False)
    assert (t.weight.observer, t.act.observer, t.include, t.keep_first_last_8bit) == ("mse", "percentile", ("conv*",), False)
    assert QuantTarget.preset("w3a3", "mse").act.observer == "mse"  # act_observer defaults to observer


def test_preset_refuses_what_it_sets_and_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['weight'\]; the preset sets weight and act"):
        QuantTarget.preset("w4a4", weight=QuantSpec.weight(4))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['keep_first_last'\]"):
        QuantTarget.preset("w4a4", keep_first_last=False)
    with pytest.raises(ValueError, match="observer must be one of"):
        QuantTarget.preset("w4a4", "max")


def test_fields_are_normalised_frozen_and_hashable():
    t = QuantTarget(include=["layer1.*", "fc"], exclude="*.downsample.*", layer_bits={"fc": (8, None), "conv1": [None, 6]})
    assert t.include == ("layer1.*", "fc") and t.exclude == ("*.downsample.*",)
    assert t.layer_bits == (("conv1", None, 6), ("fc", 8, None))  # sorted by name
    assert QuantTarget(layer_bits=[("fc", 8, None), ("conv1", None, 6)]) == QuantTarget(layer_bits=t.layer_bits)
    assert QuantTarget(include=None) == QuantTarget()
    assert len({t, dataclasses.replace(t)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.include = ()


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"weight": "w4a4"}, r"QuantTarget.weight must be a QuantSpec or None \(float\), got 'w4a4' \(for a preset"),
        ({"act": 4}, r"QuantTarget.act must be a QuantSpec or None \(float\), got 4"),
        ({"include": 3}, r"QuantTarget.include must be a pattern string or a sequence of patterns .*got 3"),
        ({"exclude": ["fc", 1]}, r"QuantTarget.exclude must be .*got \['fc', 1\]"),
        ({"keep_first_last_8bit": "no"}, r"QuantTarget.keep_first_last_8bit must be True or False, got 'no'"),
        ({"attention_points": 1}, r"QuantTarget.attention_points must be True or False, got 1"),
        ({"layer_bits": {"fc": (8, 16)}}, r"layer_bits\['fc'\]: act bits must be an int in \[2, 15\] or None .*got 16"),
        ({"layer_bits": {"fc": (1, None)}}, r"layer_bits\['fc'\]: weight bits must be an int in \[2, 15\].*got 1"),
        ({"layer_bits": {"fc": (8.0, None)}}, r"weight bits must be an int .*got 8.0"),
        ({"layer_bits": {"fc": 8}}, r"layer_bits\['fc'\] must be a \(weight_bits, act_bits\) pair"),
        ({"layer_bits": [("fc", 8)]}, r"sequence of \(layer, weight_bits, act_bits\) triples, got the entry \('fc', 8\)"),
        ({"layer_bits": [("fc", 8, 8), ("fc", 4, 4)]}, r"names layer 'fc' twice"),
        ({"layer_bits": "fc"}, r"layer_bits must be a mapping"),
    ],
)
def test_bad_fields_name_the_field_and_the_value(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        QuantTarget(**kwargs)


def test_at_keeps_the_scope_and_quantizer_settings_at_other_widths():
    t = QuantTarget(weight=QuantSpec.weight(4, "mse", mse_grid=10), act=QuantSpec.activation(4, percentile=99.9),
                    exclude="fc", keep_first_last_8bit=False, layer_bits={"conv2": (8, None)})
    u = t.at("w3a8")
    assert (u.weight.bits, u.weight.mse_grid, u.act.bits, u.act.percentile) == (3, 10, 8, 99.9)
    assert (u.exclude, u.keep_first_last_8bit, u.layer_bits) == (t.exclude, False, t.layer_bits)
    assert u.name == "w3a8-mixed" and t.at((3, 8)) == u
    v = t.at("w4a4", observer="percentile")  # the observers replaced (the act side follows the weight's)
    assert (v.weight.observer, v.act.observer) == ("percentile", "percentile")
    assert t.at("w4a4", "minmax", act_observer="mse").act.observer == "mse"
    assert t.at("w4a16").act is None
    assert QuantTarget().at("w4a4") == QuantTarget.preset("w4a4")  # a float side gets the method's quantizer
    with pytest.raises(ValueError, match="cannot parse bit-width preset"):
        t.at("4/4")
    with pytest.raises(ValueError, match=r"a \(weight_bits, act_bits\) pair of ints, got \(4.0, 4\)"):
        t.at((4.0, 4))


def test_select_uses_the_scope():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), QuantPoint(), nn.Linear(4, 2))
    assert [n for n, _ in QuantTarget().select(net)] == ["0", "2", "3"]
    assert [n for n, _ in QuantTarget(attention_points=False).select(net)] == ["0", "3"]
    assert [n for n, _ in QuantTarget(attention_points=False).select(net, points=True)] == ["0", "2", "3"]
    assert [n for n, _ in QuantTarget(exclude=["3"]).select(net)] == ["0", "2"]
    assert [n for n, _ in QuantTarget(include="0").select(net)] == ["0"]


def test_layer_bits_override_after_the_first_last_policy():
    net = SmallConvNet()
    t = QuantTarget.preset("w4a4").with_layer_bits({"conv1": (4, None), "conv2": (2, 8), "fc": (None, 6)})
    specs = t.layer_specs(t.select(net))
    assert {n: (w.bits, a.bits) for n, (w, a) in specs.items()} == {
        "conv1": (4, 8), "conv2": (2, 8), "conv3": (4, 4), "fc": (8, 6)
    }
    assert specs["conv2"][0] == QuantSpec.weight(2) and specs["fc"][1] == QuantSpec.activation(6)
    assert t.name == "w4a4-mixed" and t.with_layer_bits({}).name == "w4a4"


def test_layer_bits_errors_name_the_layer_and_the_selected_ones():
    net = SmallConvNet()
    t = QuantTarget.preset("w4a4", exclude="fc").with_layer_bits({"fc": (8, 8)})
    with pytest.raises(ValueError, match=r"names 'fc', which is not a selected layer; the selected layers are "
                                         r"\['conv1', 'conv2', 'conv3'\]"):
        t.layer_specs(t.select(net))
    t = QuantTarget.preset("w4a16").with_layer_bits({"conv2": (None, 8)})
    with pytest.raises(ValueError, match=r"layer_bits\['conv2'\]: act bits 8, but the target's activations stay float"):
        t.layer_specs(t.select(net))
    point_net = nn.Sequential(nn.Linear(4, 4), QuantPoint(), nn.Linear(4, 2))
    t = QuantTarget.preset("w4a4").with_layer_bits({"1": (4, 4)})
    with pytest.raises(ValueError, match=r"'1' is a weightless quantization point: give None"):
        t.layer_specs(t.select(point_net))


def test_layer_bits_name_the_network_inside_a_module_too():
    """One plan for DNQ (which selects on the LightningModule: model.conv2) and PTQ (on its network: conv2)."""
    inner = SmallConvNet()
    outer = nn.Module()
    outer.model = inner
    t = QuantTarget.preset("w4a4").with_layer_bits({"conv2": (2, None)})
    assert t.layer_specs(t.select(inner))["conv2"][0].bits == 2
    assert t.layer_specs(t.select(outer))["model.conv2"][0].bits == 2
    assert t.with_layer_bits({"model.conv2": (2, None)}).layer_specs(t.select(outer))["model.conv2"][0].bits == 2
    with pytest.raises(ValueError, match=r"names layer 'model.conv2' twice \('conv2' and 'model.conv2'\)"):
        t.with_layer_bits({"conv2": (2, None), "model.conv2": (3, None)}).layer_specs(t.select(outer))
    twice = nn.Module()
    twice.a, twice.b = SmallConvNet(), SmallConvNet()
    with pytest.raises(ValueError, match=r"names 'conv2', the end of several selected layers \['a.conv2', 'b.conv2'\]"):
        t.layer_specs(t.select(twice))
    with pytest.raises(ValueError, match=r"names 'nv2', which is not a selected layer"):  # dotted ends only
        t.with_layer_bits({"nv2": (2, None)}).layer_specs(t.select(inner))


def test_a_plan_at_the_uniform_widths_equals_the_uniform_target():
    net = SmallConvNet()
    t = QuantTarget.preset("w3a3")
    sel = t.select(net)
    uniform = t.layer_specs(sel)
    plan = t.with_layer_bits({n: (w.bits, a.bits) for n, (w, a) in uniform.items()})
    assert plan.layer_specs(sel) == uniform


def test_as_target_takes_a_target_or_a_preset():
    t = QuantTarget.preset("w4a4", exclude="fc")
    assert as_target(t) is t and as_target("w3a3") == QuantTarget.preset("w3a3")
    with pytest.raises(ValueError, match=r"DNQ: target must be a QuantTarget or a preset string like 'w4a4', got "
                                         r"QuantSpec.*QuantSpecs go into a target"):
        as_target(QuantSpec.weight(4), "DNQ: target")
    with pytest.raises(ValueError, match="cannot parse bit-width preset 'int4'"):
        as_target("int4")


# -- bad inputs are named ------------------------------------------------------------------------------------


def _net():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_a_target_names_a_preset_string_given_as_a_spec():
    with pytest.raises(ValueError, match=r"QuantTarget.weight must be a QuantSpec or None \(float\), got 'w4a4'.*"
                                         r"QuantTarget\.preset"):
        QuantTarget(weight="w4a4")
    with pytest.raises(ValueError, match=r"QuantTarget.act must be a QuantSpec or None \(float\), got 4"):
        QuantTarget(weight=QuantSpec.weight(4), act=4)
    with pytest.raises(ValueError, match=r"QuantTarget.keep_first_last_8bit must be True or False, got 'no'"):
        QuantTarget(weight=QuantSpec.weight(4), keep_first_last_8bit="no")
    with pytest.raises(ValueError, match=r"quantize_model: target must be a QuantTarget or a preset string"):
        quantize_model(_net(), (QuantSpec.weight(4), None))
