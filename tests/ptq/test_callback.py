"""PostTrainingQuantization / run_ptq: numbers against a hand-written quantized forward, the Trainer path, errors."""

from __future__ import annotations

import copy
import csv
import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import PostTrainingQuantization, PTQReport, fold_batchnorm, quantize_model, run_ptq
from flatq_lightning.ptq.export import load_quantized
from flatq_lightning.quant import QuantSpec, compute_qparams, fake_quantize
from tests.helpers import SmallConvNet, blob_data, train_small

LAYERS = ("conv1", "conv2", "conv3", "fc")


# helpers ---------------------------------------------------------------------------------------------------
def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y = blob_data(512, seed=0)
    net = train_small(SmallConvNet(), x, y, steps=60)
    xe, ye = blob_data(256, seed=1)
    return net, (x, y), (xe, ye)


def _hand_layer_bits(wbits: int, abits: int, keep_first_last_8bit: bool = True) -> dict[str, tuple[int, int]]:
    edge = ("conv1", "fc") if keep_first_last_8bit else ()
    return {n: ((max(wbits, 8), max(abits, 8)) if n in edge else (wbits, abits)) for n in LAYERS}


def hand_quantized_forward(
    folded: SmallConvNet, calib: list[torch.Tensor], x: torch.Tensor, wbits: int, abits: int
) -> torch.Tensor:
    """SmallConvNet's quantized forward written out: fake-quant weights, min-max calibrated inputs."""
    bits = _hand_layer_bits(wbits, abits)
    wq = {}
    for n in LAYERS:
        w = getattr(folded, n).weight.detach()
        spec = QuantSpec.weight(bits[n][0])
        s, z = compute_qparams(w, spec)
        wq[n] = fake_quantize(w, spec, s, z)

    def forward(h: torch.Tensor, act: dict | None, record: dict | None) -> torch.Tensor:
        def q_in(n: str, t: torch.Tensor) -> torch.Tensor:
            if record is not None:
                record.setdefault(n, []).append(torch.stack([t.min(), t.max()]))
            if act is None:
                return t
            spec, s, z = act[n]
            return fake_quantize(t, spec, s, z)

        for n in ("conv1", "conv2", "conv3"):
            h = torch.relu(F.conv2d(q_in(n, h), wq[n], getattr(folded, n).bias, padding=1))
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return F.linear(q_in("fc", h), wq["fc"], folded.fc.bias)

    with torch.no_grad():
        rec: dict[str, list[torch.Tensor]] = {}
        for xb in calib:  # calibration: quantized weights, float inputs, running min/max per layer input
            forward(xb, None, rec)
        act = {}
        for n in LAYERS:
            r = torch.stack(rec[n])
            spec = QuantSpec.activation(bits[n][1])
            act[n] = (spec, *compute_qparams((r[:, 0].min(), r[:, 1].max()), spec))
        return forward(x, act, None)


def _top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).sum()) / len(y) * 100.0


# numbers ---------------------------------------------------------------------------------------------------
def test_w8a8_top1_matches_independent_forward(trained):
    net, (x, y), (xe, ye) = trained
    calib_batches = 4
    rep = run_ptq(net, _loader(x, y), _loader(xe, ye), bits=("w8a8", "w4a4"), calib_batches=calib_batches, progress=False)
    folded = fold_batchnorm(net)
    calib = [x[i * 64 : (i + 1) * 64] for i in range(calib_batches)]
    with torch.no_grad():
        fp_logits = net(xe)
    assert rep.fp_top1 == pytest.approx(_top1(fp_logits, ye), abs=1e-6)
    assert rep.fp_top1 > 90
    for bits, wb, ab in (("w8a8", 8, 8), ("w4a4", 4, 4)):
        logits = hand_quantized_forward(folded, calib, xe, wb, ab)
        assert rep.row(bits).top1 == pytest.approx(_top1(logits, ye), abs=1e-6), bits
        assert rep.row(bits).drop_top1 == pytest.approx(rep.fp_top1 - rep.row(bits).top1)
        # the quantized forward is bit-for-bit quantize_model's
        q = quantize_model(folded, *QuantSpec.parse(bits), calib_batches=calib)
        with torch.no_grad():
            assert torch.equal(q(xe), logits), bits
    # 4 classes: "top-5" is top-4, always 100 %
    assert rep.top5_k == 4 and rep.row("w8a8").top5 == 100.0
    assert abs(rep.row("w8a8").drop_top1) < 1.0


