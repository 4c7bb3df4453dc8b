"""flatq-ptq: options, defaults in --help, errors before any work, the PTQ recipe flags (end to end on a checkpoint:
tests/app)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flatq_lightning import PTQRecipe
from flatq_lightning.app import ptq_cli
from flatq_lightning.quant import Reconstruction
from tests.untrusted import Exploit


def test_flatq_ptq_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        ptq_cli.main(["--help"])
    out = capsys.readouterr().out
    assert "comma-separated presets (default: w8a8,w4a8,w4a4,w3a3,w2a4)" in out
    assert "calibration batches (default: 32)" in out and "--overwrite" in out


def test_flatq_ptq_errors(tmp_path, capsys):
    assert ptq_cli.main([str(tmp_path / "missing.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ptq_cli.main(["x.ckpt", "--observer", "bogus"])


# --- the PTQ recipe: --recipe and the flags that replace its fields -------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny ImageClassifier checkpoint (synthetic 8x8 data, one short epoch), written by flatq-train."""
    from flatq_lightning.app.train import run
    from tests.app.test_train import TINY, _compose

    out = tmp_path_factory.mktemp("fit")
    cfg = _compose([*TINY, "variants=null", "callbacks=[checkpoint]", "ptq.bits=[w8a8]", "ptq.progress=false"])
    return run(cfg, out)["variants"]["main"]["checkpoint"]


def _argv(ckpt, out, *extra):
    return [ckpt, "--bits", "w4a4,w3a3", "--calib-batches", "2", "--no-progress", "--device", "cpu",
            "--save-dir", str(out), *extra]


def test_flatq_ptq_recipe_reconstruct_reports_the_recipe_and_each_block(checkpoint, tmp_path, capsys):
    out = tmp_path / "rec"
    rc = ptq_cli.main(_argv(checkpoint, out, "--recipe", "reconstruct", "--recon-iters", "5", "--recon-images", "32",
                            "--recon-batch-size", "8", "--drop-prob", "0.25", "--recon-seed", "3", "--bn-batches", "2"))
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "ptq_report.json").read_text())
    assert (rep["recipe"]["name"], rep["recipe"]["observer"], rep["recipe"]["act_observer"]) == (
        "reconstruct", "mse", "percentile")
    assert rep["recipe"]["bn_reestimate"] and rep["recipe"]["bn_batches"] == 2
    rec = rep["recipe"]["reconstruction"]
    assert (rec["iters"], rec["calib_images"], rec["batch_size"], rec["drop_prob"], rec["seed"]) == (5, 32, 8, 0.25, 3)
    assert rec["lr_round"] == Reconstruction().lr_round  # a field not given: the preset's
    for row in rep["rows"]:
        assert row["recipe"] == "reconstruct" and row["bn_reestimated"]
        # one entry per block of the small CNN (each of its quantized layers: 3 convs and the classifier), each
        # reconstructed for the 5 steps asked, with its output MSE after reconstruction and after round-to-nearest
        blocks = row["reconstruction"]
        assert [b["name"] for b in blocks] == [la["name"] for la in row["layers"]] == [
            "features.0", "features.3", "features.6", "fc"]
        assert all(b["iters"] == 5 and b["loss"] >= 0 and b["loss_rtn"] >= 0 for b in blocks)


def test_flatq_ptq_default_recipe_is_minmax_and_flags_replace_fields(checkpoint, tmp_path, monkeypatch):
    """What reaches run_ptq: ``recipe=`` only (no deprecated keyword), the preset with the flags laid over it."""
    import flatq_lightning

    seen = []

    def capture(*a, **kw):
        seen.append(kw)
        raise ValueError("captured")

    monkeypatch.setattr(flatq_lightning.ptq.runner, "run_ptq", capture)
    cases = [
        ((), PTQRecipe.preset("minmax")),
        (("--observer", "mse", "--bn-reestimate"), PTQRecipe.preset("minmax", observer="mse", bn_reestimate=True)),
        (("--recipe", "practical", "--no-bn-reestimate", "--act-observer", "minmax"),
         PTQRecipe.preset("practical", bn_reestimate=False, act_observer="minmax")),
        # a reconstruction flag on a recipe without reconstruction turns it on, the preset defaults for the rest
        (("--recipe", "practical", "--recon-iters", "7"),
         PTQRecipe("practical", "mse", "percentile", True, 32, Reconstruction(iters=7))),
    ]
    for flags, want in cases:
        assert ptq_cli.main(_argv(checkpoint, tmp_path / "x", *flags)) == 2
        kw = seen.pop()
        assert kw["recipe"] == want, flags
        assert not {"observer", "act_observer", "bn_reestimate", "bn_batches"} & set(kw)


