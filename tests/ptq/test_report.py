"""PTQReport: serialisation, Markdown/CSV/plot, and the per-layer SQNR it carries."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import PTQReport, fold_batchnorm, run_ptq
from flatq_lightning.ptq.report import LayerSQNR, PTQRow
from flatq_lightning.quant import QuantSpec, compute_qparams, fake_quantize, sqnr_db
from tests.helpers import SmallConvNet, blob_data


def _report() -> PTQReport:
    return PTQReport(
        fp_top1=92.0,
        fp_top5=99.0,
        rows=[
            PTQRow("w8a8", 8, 8, 91.5, 99.0, 0.5, 0.0,
                   [LayerSQNR("conv1", 8, 8, 40.0, 41.0), LayerSQNR("conv2", 8, 8, 38.0, 39.0)]),
            PTQRow("w4a4", 4, 4, 80.0, 97.0, 12.0, 2.0,
                   [LayerSQNR("conv1", 8, 8, 40.0, 41.0), LayerSQNR("conv2", 4, 4, 15.0, 12.5)]),
            PTQRow("w4a16", 4, 16, 88.0, 98.5, 4.0, 0.5,
                   [LayerSQNR("conv1", 8, None, math.inf, None), LayerSQNR("conv2", 4, None, 15.0, None)]),
        ],
        folded_bn_pairs=[("conv1", "bn1"), ("conv2", "bn2")],
        kept_8bit=["conv1", "fc"],
        calib_batches=4,
        calib_batches_requested=32,
        num_eval_samples=100,
        num_classes=10,
        timing={"total_s": 1.5},
    )


def test_json_round_trip_is_strict(tmp_path):
    rep = _report()
    text = rep.to_json(tmp_path / "r.json")
    data = json.loads(text)  # strict: no Infinity/NaN tokens
    assert "Infinity" not in text
    assert data["rows"][2]["layers"][0]["weight_sqnr_db"] is None
    back = PTQReport.from_json(tmp_path / "r.json")
    assert back.bits == ["w8a8", "w4a4", "w4a16"]
    assert back.folded_bn_pairs == [("conv1", "bn1"), ("conv2", "bn2")]
    assert back.row("w4a4").layers[1] == LayerSQNR("conv2", 4, 4, 15.0, 12.5)
    assert PTQReport.from_json(text).to_dict() == back.to_dict()


def test_markdown_table_rows_sorting_and_policy(tmp_path):
    rep = _report()
    md = rep.to_markdown(tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text() == md
    lines = md.splitlines()
    head = lines.index("| bits | top-1 (%) | top-5 (%) | drop vs FP (top-1, pp) |")
    body = lines[head + 2 : head + 2 + 3]
    assert body == ["| w8a8 | 91.50 | 99.00 | 0.50 |", "| w4a4 | 80.00 | 97.00 | 12.00 |",
                    "| w4a16 | 88.00 | 98.50 | 4.00 |"]
    assert lines[head + 5] == ""
    assert "Folded BatchNorm pairs (2): conv1←bn1, conv2←bn2." in md
    assert "first/last layers kept at 8 bit: conv1, fc" in md and "keep_first_last_8bit=True" in md
    # per-layer: worst first at w4a4 (conv2's act SQNR 12.5 dB), float sides shown as a dash
    w4 = md.split("### w4a4")[1].split("###")[0].strip().splitlines()
    assert w4[2].startswith("| conv2 | 4 | 4 | 15.00 | 12.50 |")
    assert "| conv1 | 8 | fp | — | — |" in md


def test_csv_and_metrics():
    rep = _report()
    rows = list(csv.DictReader(io.StringIO(rep.to_csv())))
    assert [r["bits"] for r in rows] == ["fp", "w8a8", "w4a4", "w4a16"]
    assert float(rows[2]["drop_top1"]) == 12.0
    per_layer = list(csv.DictReader(io.StringIO(rep.to_csv(per_layer=True))))
    assert len(per_layer) == 6 and per_layer[4]["act_bits"] == "fp" and per_layer[4]["weight_sqnr_db"] == ""
    m = rep.metrics()
    assert m["ptq/fp/top1"] == 92.0 and m["ptq/w4a4/top1"] == 80.0 and m["ptq/w4a16/top5"] == 98.5
    with pytest.raises(KeyError, match=r"no PTQ row for 'w2a2'.*'w8a8'"):
        rep.row("w2a2")


def test_write_never_replaces_an_earlier_report_unless_told(tmp_path):
    first = _report().write(tmp_path)
    before = {f: p.read_bytes() for f, p in first.items()}
    second_rep = _report()
    second_rep.fp_top1 = 50.0
    second = second_rep.write(tmp_path)
    assert {p.name for p in second.values()} == {f"ptq_report_2.{f}" for f in ("json", "md", "csv", "png")}
    assert {f: p.read_bytes() for f, p in first.items()} == before  # the first report is untouched
    assert PTQReport.from_json(second["json"]).fp_top1 == 50.0
    # one file of a set is enough to move to the next number (a set is never mixed)
    (tmp_path / "ptq_report_3.md").write_text("someone else's")
    assert _report().write(tmp_path, names=("json",))["json"].name == "ptq_report_4.json"
    third = second_rep.write(tmp_path, overwrite=True)
    assert third["json"] == first["json"] and PTQReport.from_json(first["json"]).fp_top1 == 50.0
    with pytest.raises(ValueError, match=r"names must be a non-empty subset of \('json', 'md', 'csv', 'png'\)"):
        _report().write(tmp_path, names=("pdf",))
    with pytest.raises(ValueError, match="overwrite must be True or False"):
        _report().write(tmp_path, overwrite="yes")


def test_write_is_atomic_for_the_whole_set(tmp_path, monkeypatch):
    first = _report().write(tmp_path)
    before = {f: p.read_bytes() for f, p in first.items()}

    def broken_figure(self):
        raise RuntimeError("plotting failed")

    # the plot is made last: a failure there must leave neither a new report nor a temporary file behind,
    # and (with overwrite=True) must not have replaced the earlier JSON/Markdown/CSV already
    monkeypatch.setattr(PTQReport, "figure", broken_figure)
    with pytest.raises(RuntimeError, match="plotting failed"):
        _report().write(tmp_path, overwrite=True)
    with pytest.raises(RuntimeError, match="plotting failed"):
        _report().write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in first.values())
    assert {f: p.read_bytes() for f, p in first.items()} == before
    # the single-file writers are atomic too: a failing write leaves the old file and no temporary
    monkeypatch.setattr(Path, "write_text", lambda self, text: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        _report().to_json(first["json"])
    assert first["json"].read_bytes() == before["json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in first.values())


def test_sqnr_values_match_hand_computation():
    torch.manual_seed(0)
    x, y = blob_data(192)
    net = SmallConvNet().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    rep = run_ptq(net, loader, loader, bits=("w4a4",), calib_batches=3, progress=False)
    layers = {layer.name: layer for layer in rep.row("w4a4").layers}
    folded = fold_batchnorm(net)
    # weight SQNR: the folded weight against its fake-quantized self (conv2 at 4 bits, fc kept at 8)
    for name, bits in (("conv2", 4), ("fc", 8)):
        w = getattr(folded, name).weight.detach()
        spec = QuantSpec.weight(bits)
        s, z = compute_qparams(w, spec)
        assert layers[name].weight_sqnr_db == pytest.approx(float(sqnr_db(w, fake_quantize(w, spec, s, z))), abs=1e-4)
    # activation SQNR of the first layer: its input is the raw first calibration batch
    spec = QuantSpec.activation(8)
    s, z = compute_qparams((x.min(), x.max()), spec)  # min-max over the 3 calibration batches = all of x
    x0 = x[:64]
    assert layers["conv1"].act_sqnr_db == pytest.approx(float(sqnr_db(x0, fake_quantize(x0, spec, s, z))), abs=1e-4)
    assert layers["conv2"].act_sqnr_db < layers["conv1"].act_sqnr_db  # 4 bits vs 8
    assert rep.timing["total_s"] > 0 and rep.row("w4a4").eval_seconds > 0
