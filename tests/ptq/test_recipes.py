"""PTQ recipes beyond min-max: separate weight/activation observers and per-bit-width BN re-estimation,
in run_ptq, the PostTrainingQuantization callback, the Hydra ``ptq`` group and flatq-ptq."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatq_lightning import PostTrainingQuantization, PTQRecipe, run_ptq
from flatq_lightning.quant import QuantTarget, quantize_model, reestimate_bn
from tests.helpers import SmallConvNet, blob_data, train_small


@pytest.fixture(scope="module")
def net_and_data():
    torch.manual_seed(0)
    x, y = blob_data(256, seed=0)
    net = train_small(SmallConvNet(), x, y, steps=40)
    for m in net.modules():  # statistics that no longer fit the data (as after training under noise)
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.mul_(30.0)
            m.running_mean.add_(1.0)
    xe, ye = blob_data(128, seed=1)
    return net.eval(), DataLoader(TensorDataset(x, y), batch_size=32), DataLoader(TensorDataset(xe, ye), batch_size=64)


def test_run_ptq_recipe_is_in_the_report_and_matches_quantize_model(net_and_data):
    net, calib, ev = net_and_data
    rep = run_ptq(net, calib, ev, bits=("w4a4",), calib_batches=2, observer="mse", act_observer="percentile",
                  bn_reestimate=True, bn_batches=4, progress=False)
    assert rep.observer == "mse" and rep.act_observer == "percentile" and rep.bn_reestimate and rep.bn_batches == 4
    assert rep.rows[0].bn_reestimated
    assert "re-estimated per bit-width" in rep.policy_line() and "activation observer=percentile" in rep.policy_line()
    # the same recipe by hand, through the core, gives the same accuracy
    t = QuantTarget.preset("w4a4", "mse", act_observer="percentile")
    calib_x = [b for b, _ in list(calib)[:2]]
    bn_x = [b for b, _ in list(calib)[:4]]
    q = quantize_model(net, t, calib_batches=calib_x, fold_bn=True, bn_reestimate=True, bn_batches=bn_x)
    xe, ye = ev.dataset.tensors
    with torch.no_grad():
        top1 = float((q(xe).argmax(1) == ye).float().mean()) * 100
    assert rep.rows[0].top1 == pytest.approx(top1, abs=1e-6)


def test_bn_reestimation_row_differs_from_the_plain_row(net_and_data):
    net, calib, ev = net_and_data
    plain = run_ptq(net, calib, ev, bits=("w8a8",), calib_batches=2, progress=False)
    re = run_ptq(net, calib, ev, bits=("w8a8",), calib_batches=2, bn_reestimate=True, bn_batches=8, progress=False)
    assert not plain.rows[0].bn_reestimated and "no re-estimation" in plain.policy_line()
    # at 8 bits the re-estimated statistics are those of the data: the row recovers the clean-BN accuracy
    clean = run_ptq(_reestimated(net, calib), calib, ev, bits=("w8a8",), calib_batches=2, progress=False)
    assert re.rows[0].top1 == pytest.approx(clean.rows[0].top1, abs=2.0)
    assert re.rows[0].top1 > plain.rows[0].top1


def _reestimated(net: nn.Module, loader) -> nn.Module:
    import copy

    c = copy.deepcopy(net)
    reestimate_bn(c, loader)
    return c


def test_evaluate_fp_false_skips_the_fp_pass(net_and_data):
    net, calib, ev = net_and_data
    rep = run_ptq(net, calib, ev, bits=("w8a8",), calib_batches=1, progress=False, evaluate_fp=False)
    assert rep.fp_top1 != rep.fp_top1 and rep.rows[0].top1 > 0 and rep.num_eval_samples == 128


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"act_observer": "median"}, "act_observer must be one of"),
        ({"bn_reestimate": "yes"}, "bn_reestimate must be True or False"),
        ({"bn_batches": 0}, "bn_batches must be a positive int"),
    ],
)
def test_bad_recipe_arguments(net_and_data, kwargs, match):
    net, calib, ev = net_and_data
    with pytest.raises(ValueError, match=match):
        run_ptq(net, calib, ev, bits=("w8a8",), calib_batches=1, progress=False, **kwargs)
    with pytest.raises(ValueError, match=match):
        PostTrainingQuantization(**kwargs)


def test_callback_passes_the_recipe(net_and_data, monkeypatch):
    import flatq_lightning.ptq.callback as cbmod

    seen = {}

    def fake_run_ptq(*args, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(cbmod, "run_ptq", fake_run_ptq)
    cb = PostTrainingQuantization(recipe=PTQRecipe.preset("practical", bn_batches=5))
    net, calib, ev = net_and_data
    with pytest.raises(RuntimeError, match="stop"):
        cb.run(net, calib, ev, bn_transform=torch.flip)
    assert seen["recipe"] == PTQRecipe("practical", "mse", "percentile", True, 5)
    assert not {"observer", "act_observer", "bn_reestimate", "bn_batches"} & set(seen)  # no deprecated keyword
    assert seen["bn_transform"] is torch.flip


def test_hydra_ptq_group_and_flatq_ptq_take_the_recipe(tmp_path, capsys):
    from flatq_lightning.app import ptq_cli
    from flatq_lightning.app.train import run
    from tests.app.test_train import TINY, _compose

    cfg = _compose([*TINY, "variants=null", "callbacks=[ptq,checkpoint]", "ptq.progress=false", "ptq.bits=[w4a4]",
                    "ptq/recipe=practical", "+ptq.recipe.bn_batches=2", "+ptq.recipe.placement=onnxruntime"])
    res = run(cfg, tmp_path)
    main = res["variants"]["main"]
    rep = json.loads(next(Path(tmp_path).rglob("ptq_report.json")).read_text())
    assert rep["bn_reestimate"] and rep["act_observer"] == "percentile" and rep["observer"] == "mse"
    assert rep["rows"][0]["bn_reestimated"] and rep["bn_batches"] == 2 and rep["rows"][0]["recipe"] == "practical"
    assert rep["recipe"]["placement"] == "onnxruntime"
    out = tmp_path / "cli"
    rc = ptq_cli.main([main["checkpoint"], "--bits", "w4a4", "--calib-batches", "1", "--no-progress", "--device", "cpu",
                       "--save-dir", str(out), "--recipe", "practical", "--bn-batches", "2", "--placement", "onnxruntime"])
    assert rc == 0
    cli = json.loads((out / "ptq_report.json").read_text())
    assert cli["bn_reestimate"] and cli["act_observer"] == "percentile" and cli["bn_batches"] == 2
    assert cli["recipe"] == PTQRecipe.preset("practical", bn_batches=2, placement="onnxruntime").to_dict()
    # no DNQ noise in this fit: there is no second (noisy) BN set to start from
    rc = ptq_cli.main([main["checkpoint"], "--bits", "w4a4", "--calib-batches", "1", "--no-progress", "--device", "cpu",
                       "--save-dir", str(tmp_path / "cli2"), "--bn-stats", "noisy"])
    assert rc == 2 and "flatq_noisy_bn" in capsys.readouterr().err


def test_flatq_ptq_starts_from_the_noisy_statistics_of_a_dnq_checkpoint(tmp_path):
    import torch

    from flatq_lightning.app import ptq_cli
    from flatq_lightning.app.train import run
    from tests.app.test_train import TINY, _compose

    cfg = _compose([*TINY, "variants=null", "callbacks=[dnq,checkpoint]", "ptq.bits=[w8a8]", "quant=w2a4",
                    "callbacks.dnq.stats_every=1", "callbacks.dnq.clean_bn_batches=2"])
    ckpt = run(cfg, tmp_path)["variants"]["main"]["checkpoint"]
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["flatq_noisy_bn"]  # the DNQ checkpoint carries the second set
    outs = {}
    for which in ("clean", "noisy"):
        out = tmp_path / which
        rc = ptq_cli.main([ckpt, "--bits", "w8a8", "--calib-batches", "1", "--no-progress", "--device", "cpu",
                           "--save-dir", str(out), "--bn-stats", which])
        assert rc == 0
        outs[which] = json.loads((out / "ptq_report.json").read_text())
    assert outs["noisy"]["num_eval_samples"] == outs["clean"]["num_eval_samples"] == 32


def test_flatq_ptq_bn_stats_picks_the_set_it_quantizes(tmp_path, monkeypatch):
    """What --bn-stats selects is what run_ptq receives: the state_dict's clean set or the checkpoint's noisy one."""
    import torch

    import flatq_lightning
    from flatq_lightning.app import ptq_cli
    from flatq_lightning.app.train import run
    from flatq_lightning.quant import bn_state
    from tests.app.test_train import TINY, _compose

    cfg = _compose([*TINY, "variants=null", "callbacks=[dnq,checkpoint]", "ptq.bits=[w8a8]", "quant=w2a4",
                    "callbacks.dnq.stats_every=1", "callbacks.dnq.clean_bn_batches=2"])
    ckpt = run(cfg, tmp_path)["variants"]["main"]["checkpoint"]
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    got = {}

    def capture(module, *a, **k):
        got.update({n: b["running_var"] for n, b in bn_state(module).items()})
        raise ValueError("captured")

    monkeypatch.setattr(flatq_lightning.ptq.runner, "run_ptq", capture)
    for which in ("clean", "noisy"):
        got.clear()
        assert ptq_cli.main([ckpt, "--bits", "w8a8", "--no-progress", "--device", "cpu", "--save-dir",
                             str(tmp_path / which), "--bn-stats", which]) == 2
        name = next(iter(got))
        want = raw["flatq_noisy_bn"][name]["running_var"] if which == "noisy" else raw["state_dict"][f"{name}.running_var"]
        assert torch.equal(got[name], want), which
    assert not torch.equal(raw["flatq_noisy_bn"][name]["running_var"], raw["state_dict"][f"{name}.running_var"])