def test_flatq_ptq_bad_recipe_flags_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")  # never read: the flags fail first
    with pytest.raises(SystemExit) as ei:
        ptq_cli.main([str(ckpt), "--recipe", "bogus"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "flatq-ptq: error: argument --recipe: invalid choice: 'bogus' (choose from 'minmax', 'practical', "
        "'reconstruct') (flatq-ptq --help lists the options)"
    ]
    assert ptq_cli.main([str(ckpt), "--drop-prob", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "flatq-ptq: error: --drop-prob 2.0: Reconstruction.drop_prob must be in [0, 1] (the probability of keeping "
        "an activation in float), got 2.0"
    ]
    assert ptq_cli.main([str(ckpt), "--recipe", "reconstruct", "--bn-batches", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "flatq-ptq: error: --bn-batches 0: PTQRecipe.bn_batches must be a positive int, got 0"
    ]


def test_flatq_ptq_help_lists_the_recipes(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        ptq_cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--recipe {minmax,practical,reconstruct}" in out and "(default: minmax)" in out
    assert ("--drop-prob DROP_PROB block reconstruction: QDrop probability of keeping an activation in float "
            "(default: the recipe's) --recon-seed") in out
    assert "--bn-reestimate, --no-bn-reestimate re-estimate BatchNorm statistics" in out


# --- per-layer sensitivity and the mixed-precision plan: --sensitivity, --budget, --bits-choices --------------


def test_flatq_ptq_budget_adds_mixed_rows_and_sensitivity_files(checkpoint, tmp_path, capsys):
    out = tmp_path / "mp"
    rc = ptq_cli.main(_argv(checkpoint, out, "--budget", "3.5", "--bits-choices", "2,4,8", "--plan-images", "64",
                            "--sensitivity", "--sensitivity-bits", "4", "--sensitivity-images", "64",
                            "--export", "safetensors"))
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "mixed-precision plan at 3.5 bits per weight" in printed.out and "per-layer sensitivity at 4" in printed.out
    rep = json.loads((out / "ptq_report.json").read_text())
    assert [r["bits"] for r in rep["rows"]] == ["w4a4", "w3a3", "w4a4-mixed", "w3a3-mixed"]
    plan = rep["plan"]
    assert plan["budget"] == 3.5 and plan["bits_per_weight"] <= 3.5 and set(plan["bits"].values()) <= {2, 4, 8}
    names = list(plan["bits"])
    assert plan["bits"][names[0]] == plan["bits"][names[-1]] == 8  # first and last kept at 8, as the uniform rows
    mixed = next(r for r in rep["rows"] if r["bits"] == "w3a3-mixed")
    assert {layer["name"]: layer["weight_bits"] for layer in mixed["layers"] if layer["weight_bits"]} == plan["bits"]
    assert "Mixed-precision plan" in (out / "ptq_report.md").read_text()
    sens = json.loads((out / "sensitivity.json").read_text())
    assert {(r["side"], r["bits"]) for r in sens["rows"] if r["top1_drop"] is not None} == {("weight", 4), ("act", 4)}
    assert (out / "sensitivity.png").exists() and (out / "quantized_w3a3-mixed.safetensors").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (("--budget", "1.5"), "below the smallest allowed width"),
    (("--budget", "9"), "above the largest allowed width"),
    (("--budget", "3", "--bits-choices", "2,x"), "--bits-choices"),
    (("--budget", "3", "--plan-images", "0"), "--plan-images must be a positive number"),
])
def test_flatq_ptq_bad_budgets_are_one_line(checkpoint, tmp_path, capsys, extra, message):
    assert ptq_cli.main(_argv(checkpoint, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# -- untrusted and wrong inputs: checkpoints, save directories, data -----------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real flatq-train checkpoint (tiny synthetic job, DNQ + checkpoint callbacks)."""
    from flatq_lightning.app.train import run
    from tests.app.test_train import TINY, _compose

    out = tmp_path_factory.mktemp("ckpt")
    cfg = _compose([*TINY, "variants=null", "callbacks=[dnq,checkpoint]"])
    return Path(run(cfg, out)["variants"]["main"]["checkpoint"])


def _ptq(args: list[str], capsys) -> tuple[int, str]:
    rc = ptq_cli.main([*args, "--calib-batches", "1", "--no-progress", "--device", "cpu", "--bits", "w8a8"])
    return rc, capsys.readouterr().err


def test_flatq_ptq_loads_a_real_checkpoint_with_weights_only(tiny_checkpoint, tmp_path, capsys):
    rc, err = _ptq([str(tiny_checkpoint), "--save-dir", str(tmp_path / "rep")], capsys)
    assert rc == 0, err
    assert (tmp_path / "rep" / "ptq_report.json").is_file()


def test_flatq_ptq_never_runs_code_from_a_crafted_checkpoint(tiny_checkpoint, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ck = torch.load(tiny_checkpoint, weights_only=True)
    ck["hyper_parameters"]["evil"] = Exploit(marker)
    bad = tmp_path / "evil.ckpt"
    torch.save(ck, bad)
    rc, err = _ptq([str(bad), "--save-dir", str(tmp_path / "rep")], capsys)
    assert rc == 2 and not marker.exists()
    assert f"checkpoint {bad}: refusing to load it" in err and "never executes code" in err


def test_flatq_ptq_random_bytes_and_truncated_checkpoints(tiny_checkpoint, tmp_path, capsys):
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    trunc = tmp_path / "trunc.ckpt"
    data = tiny_checkpoint.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    for bad in (noise, trunc):
        rc, err = _ptq([str(bad), "--save-dir", str(tmp_path / "rep")], capsys)
        assert rc == 2 and f"checkpoint {bad}: not a readable PyTorch checkpoint" in err, err


def test_flatq_ptq_save_dir_that_is_a_file_fails_before_the_work(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import flatq_lightning.app.ptq_cli as cli

    f = tmp_path / "a_file"
    f.write_text("x")
    monkeypatch.setattr(cli, "_load_raw", lambda p: pytest.fail("loaded the checkpoint before checking --save-dir"))
    for sd, msg in ((f, "is a file, not a folder"), (f / "sub", "is a file, so the folder cannot be created")):
        rc, err = _ptq([str(tiny_checkpoint), "--save-dir", str(sd)], capsys)
        assert rc == 2 and f"--save-dir {sd}" in err and msg in err


def test_flatq_ptq_data_with_the_wrong_channel_count(tiny_checkpoint, tmp_path, capsys):
    rc, err = _ptq([str(tiny_checkpoint), "--data", "digits", "--save-dir", str(tmp_path / "rep")], capsys)
    assert rc == 2
    assert "--data digits: the data has 1-channel images but the checkpoint's network takes 3 input channels" in err


@pytest.mark.slow
def test_flatq_ptq_budget_and_sensitivity_on_a_cifar_checkpoint(tmp_path, monkeypatch, capsys):
    """`flatq-ptq --recipe practical --sensitivity --budget` on the real kind of input: a ResNet-20 checkpoint that
    flatq-train wrote from a CIFAR-style JPEG zip (residual blocks, BatchNorm, the practical recipe's BN
    re-estimation on augmented training batches)."""
    from flatq_lightning.app.train import run
    from tests.app.test_train import _compose
    from tests.test_benchmarks import _tiny_cifar_zip

    monkeypatch.setenv("FLATQ_CACHE", str(tmp_path / "cache"))
    data = _tiny_cifar_zip(tmp_path)
    cfg = _compose(["data=cifar10", f"data.path={data}", "data.num_workers=0", "data.batch_size=8",
                    "data.eval_batch_size=8", "model=cifar_resnet20", "variants=null", "callbacks=[checkpoint]",
                    "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "ptq.bits=[]", "print_table=false"])
    ckpt = run(cfg, tmp_path / "fit")["variants"]["main"]["checkpoint"]
    out = tmp_path / "mp"
    rc = ptq_cli.main([ckpt, "--bits", "w3a4", "--recipe", "practical", "--bn-batches", "2", "--calib-batches", "2",
                       "--no-progress", "--device", "cpu", "--save-dir", str(out), "--sensitivity",
                       "--sensitivity-images", "16", "--plan-images", "16", "--budget", "3.5"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    rep = json.loads((out / "ptq_report.json").read_text())
    assert [r["bits"] for r in rep["rows"]] == ["w3a4", "w3a4-mixed"] and rep["recipe"]["name"] == "practical"
    plan = rep["plan"]
    assert len(plan["bits"]) == 22 and plan["bits"]["conv1"] == plan["bits"]["fc"] == 8  # 21 convs and the fc
    assert plan["bits_per_weight"] <= 3.5
    sens = json.loads((out / "sensitivity.json").read_text())
    layers = {r["layer"] for r in sens["rows"]}
    assert "layer2.0.shortcut.0" in layers and len(layers) == 22
    assert sens["images"] == 16 and set(sens["spearman"]) == {"weight3", "act3"}
