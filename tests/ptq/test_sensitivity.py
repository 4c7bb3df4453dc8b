"""Per-layer sensitivity (flatq_lightning/ptq/sensitivity.py): a deliberately fragile layer is ranked first by
measurement and by prediction; the report's files, plot and logger metrics; argument errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flatq_lightning.ptq.sensitivity import (
    SensitivityReport,
    analyze_sensitivity,
    layer_quadratic_forms,
    measure_sensitivity,
    predict_sensitivity,
    spearman,
)
from flatq_lightning.quant import QuantTarget


def _data(n_batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(64, 8, generator=g)
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
        out.append((x, y))
    return out


def _trained_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for x, y in _data(40, 1):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def _make_fragile(net: nn.Sequential) -> str:
    """Layer "4" gets one huge weight per output channel on an input that is always zero (a dead unit of the
    layer before), so the float network computes the same function while per-channel quantization of that
    layer rounds every other weight to zero."""
    with torch.no_grad():
        net[2].weight[5].zero_()
        net[2].bias[5] = -100.0  # unit 5 of layer "2" never fires: input 5 of layer "4" is always 0
        net[4].weight[:, 5] = 1000.0
    return "4"


@pytest.fixture(scope="module")
def fragile() -> tuple[nn.Sequential, str]:
    net = _trained_mlp()
    return net, _make_fragile(net)


def test_fragile_layer_is_ranked_first_by_measurement_and_by_prediction(fragile):
    net, name = fragile
    calib, predict, held_out = _data(2, 2), _data(2, 3), _data(4, 4)
    rep = analyze_sensitivity(net, calib, predict, held_out, weight_bits=(3,), act_bits=(3,), recipe="minmax",
                              all_but=True)
    w3 = [r for r in rep.rows if r.side == "weight" and r.bits == 3]
    assert [r.layer for r in w3] == ["0", "2", "4", "6"]
    by = {key: max(w3, key=lambda r: getattr(r, key)).layer
          for key in ("predicted", "second_order", "top1_drop", "loss_drop", "top1_gain")}
    assert by == dict.fromkeys(by, name), by
    fp = rep.reference["fp"]["top1"]
    assert next(r for r in w3 if r.layer == name).top1_drop > 20.0 and fp > 60.0
    assert set(rep.spearman) == {"act3", "weight3"}
    assert rep.seconds["predict"] > 0 and rep.seconds["measure"] > 0 and rep.images == 256


def test_measured_settings_match_direct_quantization(fragile):
    """"only this layer" equals quantizing that layer alone (include=[layer]) with quantize_model."""
    from flatq_lightning.ptq.evaluate import top1_and_loss
    from flatq_lightning.quant import QuantSpec, quantize_model

    net, _ = fragile
    calib, held_out = _data(2, 2), _data(2, 4)
    meas, ref = measure_sensitivity(net, calib, held_out, weight_bits=(3,), act_bits=(), recipe="minmax",
                                    all_but=False)
    for layer in ("0", "2"):
        t = QuantTarget(weight=QuantSpec.weight(3), include=(layer,), keep_first_last_8bit=False)
        q = quantize_model(net, t, fold_bn=True)
        top1, loss = top1_and_loss(q, held_out)
        assert meas[(layer, "weight", 3)]["top1_drop"] == pytest.approx(ref["fp"]["top1"] - top1)
        assert meas[(layer, "weight", 3)]["loss_drop"] == pytest.approx(loss - ref["fp"]["loss"], abs=1e-6)


def test_quadratic_forms_match_exact_hessian_products():
    """With one layer there are no cross-layer terms: the estimate is eᵀHe exactly, and gᵀe the gradient's."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    e = torch.randn(3, 4) * 0.1
    quad, lin1 = layer_quadratic_forms(lin, [lin.weight], {3: [e]}, [(x, y)], probes=3)

    def loss(w: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(nn.functional.linear(x, w, lin.bias), y)

    w = lin.weight.detach()
    _, hv = torch.autograd.functional.hvp(loss, w, e)
    g = torch.autograd.functional.jacobian(loss, w)
    assert quad[3][0] == pytest.approx(float((e * hv).sum()), rel=1e-4)
    assert lin1[3][0] == pytest.approx(float((g * e).sum()), rel=1e-4)


def test_order_two_is_the_second_order_term(fragile):
    net, _ = fragile
    p12 = predict_sensitivity(net, _data(2, 3), (3,), (3,), recipe="minmax", order=12)
    p2 = predict_sensitivity(net, _data(2, 3), (3,), (3,), recipe="minmax", order=2)
    for k, (pred, second) in p2.items():
        assert pred == second == pytest.approx(p12[k][1])
    assert any(abs(p12[k][0] - p12[k][1]) > 0 for k in p12)  # the first-order term is there


def test_report_files_plot_and_loggers(fragile, tmp_path):
    net, _ = fragile
    rep = analyze_sensitivity(net, _data(1, 2), _data(1, 3), _data(1, 4), weight_bits=(3,), act_bits=(4,),
                              recipe="minmax", all_but=False)
    paths = rep.save(tmp_path)
    assert [p.name for p in paths] == ["sensitivity.json", "sensitivity.md", "sensitivity.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = SensitivityReport.from_dict(json.loads(paths[0].read_text()))
    assert back.to_dict() == json.loads(json.dumps(rep.to_dict()))
    assert "| 4 | weight | 3 |" in paths[1].read_text() and "Spearman" in paths[1].read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        rep.save(tmp_path)
    rep.save(tmp_path, overwrite=True)

    class Logger:
        def __init__(self) -> None:
            self.metrics: dict[str, float] = {}

        def log_metrics(self, metrics: dict[str, float]) -> None:
            self.metrics.update(metrics)

    lg = Logger()
    rep.log_to([lg])
    assert "sensitivity/weight3/4/predicted" in lg.metrics and "sensitivity/act4/0/top1_drop" in lg.metrics
    assert any(k.startswith("sensitivity/spearman_weight3_") for k in lg.metrics)
    assert rep.costs("weight")["4"][3] == next(r.predicted for r in rep.rows if r.layer == "4" and r.side == "weight")


def test_scope_and_argument_errors(fragile):
    net, _ = fragile
    d = _data(1, 2)
    p = predict_sensitivity(net, d, (3,), (), recipe="minmax", target=QuantTarget(exclude=("6",)))
    assert sorted({k[0] for k in p}) == ["0", "2", "4"]
    with pytest.raises(ValueError, match="no quantizable layer"):
        predict_sensitivity(net, d, (3,), (), target=QuantTarget(include=("nothing*",)))
    with pytest.raises(ValueError, match=r"bit-widths must be ints in \[2, 8\]"):
        predict_sensitivity(net, d, (1,), ())
    with pytest.raises(ValueError, match="order must be one of"):
        predict_sensitivity(net, d, (3,), (), order=1)
    with pytest.raises(ValueError, match="target must be a QuantTarget"):
        predict_sensitivity(net, d, (3,), (), target="w4a4")
    with pytest.raises(ValueError, match="no batches"):
        measure_sensitivity(net, [], d)
    with pytest.raises(ValueError, match="needs eval_batches"):
        analyze_sensitivity(net, d, d, None)
    with pytest.raises(ValueError, match="targets"):
        predict_sensitivity(net, [torch.randn(4, 8)], (3,), ())


def test_spearman():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 1, 2, 3], [5, 5, 6, 7]) == pytest.approx(1.0)  # ties get average ranks
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1, 2], [2, 1]))
    with pytest.raises(ValueError, match="differ in length"):
        spearman([1, 2, 3], [1, 2])