def test_run_ptq_does_not_mutate_model(trained):
    net, (x, y), _ = trained
    net = copy.deepcopy(net).train()
    before = copy.deepcopy(net.state_dict())
    run_ptq(net, _loader(x, y), _loader(x, y), bits=("w4a4", "w4a16"), calib_batches=2, progress=False)
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_weight_only_and_activation_only_rows(trained):
    net, (x, y), (xe, ye) = trained
    rep = run_ptq(net, _loader(x, y), _loader(xe, ye), bits=("w4a16", "w16a4"), calib_batches=2, progress=False)
    w_only, a_only = rep.row("w4a16"), rep.row("w16a4")
    assert (w_only.weight_bits, w_only.act_bits) == (4, 16)
    assert all(layer.act_bits is None and layer.act_sqnr_db is None for layer in w_only.layers)
    assert all(layer.weight_bits is None and layer.weight_sqnr_db is None for layer in a_only.layers)
    assert {layer.name: layer.weight_bits for layer in w_only.layers} == {"conv1": 8, "conv2": 4, "conv3": 4, "fc": 8}
    folded = fold_batchnorm(net)
    qw = quantize_model(folded, QuantSpec.weight(4), None)
    with torch.no_grad():
        assert w_only.top1 == pytest.approx(_top1(qw(xe), ye), abs=1e-6)


def test_lightning_module_model_attribute_is_the_network(trained):
    net, (x, y), _ = trained
    lit = _LitNet()
    lit.model.load_state_dict(net.state_dict())
    rep = run_ptq(lit, _loader(x, y), _loader(x, y), bits="w8a8", calib_batches=1, progress=False)
    assert [layer.name for layer in rep.row("w8a8").layers] == list(LAYERS)
    assert ("conv1", "bn1") in rep.folded_bn_pairs


def test_short_calibration_loader_warns_once_and_uses_what_exists(trained, tmp_path):
    net, (x, y), _ = trained
    calib = _loader(x[:192], y[:192])  # 3 batches
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        rep = run_ptq(net, calib, _loader(x, y), bits=("w8a8", "w4a4", "w3a3"), calib_batches=8,
                      progress=False, export_dir=tmp_path)
    short = [w for w in rec if "calibration loader has only 3 batch" in str(w.message)]
    assert len(short) == 1
    assert rep.calib_batches == 3 and rep.calib_batches_requested == 8
    # the ranges are those of exactly the 3 batches
    folded = fold_batchnorm(net)
    ref = quantize_model(folded, *QuantSpec.parse("w4a4"), calib_batches=[x[i * 64 : (i + 1) * 64] for i in range(3)])
    got = load_quantized(SmallConvNet(), tmp_path / "quantized_w4a4.safetensors")
    for n in LAYERS:
        assert torch.equal(getattr(got, n).act_scale, getattr(ref, n).act_scale), n
        assert torch.equal(getattr(got, n).act_zero_point, getattr(ref, n).act_zero_point), n


def test_progress_bar_writes_to_stderr(capsys):
    x, y = blob_data(64)
    run_ptq(SmallConvNet(), _loader(x, y, 32), _loader(x, y, 32), bits=("w8a8", "w4a4"), calib_batches=2, progress=True)
    err = capsys.readouterr().err
    assert "PTQ" in err


# errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": ()}, "bits is empty"),
        ({"bits": []}, "bits is empty"),
        ({"bits": ("w4x4",)}, r"cannot parse bit-width preset 'w4x4'.*w<bits>a<bits>"),
        ({"bits": ("w1a4",)}, r"weight bits must be in \[2, 16\], got 1"),
        ({"bits": ("w4a1",)}, r"activation bits must be in \[2, 16\], got 1"),
        ({"bits": (4,)}, "must be a string like 'w4a4'"),
        ({"stage": "train"}, r"stage must be one of \('validate', 'test'\), got 'train'"),
        ({"observer": "kl"}, r"observer must be one of \('minmax', 'percentile', 'mse'\), got 'kl'"),
        ({"calib_batches": 0}, "calib_batches must be a positive int"),
        ({"calib_batches": 2.5}, "calib_batches must be a positive int"),
        ({"include": 3}, "include must be None, a pattern string"),
        ({"export": "yes"}, "unknown export format 'yes'"),
        ({"export": 3}, "export formats must be a name or a list"),
        ({"parity_batches": 0}, "parity_batches must be None"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostTrainingQuantization(**kwargs)


def test_bits_are_normalised():
    cb = PostTrainingQuantization(bits=["W8A8", "w4a4", "w8a8"])
    assert cb.bits == ("w8a8", "w4a4")
    assert PostTrainingQuantization(bits="w3a3").bits == ("w3a3",)


def test_empty_eval_loader_raises_before_any_work():
    consumed = []

    def calib():
        consumed.append(1)
        yield torch.randn(4, 1, 8, 8)

    with pytest.raises(ValueError, match="eval_loader is empty"):
        PostTrainingQuantization(bits="w4a4").run(SmallConvNet(), calib(), [])
    with pytest.raises(ValueError, match="eval_loader is None"):
        run_ptq(SmallConvNet(), calib(), None, bits="w4a4")
    assert not consumed


def test_no_quantizable_layer_matches():
    x, y = blob_data(32)
    with pytest.raises(ValueError, match="no quantizable layers"):
        run_ptq(SmallConvNet(), _loader(x, y), _loader(x, y), bits="w4a4", include="nothing*", progress=False)


# Lightning -------------------------------------------------------------------------------------------------
class _LitNet(L.LightningModule):
    """SmallConvNet as ``self.model``, train data only (subclasses add val/test loaders)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = SmallConvNet()
        self.steps = 0
        self.x, self.y = blob_data(256, seed=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return _loader(self.x, self.y, 32, shuffle=True)


class _LitNetVal(_LitNet):
    def val_dataloader(self):
        x, y = blob_data(128, seed=1)
        return _loader(x, y, 64)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.model(x), y))


def _trainer(tmp_path: Path, cb: PostTrainingQuantization) -> L.Trainer:
    return L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )


def test_callback_in_trainer_writes_reports_and_logs(tmp_path, capsys):
    bits = ("w8a8", "w4a8", "w4a4")
    cb = PostTrainingQuantization(bits=bits, calib_batches=2, progress=False, export=True)
    lit = _LitNetVal()
    trainer = _trainer(tmp_path, cb)
    trainer.fit(lit)
    out = Path(trainer.log_dir)
    files = {p.name for p in out.iterdir()}
    assert {"ptq_report.json", "ptq_report.md", "ptq_report.csv", "ptq_report.png"} <= files
    assert {f"quantized_{b}.safetensors" for b in bits} <= files

    data = json.loads((out / "ptq_report.json").read_text())
    rep = PTQReport.from_json(out / "ptq_report.json")
    assert [r["bits"] for r in data["rows"]] == list(bits) == rep.bits
    assert rep.num_eval_samples == 128 and rep.calib_batches == 2
    assert [tuple(p) for p in data["folded_bn_pairs"]] == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    assert data["kept_8bit"] == ["conv1", "fc"] and data["keep_first_last_8bit"] is True

    md = (out / "ptq_report.md").read_text()
    table = md.split("\n\n")[2].splitlines()
    assert table[0].startswith("| bits | top-1")
    assert [line.split("|")[1].strip() for line in table[2:]] == list(bits)
    assert "Folded BatchNorm pairs (3): conv1←bn1, conv2←bn2, conv3←bn3" in md
    assert "first/last layers kept at 8 bit: conv1, fc" in md
    assert (out / "ptq_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k: float(v) for r in rows for k, v in r.items() if v not in ("", None) and k.startswith("ptq/")}
    assert logged["ptq/fp/top1"] == pytest.approx(rep.fp_top1)
    for b in bits:
        assert logged[f"ptq/{b}/top1"] == pytest.approx(rep.row(b).top1)
        assert f"ptq/{b}/top5" in logged
    assert "| w4a4 |" in capsys.readouterr().out
    # the quantized copies came from the trained network, which is untouched
    assert cb.report is not None and cb.report.fp_top1 == rep.fp_top1
    assert any(isinstance(m, nn.BatchNorm2d) for m in lit.model.modules())


def test_callback_with_loaders_passed_to_fit(tmp_path):
    cb = PostTrainingQuantization(bits="w8a8", calib_batches=1, progress=False, print_report=False,
                                  save_dir=tmp_path / "ptq")
    lit = _LitNet()
    xv, yv = blob_data(96, seed=2)
    trainer = _trainer(tmp_path, cb)
    trainer.fit(lit, train_dataloaders=_loader(lit.x, lit.y, 32), val_dataloaders=_loader(xv, yv, 32))
    assert cb.report is not None and cb.report.num_eval_samples == 96
    assert (tmp_path / "ptq" / "ptq_report.json").exists()


def test_callback_without_logger_reports_into_its_own_folder_and_keeps_earlier_reports(tmp_path, monkeypatch):
    # logger=False: not the current directory but <default_root_dir>/ptq_reports; a second fit writes
    # ptq_report_2.*, overwrite=True replaces the first report
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = tmp_path / "root"

    def fit(**kw):
        cb = PostTrainingQuantization(bits="w8a8", calib_batches=1, progress=False, print_report=False, **kw)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                            default_root_dir=root, limit_train_batches=2)
        trainer.fit(_LitNetVal())
        return cb

    first = fit()
    out = root / "ptq_reports"
    assert first.files["json"] == out / "ptq_report.json" and not list(cwd.iterdir())
    first_json = first.files["json"].read_text()
    second = fit()
    assert {p.name for p in second.files.values()} == {f"ptq_report_2.{f}" for f in ("json", "md", "csv", "png")}
    assert first.files["json"].read_text() == first_json
    third = fit(overwrite=True)
    assert third.files["json"] == first.files["json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"ptq_report{n}.{f}" for n in ("", "_2") for f in ("json", "md", "csv", "png")
    )
    with pytest.raises(ValueError, match="overwrite must be True or False"):
        PostTrainingQuantization(overwrite=1)


class _LitFlatTest(L.LightningModule):
    """Layers directly on the LightningModule (no ``model`` attribute), evaluated on its test loader."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.x, self.y = blob_data(128, seed=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return _loader(self.x, self.y, 32)

    def test_dataloader(self):
        return _loader(self.x[:64], self.y[:64], 32)


def test_callback_on_module_without_model_attribute_test_stage(tmp_path):
    cb = PostTrainingQuantization(bits=("w8a8", "w4a4"), stage="test", calib_batches=2, progress=False,
                                  print_report=False, keep_first_last_8bit=False)
    lit = _LitFlatTest()
    trainer = _trainer(tmp_path, cb)
    trainer.fit(lit)
    rep = cb.report
    assert rep is not None and rep.num_eval_samples == 64
    assert rep.folded_bn_pairs == [("conv", "bn")] and rep.kept_8bit == []
    assert {layer.name: layer.weight_bits for layer in rep.row("w4a4").layers} == {"conv": 4, "head": 4}
    assert isinstance(lit.bn, nn.BatchNorm2d) and lit.trainer is trainer  # the module itself is untouched


@pytest.mark.parametrize("stage, hook", [("validate", "val_dataloader"), ("test", "test_dataloader")])
def test_missing_stage_dataloader_fails_before_training(tmp_path, stage, hook):
    cb = PostTrainingQuantization(bits="w4a4", stage=stage, progress=False)
    lit = _LitNet()  # no val_dataloader, no test_dataloader
    with pytest.raises(ValueError, match=rf"stage='{stage}'\) needs a .* dataloader .*define {hook}\(\)"):
        _trainer(tmp_path, cb).fit(lit)
    assert lit.steps == 0


@pytest.mark.gpu
def test_runs_on_cuda_without_moving_the_model(trained):
    net, (x, y), (xe, ye) = trained
    rep = run_ptq(net, _loader(x, y), _loader(xe, ye), bits=("w8a8", "w4a4"), calib_batches=2, device="cuda",
                  progress=False)
    assert rep.device.startswith("cuda")
    assert next(net.parameters()).device.type == "cpu"
    cpu = run_ptq(net, _loader(x, y), _loader(xe, ye), bits=("w8a8", "w4a4"), calib_batches=2, progress=False)
    assert abs(rep.row("w8a8").top1 - cpu.row("w8a8").top1) <= 1.0


def test_attention_points_switch_reaches_quantize_model():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=4, pretrained=False)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 4, (8,))
    data = [(x, y)]
    with_pts = run_ptq(vit, data, data, bits=("w8a8",), calib_batches=1, progress=False)
    without = run_ptq(vit, data, data, bits=("w8a8",), calib_batches=1, progress=False, attention_points=False)
    names_with = {layer.name for layer in with_pts.rows[0].layers}
    names_without = {layer.name for layer in without.rows[0].layers}
    assert any(n.endswith("quant_attn") for n in names_with)
    assert not any("quant_" in n for n in names_without)
    cb = PostTrainingQuantization(bits=("w8a8",), attention_points=False, progress=False, print_report=False)
    assert cb.attention_points is False
    with pytest.raises(ValueError, match="attention_points must be True or False"):
        PostTrainingQuantization(attention_points="yes")
