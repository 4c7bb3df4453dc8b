"""PostTrainingQuantization in a Trainer: reports, loggers, stages, the recipe (run_ptq itself: test_runner.py)."""

from __future__ import annotations

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

from flatq_lightning import PostTrainingQuantization, PTQRecipe, PTQReport, QuantTarget, run_ptq
from flatq_lightning.ptq.recipe import RECIPES
from tests.helpers import blob_data
from tests.ptq.helpers import (
    _LitNet,
    _LitNetVal,
    _loader,
)


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
                                  print_report=False, target=QuantTarget(keep_first_last_8bit=False))
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


# --- the PTQ recipe -------------------------------------------------------------------------------------------
class _LitNetOrdered(_LitNetVal):
    """Training batches in a fixed order, so the callback and a direct run_ptq calibrate on the same batches."""

    def train_dataloader(self):
        return _loader(self.x, self.y, 32)


def test_callback_recipe_gives_run_ptqs_report_and_logs_its_name(tmp_path):
    import yaml

    bits = ("w4a4", "w3a3")
    cb = PostTrainingQuantization(bits=bits, calib_batches=2, progress=False, print_report=False, recipe="practical")
    lit = _LitNetOrdered()
    trainer = _trainer(tmp_path, cb)
    trainer.fit(lit)
    rep = run_ptq(lit, lit.train_dataloader(), lit.val_dataloader(), bits=bits, calib_batches=2, progress=False,
                  recipe="practical")
    got = cb.report
    assert got is not None and got.recipe == rep.recipe == RECIPES["practical"].to_dict()
    assert [(r.bits, r.recipe, r.bn_reestimated, r.top1, r.top5) for r in got.rows] == [
        (r.bits, "practical", True, r.top1, r.top5) for r in rep.rows]
    assert got.fp_top1 == rep.fp_top1 and (got.observer, got.act_observer) == ("mse", "percentile")
    # the recipe is among the hyperparameters the callback logs (before the fit, and the report's after it)
    hp = yaml.safe_load((Path(trainer.log_dir) / "hparams.yaml").read_text())
    assert (hp["ptq/recipe"], hp["ptq/observer"], hp["ptq/act_observer"], hp["ptq/bn_reestimate"]) == (
        "practical", "mse", "percentile", True)


def test_deprecated_recipe_arguments_warn_and_equal_the_recipe(trained):
    net, (x, y), (xe, ye) = trained
    calib, ev = _loader(x, y, 64), _loader(xe, ye, 128)
    common = {"bits": ("w4a4",), "calib_batches": 2, "progress": False, "print_report": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe spelling warns about nothing
        new = PostTrainingQuantization(**common, recipe=PTQRecipe.preset("practical", bn_batches=3))
    with pytest.warns(FutureWarning, match=r"PostTrainingQuantization\(observer=.*deprecated") as rec:
        old = PostTrainingQuantization(**common, observer="mse", act_observer="percentile", bn_reestimate=True,
                                       bn_batches=3)
    assert len(rec) == 1 and rec[0].filename == __file__  # pointed at the caller
    # without a recipe the old arguments make a recipe named "custom" (as run_ptq's do), with the same fields
    assert old.recipe == new.recipe.replace(name="custom")
    assert (old.observer, old.act_observer, old.bn_reestimate, old.bn_batches) == ("mse", "percentile", True, 3)
    a, b = old.run(net, calib, ev), new.run(net, calib, ev)
    assert (a.row("w4a4").top1, a.row("w4a4").top5) == (b.row("w4a4").top1, b.row("w4a4").top5)
    assert a.row("w4a4").recipe == "custom" and b.row("w4a4").recipe == "practical" and a.bn_batches == b.bn_batches == 3
    # given with a recipe, they replace its fields and keep its name
    with pytest.warns(FutureWarning, match=r"PostTrainingQuantization\(bn_batches="):
        over = PostTrainingQuantization(recipe="reconstruct", bn_batches=5)
    assert over.recipe == PTQRecipe.preset("reconstruct", bn_batches=5)


@pytest.mark.parametrize(
    "recipe, match",
    [
        ("practcal", r"unknown PTQ recipe 'practcal'; the presets are \['minmax', 'practical', 'reconstruct'\]"),
        ({"name": "practcal"}, r"unknown PTQ recipe 'practcal'"),
        ({"name": "reconstruct", "drop_prob": 2}, r"Reconstruction.drop_prob must be in \[0, 1\]"),
        ({"name": "practical", "iter": 5}, r"unknown PTQ recipe setting\(s\) \['iter'\]"),
        ({"observer": "kl"}, r"PTQRecipe.observer must be one of"),
        (4, r"recipe must be a PTQRecipe, a preset name or a mapping"),
    ],
)
def test_bad_recipe_fails_at_construction(recipe, match):
    with pytest.raises(ValueError, match=match):
        PostTrainingQuantization(recipe=recipe)


def test_recipe_from_a_hydra_node():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"name": "reconstruct", "iters": 20, "blocks": ["features.*"], "beta": [10, 1]})
    cb = PostTrainingQuantization(recipe=node)
    assert cb.recipe == PTQRecipe.preset("reconstruct", iters=20, blocks=("features.*",), beta=(10.0, 1.0))
    assert cb.settings()["ptq/recipe"] == "reconstruct" and cb.settings()["ptq/reconstruction/iters"] == 20
    assert PostTrainingQuantization().recipe == RECIPES["minmax"]  # the default


def test_callback_budget_and_sensitivity_reach_the_report_files_and_loggers(tmp_path):
    """budget=: a '<bits>-mixed' row with the plan in the report; sensitivity_bits=: sensitivity.* beside the
    report and its Spearman/per-layer values in the loggers."""
    cb = PostTrainingQuantization(bits="w4a4", calib_batches=2, progress=False, print_report=False, budget=3.5,
                                  bits_choices="2,4,8", plan_images=64, sensitivity_bits=4, sensitivity_images=64)
    trainer = _trainer(tmp_path, cb)
    trainer.fit(_LitNetVal())
    out = Path(trainer.log_dir)
    rep = PTQReport.from_json(out / "ptq_report.json")
    assert rep.bits == ["w4a4", "w4a4-mixed"] and rep.plan["budget"] == 3.5
    assert {"sensitivity.json", "sensitivity.md", "sensitivity.png"} <= {p.name for p in out.iterdir()}
    assert cb.sensitivity is not None and set(cb.sensitivity.spearman) == {"weight4", "act4"}
    with open(out / "metrics.csv") as f:
        logged = {k for r in csv.DictReader(f) for k, v in r.items() if v not in ("", None)}
    assert any(k.startswith("sensitivity/weight4/") and k.endswith("/predicted") for k in logged)
    with pytest.raises(ValueError, match="sensitivity_bits must be None or an int in"):
        PostTrainingQuantization(sensitivity_bits=1)
    with pytest.raises(ValueError, match="budget must be None or a number"):
        PostTrainingQuantization(budget="3")
