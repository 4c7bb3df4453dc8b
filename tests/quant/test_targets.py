"""Which layers are quantized, and with which spec: select_modules, first_last_names, layer_specs."""

from __future__ import annotations

from torch import nn

from flatq_lightning import QuantSpec, select_modules
from flatq_lightning.quant import QuantPoint, first_last_names, has_weight, layer_specs
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
    w, a = QuantSpec.parse("w3a3")
    specs = layer_specs(sel, w, a, keep_first_last_8bit=True)
    assert {n: (ws.bits, as_.bits) for n, (ws, as_) in specs.items()} == {
        "conv1": (8, 8), "conv2": (3, 3), "conv3": (3, 3), "fc": (8, 8)
    }
    specs = layer_specs(sel, w, a, keep_first_last_8bit=False)
    assert {ws.bits for ws, _ in specs.values()} == {3}
    # the granularity and observer of the spec are kept, only the bits change
    w_mse = QuantSpec.weight(3, observer="mse")
    assert layer_specs(sel, w_mse, a)["conv1"][0] == QuantSpec.weight(8, observer="mse")


def test_selection_sees_through_shared_modules_once():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(4, 2))
    selected = select_modules(net)
    assert [n for n, _ in selected] == ["0", "3"]  # the shared Linear once, under its first name
    assert selected[0][1] is lin
