import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatq_lightning import QuantTarget
from flatq_lightning.app.data import SyntheticDataModule
from flatq_lightning.app.module import ImageClassifier
from flatq_lightning.callbacks.mse import QuantMSEMixin


def _trainer(tmp_path, **kw):
    opts = dict(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=1,
        limit_test_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    opts.update(kw)
    return L.Trainer(**opts)


def _dm(num_classes=6):
    return SyntheticDataModule(
        num_samples=64, val_samples=16, num_classes=num_classes, image_size=8, in_chans=1, batch_size=16
    )


def _clf(**kw):
    args = dict(model="small_cnn", num_classes=6, model_kwargs={"in_chans": 1, "width": 4}, lr=0.05)
    args.update(kw)
    return ImageClassifier(**args)


def test_is_a_quant_mse_lightning_module_with_hparams():
    clf = _clf(mse_weight=0.5, mse_every=2, mse_target="w3a3")
    assert isinstance(clf, QuantMSEMixin) and isinstance(clf, L.LightningModule)
    assert (clf.mse_weight, clf.mse_every, clf.mse_target) == (0.5, 2, QuantTarget.preset("w3a3"))
    assert clf.hparams.mse_target == "w3a3"  # a preset string is a plain hyperparameter
    assert clf.quant_mse_network() is clf.model
    assert clf.hparams.model == "small_cnn" and clf.hparams.model_kwargs == {"in_chans": 1, "width": 4}
    assert clf(torch.randn(3, 1, 8, 8)).shape == (3, 6)


def test_checkpoint_round_trip_rebuilds_the_network(tmp_path):
    clf = _clf()
    trainer = _trainer(tmp_path)
    trainer.fit(clf, datamodule=_dm())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path, map_location="cpu")
    x = torch.randn(4, 1, 8, 8)
    clf.eval(), loaded.eval()
    assert torch.equal(loaded(x), clf(x))
    assert loaded.hparams.lr == 0.05 and loaded.num_classes == 6


def test_module_instance_is_not_saved_and_must_be_passed_again(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    clf = ImageClassifier(net, num_classes=5)
    assert "model" not in clf.hparams and clf.model is net and clf.num_classes == 5
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(clf, datamodule=_dm(num_classes=5))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    with pytest.raises(TypeError):
        ImageClassifier.load_from_checkpoint(tmp_path / "m.ckpt")
    again = ImageClassifier.load_from_checkpoint(
        tmp_path / "m.ckpt", model=nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    )
    assert torch.equal(again.model[1].weight, net[1].weight)


def test_metrics_are_logged_per_stage(tmp_path):
    clf = _clf()
    trainer = _trainer(tmp_path, max_steps=-1, max_epochs=1, limit_train_batches=2)
    dm = _dm()
    trainer.fit(clf, datamodule=dm)
    for key in ("train/loss", "train/acc", "val/acc", "val/acc5", "val/loss"):
        assert key in trainer.callback_metrics, key
    out = trainer.test(clf, datamodule=dm, verbose=False)[0]
    assert {"test/acc", "test/acc5", "test/loss"} <= set(out)
    assert 0.0 <= out["test/acc"] <= out["test/acc5"] <= 1.0
    # separate metric objects per stage
    assert clf.val_acc is not clf.test_acc and clf.val_acc5 is not clf.test_acc5


def test_no_top5_below_five_classes():
    clf = _clf(num_classes=3)
    assert not clf.top5 and not hasattr(clf, "val_acc5")


def test_training_step_adds_the_mse_term_only_when_on():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 6, (8,))
    for w in (0.0, 10.0):
        torch.manual_seed(0)
        clf = _clf(mse_weight=w, mse_target="w2a2")
        clf.train()
        with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached
            loss = clf.training_step((x, y), 0)
        ce = F.cross_entropy(clf.model(x), y)
        if w == 0.0:
            torch.testing.assert_close(loss, ce)
        else:
            assert loss > ce + 1e-4
        loss.backward()


class _FakeTrainer(SimpleNamespace):
    pass


def _optimizers(clf, total=100):
    clf._trainer = _FakeTrainer(estimated_stepping_batches=total)
    try:
        return clf.configure_optimizers()
    finally:
        clf._trainer = None


def test_sgd_nesterov_with_weight_decay_only_on_matrices():
    out = _optimizers(_clf(optimizer="sgd", scheduler="none", weight_decay=1e-3))
    assert isinstance(out, torch.optim.SGD) and out.defaults["nesterov"] and out.defaults["momentum"] == 0.9
    decay, no_decay = out.param_groups
    assert decay["weight_decay"] == 1e-3 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    out = _optimizers(_clf(scheduler="none", decay_norm_and_bias=True))
    assert len(out.param_groups) == 1


def test_adamw_cosine_warmup_schedule():
    clf = _clf(
        optimizer="adamw",
        scheduler="cosine",
        lr=1e-3,
        warmup_fraction=0.1,
        min_lr_ratio=0.1,
        betas=(0.8, 0.9),
    )
    out = _optimizers(clf, total=100)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)
    assert out["lr_scheduler"]["interval"] == "step"
    f = sched.lr_lambdas[0]
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_onecycle_schedule():
    out = _optimizers(_clf(scheduler="onecycle", lr=0.2, warmup_fraction=0.2), total=50)
    sched = out["lr_scheduler"]["scheduler"]
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR) and sched.total_steps == 50
    opt = out["optimizer"]
    lrs = []
    for _ in range(49):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(0.2, rel=1e-3) and lrs.index(max(lrs)) == 9