def test_prediction_from_the_recorders_statistics_of_a_dnq_fit(tmp_path):
    """A DNQ fit's recorder state gives mu and Sigma per layer at its width: the prediction takes them there (and
    the quantizer's exact error elsewhere); zero statistics predict zero for the layers they cover."""
    import lightning as L

    from flatq_lightning import DNQ
    from flatq_lightning.ptq.sensitivity import recorder_error_stats
    from tests.ptq.helpers import _LitNetVal

    dnq = DNQ("w4a4", stats_every=1)
    lit = _LitNetVal()
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[dnq], default_root_dir=tmp_path).fit(lit)
    stats = recorder_error_stats(dnq.parts[0].state_dict())
    assert stats["bits"] == 4 and stats["layers"] and all(k.startswith("model.") for k in stats["layers"])
    net = lit.model.eval()
    data = [(x, y) for x, y in lit.val_dataloader()][:2]
    plain = predict_sensitivity(net, data, (4, 8), (), recipe="minmax")
    recorded = predict_sensitivity(net, data, (4, 8), (), recipe="minmax", error_stats=stats)
    assert all(recorded[k] == plain[k] for k in plain if k[2] == 8)  # other widths: the quantizer's error
    assert any(recorded[k] != plain[k] for k in plain if k[2] == 4)
    zero = {"bits": 4, "layers": {k: (torch.zeros_like(m), torch.zeros_like(v)) for k, (m, v) in stats["layers"].items()}}
    covered = predict_sensitivity(net, data, (4,), (), recipe="minmax", error_stats=zero)
    assert all(v == (0.0, 0.0) for v in covered.values())
    with pytest.raises(ValueError, match="not a QuantErrorRecorder state"):
        recorder_error_stats({"weight_mean": {}})