def test_sam_rho_wraps_the_optimizer_and_runs_two_passes_per_step(tmp_path):
    from flatq_lightning.callbacks.sam import SAM

    out = _optimizers(_clf(scheduler="none", sam_rho=0.05, weight_decay=1e-3))
    assert isinstance(out, SAM) and isinstance(out.base_optimizer, torch.optim.SGD)
    assert out.defaults["rho"] == 0.05 and out.base_optimizer.defaults["nesterov"]
    assert [g["weight_decay"] for g in out.param_groups] == [1e-3, 0.0]  # the same groups as plain SGD
    out = _optimizers(_clf(optimizer="adamw", scheduler="cosine", sam_rho=0.1, sam_adaptive=True), total=10)
    assert isinstance(out["optimizer"], SAM) and isinstance(out["optimizer"].base_optimizer, torch.optim.AdamW)
    assert out["optimizer"].defaults["adaptive"] is True

    finals = {}
    for rho in (0.0, 0.05):
        torch.manual_seed(0)
        clf = _clf(scheduler="none", sam_rho=rho)
        calls = []
        step = clf.training_step
        clf.training_step = lambda *a, _s=step, _c=calls, **k: _c.append(1) or _s(*a, **k)
        _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(clf, datamodule=_dm())
        assert len(calls) == (6 if rho else 3)
        finals[rho] = torch.cat([p.detach().flatten() for p in clf.parameters()])
    assert not torch.allclose(finals[0.0], finals[0.05])


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"scheduler": "step"}, "scheduler must be one of"),
        ({"mse_target": "int4"}, "cannot parse bit-width preset"),
        ({"mse_target": 4}, "mse_target must be a QuantTarget or a preset string like 'w4a4', got 4"),
        ({"mse_every": 0}, "mse_every"),
        ({"mse_weight": -1.0}, "mse_weight"),
        ({"lr": 0.0}, "lr must be"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"sam_rho": -0.1}, "sam_rho"),
        ({"sam_rho": float("nan")}, "sam_rho"),
        ({"model": "nonexistent_net"}, "unknown model"),
    ],
)
def test_argument_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _clf(**kw)


@pytest.mark.slow
def test_readme_add_dnq_to_any_trainer_snippet_runs(tmp_path, monkeypatch):
    """The README's "Add DNQ to any Trainer" block, run as written on a tiny model and data."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"### Add DNQ to any Trainer\s+```python\n(.*?)```", readme, re.S)
    assert block, "README lost its 'Add DNQ to any Trainer' example"
    code = block.group(1).replace("max_epochs=30", "max_epochs=1, enable_progress_bar=False, logger=False")
    # the recipe as written, with 5 reconstruction steps per block instead of 500 (the tiny data has 64 images)
    code = code.replace('recipe="reconstruct"', 'recipe={"name": "reconstruct", "iters": 5, "calib_images": 64}')
    assert "calib_images" in code, "README's example no longer uses recipe=\"reconstruct\": update this test"
    monkeypatch.chdir(tmp_path)
    ns = {"model": _clf(scheduler="none"), "dm": _dm()}
    exec(compile(code, "README.md", "exec"), ns)
    trainer = ns["trainer"]
    assert trainer.global_step > 0
    ptq = next(c for c in trainer.callbacks if type(c).__name__ == "PostTrainingQuantization")
    assert {r.bits for r in ptq.report.rows} == {"w8a8", "w4a4", "w3a3", "w2a4"}
    assert all(r.recipe == "reconstruct" and r.reconstruction for r in ptq.report.rows)


def test_hydra_model_pretrained_file_reaches_the_module(tmp_path):
    import timm
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from flatq_lightning.app.train import CONF_DIR, _instantiate

    src = timm.create_model("test_resnet")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=imagenet_resnet50_dnq", "model.name=test_resnet",
                                          f"model.pretrained_file={tmp_path / 'w.pth'}"])
    assert cfg.module.pretrained_file == str(tmp_path / "w.pth")
    module = _instantiate(cfg.module, "module", num_classes=3, model_kwargs={})
    assert torch.equal(module.model.conv1[0].weight, src.conv1[0].weight)
    assert module.hparams.pretrained_file == str(tmp_path / "w.pth") and module.num_classes == 3


# -- bad arguments are named ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        ({"momentum": "abc"}, TypeError, r"momentum must be a finite number, got 'abc'"),
        ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\), got 1\.5"),
        ({"lr": "fast"}, TypeError, r"lr must be a finite number, got 'fast'"),
        ({"weight_decay": float("nan")}, TypeError, r"weight_decay must be a finite number"),
        ({"nesterov": "no"}, TypeError, r"nesterov must be True or False, got 'no'"),
    ],
)
def test_image_classifier_names_the_bad_argument(kwargs, exc, msg):
    from flatq_lightning.app.module import ImageClassifier

    with pytest.raises(exc, match=msg):
        ImageClassifier("small_cnn", num_classes=3, **kwargs)
