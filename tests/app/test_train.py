"""The Hydra application (flatq-train), its configs, the multirun summary and flatq-ptq."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from flatq_lightning import QuantSpec, QuantTarget
from flatq_lightning.app import ptq_cli
from flatq_lightning.app.config import quant_target
from flatq_lightning.app.train import (
    CONF_DIR,
    ConfigError,
    _instantiate,
    _variants,
    comparison_table,
    group_options,
    instantiate_callbacks,
    model_kwargs,
    run,
    summarize_sweep,
    validate_config,
)
from tests.helpers import SUBPROCESS_TIMEOUT_S

REPO = Path(__file__).resolve().parents[2]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


HAS_SUBMITIT = _has_module("hydra_plugins.hydra_submitit_launcher")
HAS_TENSORBOARD = _has_module("tensorboard")
EXPERIMENTS = [
    "quickstart",
    "cifar10_resnet20_plain",
    "cifar10_resnet20_dnq",
    "cifar10_resnet20_dnq_w3a3",
    "cifar10_resnet20_sam",
    "imagenet_resnet50_dnq",
    "imagenet_vit_b16_dnq",
]
# a tiny, fast job: synthetic 8x8 data, a 4-wide small CNN, one short epoch
TINY = [
    "data=synthetic",
    "data.num_samples=64",
    "data.val_samples=32",
    "data.image_size=8",
    "data.batch_size=16",
    "model=small_cnn",
    "model.kwargs.width=4",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "ptq.bits=[w8a8,w4a4]",
    "ptq.calib_batches=1",
    "print_table=false",
]


def _compose(overrides: list[str] | None = None, hydra_cfg: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides or [], return_hydra_config=hydra_cfg)


def _cli_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    # this checkout's package, whatever the environment has installed (and from any working directory)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _cli(args: list[str], cwd: Path, timeout: float = SUBPROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flatq_lightning.app.train", *args],
        cwd=cwd,
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _cli_to_files(args: list[str], cwd: Path, timeout: float = SUBPROCESS_TIMEOUT_S) -> tuple[int, str, str]:
    """``flatq-train args > out.log 2> err.log`` (files, as a batch job's logs): (exit code, stdout, stderr)."""
    out, err = cwd / "out.log", cwd / "err.log"
    with out.open("w") as fo, err.open("w") as fe:
        r = subprocess.run([sys.executable, "-m", "flatq_lightning.app.train", *args], cwd=cwd, env=_cli_env(),
                           stdout=fo, stderr=fe, timeout=timeout)
    return r.returncode, out.read_text(), err.read_text()


# --- configs ------------------------------------------------------------------------------------------------
def test_config_groups_have_the_documented_options():
    assert set(group_options("model")) >= {
        "cifar_resnet20",
        "cifar_resnet56",
        "small_cnn",
        "resnet18",
        "resnet50",
        "vit_tiny",
        "vit_b16",
    }
    assert set(group_options("data")) >= {"digits", "synthetic", "cifar10", "cifar100", "imagenet"}
    assert set(group_options("trainer")) >= {"cpu", "gpu", "ddp"}
    assert set(group_options("module")) >= {"classifier"}
    assert set(group_options("callbacks")) >= {"dnq", "ptq", "checkpoint", "none"}
    assert set(group_options("quant")) >= {"w8a8", "w4a8", "w4a4", "w3a3", "w2a4"}
    assert set(group_options("experiment")) == set(EXPERIMENTS)


def test_default_is_the_quickstart():
    cfg = _compose()
    assert cfg.experiment_name == "quickstart"
    assert cfg.model.name == "small_cnn" and cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.quant.weight.bits == cfg.quant.act.bits == 4 and cfg.callbacks.dnq.target == cfg.quant
    assert list(cfg.ptq.bits) == ["w8a8", "w4a4", "w3a3", "w2a4"]
    plain, dnq = _variants(cfg)
    assert plain[0] == "plain" and plain[1].callbacks.dnq is None
    assert dnq[0] == "dnq" and dnq[1].callbacks.dnq._target_ == "flatq_lightning.DNQ"
    assert plain[1].seed == dnq[1].seed and plain[1].trainer.max_epochs == dnq[1].trainer.max_epochs


def test_quant_group_sets_the_target_everywhere(tmp_path):
    cfg = _compose(["quant=w3a3", "callbacks=[dnq,ptq]", "quant.keep_first_last_8bit=false", "quant.exclude=[fc]"])
    want = QuantTarget.preset("w3a3", keep_first_last_8bit=False, exclude="fc")
    assert quant_target(cfg) == want
    dnq, ptq = instantiate_callbacks(cfg.callbacks, report_dir=tmp_path)
    assert dnq.target == want and dnq.recorder.name == "w3a3"
    assert ptq.target == want  # PTQ: the same layers and policy (its widths come from ptq.bits)
    module = _instantiate(cfg.module, "module", num_classes=10, model_kwargs={"in_chans": 1})
    assert module.mse_target == want and "mse_target" not in module.hparams  # a target is no hyperparameter


@pytest.mark.parametrize("preset", ["w2a4", "w3a3", "w4a4", "w4a8", "w8a8"])
def test_quant_group_files_hold_the_preset_target(preset):
    cfg = _compose([f"quant={preset}"])
    assert quant_target(cfg) == QuantTarget.preset(preset) and quant_target(cfg).name == preset


def test_quant_spec_fields_from_the_command_line():
    cfg = _compose(["quant=w3a3", "quant.weight.observer=mse", "quant.act.observer=percentile",
                    "quant.act.percentile=99.9", "quant.weight.granularity=per_tensor"])
    validate_config(cfg)
    rec = instantiate_callbacks(cfg.callbacks)[0].recorder
    assert rec.weight_spec == QuantSpec(bits=3, granularity="per_tensor", symmetric=True, observer="mse")
    assert rec.act_spec == QuantSpec.activation(3, observer="percentile", percentile=99.9)
    assert rec.name == "w3a3"
    with pytest.raises(ConfigError, match=r"quant.weight: QuantSpec.observer must be one of"):
        validate_config(_compose(["quant.weight.observer=bogus"]))
    with pytest.raises(ConfigError, match=r"^quant: QuantTarget.keep_first_last_8bit must be True or False"):
        validate_config(_compose(["quant.keep_first_last_8bit=maybe"]))
    # the name comes from the bits: a preset key of its own could say other bits than the specs hold
    assert quant_target(_compose(["quant.weight.bits=3"])).name == "w3a4"
    with pytest.raises(ConfigError, match=r"quant.preset is no longer a setting: the name comes from the bits"):
        validate_config(_compose(["+quant.preset=w3a3"]))
    # the PTQ scope moved into the target, shared with DNQ
    with pytest.raises(ConfigError, match=r"ptq.keep_first_last_8bit is no longer a PTQ setting.*"
                                          r"quant.keep_first_last_8bit="):
        validate_config(_compose(["+ptq.keep_first_last_8bit=false"]))
    # a mixed-precision plan from the command line
    t = quant_target(_compose(["+quant.layer_bits={conv2: [8, 8]}"]))
    assert t.layer_bits == (("conv2", 8, 8),) and t.name == "w4a4-mixed"


def test_trainer_files_inherit_the_default():
    cpu, gpu, ddp = (_compose([f"trainer={t}"]).trainer for t in ("cpu", "gpu", "ddp"))
    shared = ("_target_", "max_epochs", "enable_progress_bar", "enable_model_summary", "num_sanity_val_steps")
    assert {k: cpu[k] for k in shared} == {k: gpu[k] for k in shared} == {k: ddp[k] for k in shared}
    assert (cpu.accelerator, cpu.precision, gpu.accelerator, gpu.precision) == ("cpu", "32-true", "gpu", "bf16-mixed")
    assert {k: v for k, v in ddp.items() if k in gpu and k != "devices"} == {k: v for k, v in gpu.items() if k != "devices"}


def test_command_line_group_overrides_beat_the_experiment():
    cfg = _compose(["experiment=cifar10_resnet20_dnq", "model=cifar_resnet56", "trainer=cpu"])
    assert cfg.model.name == "cifar_resnet56" and cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, tmp_path):
    # no network: pretrained weights off; the GPU trainers are instantiated on the CPU (composition is checked)
    cfg = _compose([f"experiment={experiment}", "model.pretrained=false"])
    assert cfg.experiment_name == experiment
    assert cfg.trainer.accelerator in ("cpu", "gpu")
    validate_config(cfg)
    dm = _instantiate(cfg.data, "data")  # paths are checked in prepare_data/setup, not here
    for _name, vcfg in _variants(cfg):
        kwargs = model_kwargs(vcfg, dm)
        assert kwargs["in_chans"] == dm.in_chans
        if vcfg.model.name.startswith("vit_base"):
            kwargs.update(img_size=32, depth=1)  # keep the test light: the same class, one block
        module = _instantiate(vcfg.module, "module", num_classes=dm.num_classes, model_kwargs=kwargs)
        assert module.num_classes == dm.num_classes
        assert module.mse_target == quant_target(cfg)
        cbs = instantiate_callbacks(vcfg.callbacks, checkpoint_dir=tmp_path)
        names = [type(c).__name__ for c in cbs]
        if vcfg.callbacks.get("dnq") is not None:
            assert names[0] == "DNQ"
            assert [type(c).__name__ for c in cbs[0].parts] == [
                "QuantErrorRecorder",
                "DifferentialNoiseInjection",
                "ActivationNoiseInjection",
            ]
        trainer = _instantiate(
            vcfg.trainer,
            "trainer",
            accelerator="cpu",
            devices=1,
            callbacks=cbs,
            default_root_dir=str(tmp_path),
            logger=False,
        )
        assert trainer.max_epochs == vcfg.trainer.max_epochs


def test_ddp_trainer_config():
    cfg = _compose(["trainer=ddp"])
    t = cfg.trainer
    assert (t.strategy, t.accelerator, t.devices, t.sync_batchnorm) == ("ddp", "gpu", -1, True)
    trainer = _instantiate(
        t, "trainer", accelerator="cpu", devices=1, logger=False, enable_checkpointing=False
    )
    assert type(trainer.strategy).__name__ == "DDPStrategy"


def test_callbacks_none_and_ptq_and_checkpoint(tmp_path):
    assert instantiate_callbacks(_compose(["callbacks=none"]).callbacks) == []
    cfg = _compose(["callbacks=[ptq,checkpoint]", "ptq.bits=[w8a8,w3a3]"])
    cbs = instantiate_callbacks(cfg.callbacks, checkpoint_dir=tmp_path / "ck")
    ptq, ckpt = cbs
    assert type(ptq).__name__ == "PostTrainingQuantization" and ptq.bits == ("w8a8", "w3a3")
    assert ptq.stage == "test"
    assert Path(ckpt.dirpath) == tmp_path / "ck" and ckpt.monitor == "val/acc"


def test_slurm_launcher_config():
    path = CONF_DIR / "launcher" / "slurm.yaml"
    text = path.read_text()
    assert text.startswith("# @package _global_")
    data = yaml.safe_load(text)
    assert {"override /hydra/launcher": "submitit_slurm"} in data["defaults"]
    launcher = data["hydra"]["launcher"]
    assert launcher["gpus_per_node"] == launcher["tasks_per_node"]  # one task per GPU for Lightning DDP
    assert data["trainer"]["devices"] == "${hydra:launcher.gpus_per_node}"
    if not HAS_SUBMITIT:
        pytest.skip("hydra-submitit-launcher is not installed: YAML checked, composition skipped")
    cfg = _compose(["+launcher=slurm", "experiment=imagenet_resnet50_dnq"], hydra_cfg=True)
    assert "submitit" in cfg.hydra.launcher._target_.lower()


def test_hydra_dirs_and_summary_callback():
    cfg = _compose(hydra_cfg=True)
    assert cfg.hydra.run.dir.startswith("outputs/") and cfg.hydra.sweep.dir.startswith("multirun/")
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.callbacks.multirun_summary._target_ == "flatq_lightning.app.train.MultirunSummary"


def test_ptq_recipe_group_composes_and_defaults_to_minmax_everywhere(tmp_path):
    from flatq_lightning import PTQRecipe
    from flatq_lightning.app.train import ptq_recipe
    from flatq_lightning.ptq.recipe import RECIPES

    assert group_options("ptq/recipe") == sorted(RECIPES)
    for name in RECIPES:  # each file names its preset and restates none of its fields
        assert yaml.safe_load((CONF_DIR / "ptq" / "recipe" / f"{name}.yaml").read_text()) == {"name": name}
        assert ptq_recipe(_compose([f"ptq/recipe={name}"])) == RECIPES[name]
    for experiment in EXPERIMENTS:  # every experiment quantizes as before the recipe: min-max
        cfg = _compose([f"experiment={experiment}"])
        assert OmegaConf.to_container(cfg.ptq.recipe) == {"name": "minmax"}
        assert ptq_recipe(cfg) == RECIPES["minmax"] and not {"observer", "act_observer", "bn_reestimate"} & set(cfg.ptq)
    cfg = _compose(["ptq/recipe=reconstruct", "+ptq.recipe.iters=200", "+ptq.recipe.drop_prob=0", "callbacks=[ptq]"])
    want = PTQRecipe.preset("reconstruct", iters=200, drop_prob=0.0)
    assert ptq_recipe(cfg) == want
    (cb,) = instantiate_callbacks(cfg.callbacks, report_dir=tmp_path)  # the callback config takes the same recipe
    assert cb.recipe == want
    assert ptq_recipe(_compose(["+ptq.recipe.observer=mse"])) == PTQRecipe.preset("minmax", observer="mse")


def test_a_mixed_precision_plan_reaches_dnq_and_ptq(tmp_path):
    """``+quant.layer_bits``: one plan for the DNQ recorder (layers of the LightningModule, model.features.3) and
    PTQ (layers of its network, features.3), named by the network's layer."""
    cfg = _compose([*TINY, "variants=null", "ptq.progress=false", "ptq.bits=[w4a4]", "callbacks=[dnq,ptq]",
                    "+quant.layer_bits={features.3: [8, 2]}"])
    res = run(cfg, tmp_path)
    assert res["quant_preset"] == "w4a4-mixed"
    rep = json.loads(Path(res["variants"]["main"]["ptq_report"]).read_text())
    (row,) = rep["rows"]
    assert row["bits"] == "w4a4-mixed"
    assert {r["name"]: (r["weight_bits"], r["act_bits"]) for r in row["layers"]}["features.3"] == (8, 2)
    hp = yaml.safe_load(next(tmp_path.rglob("hparams.yaml")).read_text())
    assert hp["dnq/preset"] == "w4a4-mixed"


def test_ptq_recipe_reaches_run_ptq_and_the_logged_settings(tmp_path, monkeypatch):
    import flatq_lightning
    from flatq_lightning import PTQRecipe

    real, seen = flatq_lightning.run_ptq, []

    def spy(*args, **kw):
        seen.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(flatq_lightning.ptq.runner, "run_ptq", spy)
    cfg = _compose([*TINY, "variants=null", "ptq.progress=false", "ptq/recipe=practical", "+ptq.recipe.bn_batches=2"])
    res = run(cfg, tmp_path)
    (kw,) = seen
    assert kw["recipe"] == PTQRecipe.preset("practical", bn_batches=2)
    assert not {"observer", "act_observer", "bn_reestimate", "bn_batches"} & set(kw)  # no deprecated keyword
    rep = json.loads(Path(res["variants"]["main"]["ptq_report"]).read_text())
    assert [(r["bits"], r["recipe"], r["bn_reestimated"]) for r in rep["rows"]] == [
        ("w8a8", "practical", True), ("w4a4", "practical", True)]
    hp = yaml.safe_load(next(tmp_path.rglob("hparams.yaml")).read_text())
    assert (hp["ptq/recipe"], hp["ptq/observer"], hp["ptq/act_observer"], hp["ptq/bn_batches"]) == (
        "practical", "mse", "percentile", 2)


def test_bad_ptq_recipe_fails_with_the_key():
    with pytest.raises(ConfigError, match=r"^ptq.recipe: unknown PTQ recipe 'practcal'; the presets are"):
        validate_config(_compose(["ptq.recipe.name=practcal"]))
    with pytest.raises(ConfigError, match=r"^ptq.recipe: Reconstruction.drop_prob must be in \[0, 1\]"):
        validate_config(_compose(["ptq/recipe=reconstruct", "+ptq.recipe.drop_prob=2"]))
    with pytest.raises(ConfigError, match=r"^ptq.recipe: unknown PTQ recipe setting\(s\) \['iter'\]"):
        validate_config(_compose(["+ptq.recipe.iter=5"]))
    with pytest.raises(ConfigError, match=r"^variants.dnq: ptq.recipe: PTQRecipe.bn_batches must be a positive int"):
        validate_config(_compose(["+variants.dnq.ptq.recipe.bn_batches=0"]))
    # the keys the recipe replaced are refused, with the way to say the same now
    with pytest.raises(ConfigError, match=r"^ptq.observer is no longer a setting.*ptq/recipe=<name>.*\+ptq.recipe.observer="):
        validate_config(_compose(["+ptq.observer=mse"]))


# --- errors -------------------------------------------------------------------------------------------------
def test_bad_values_fail_with_the_key_and_the_choices():
    with pytest.raises(ConfigError) as ei:
        validate_config(_compose(["model.name=resnet_does_not_exist"]))
    msg = str(ei.value)
    assert "model.name='resnet_does_not_exist'" in msg and "cifar_resnet20" in msg and "timm" in msg
    with pytest.raises(ConfigError, match=r"quant.weight: QuantSpec.bits must be in \[2, 16\], got 1"):
        validate_config(_compose(["quant.weight.bits=1"]))
    with pytest.raises(ConfigError, match="ptq.bits"):
        validate_config(_compose(["ptq.bits=[w8a8,w1a1]"]))
    with pytest.raises(
        ConfigError, match=r"module \(flatq_lightning.app.module.ImageClassifier\): ValueError: optimizer"
    ):
        _instantiate(_compose(["module.optimizer=lamb"]).module, "module", num_classes=10)


def test_config_errors_exit_with_one_clear_line(capsys):
    from flatq_lightning.app.train import _task

    with pytest.raises(SystemExit) as ei:
        _task(_compose(["model.name=nonexistent_net"]))
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("flatq-train: error: model.name='nonexistent_net'") and "Traceback" not in err


@pytest.mark.parametrize(
    "overrides,msg",
    [
        (["trainer.max_epochs=-1"], r"^trainer\.max_epochs=-1 is Lightning's endless training, .*trainer\.max_epochs=N"),
        (["trainer.max_epochs=-2"], r"^trainer\.max_epochs must be a number of epochs >= 0, .*got -2$"),
        (["+trainer.max_steps=-2"], r"^trainer\.max_steps must be -1 \(no step limit\) or a positive .*got -2$"),
        (["+trainer.max_steps=0"], r"^trainer\.max_steps must be -1 .*got 0$"),
        (["+trainer.max_steps=null"], r"^trainer\.max_steps must be -1 .*got None$"),
        (["data.batch_size=0"], r"^data\.batch_size must be a positive integer, got 0$"),
        (["data.batch_size=-8"], r"^data\.batch_size must be a positive integer, got -8$"),
        (["data.eval_batch_size=0"], r"^data\.eval_batch_size must be a positive integer \(or null: .*got 0$"),
        (["trainer.accelerator=foo"], r"^trainer\.accelerator='foo' is not an accelerator Lightning knows: .*'cpu'.*'gpu'"),
        (["+variants.dnq.trainer.max_epochs=-1"], r"^variants\.dnq: trainer\.max_epochs=-1 is Lightning's endless"),
    ],
)
def test_bad_trainer_and_batch_values_fail_before_any_work(overrides, msg, capsys):
    # they used to fail inside the fit (max_epochs=-1, max_steps=0: a traceback from the learning-rate
    # schedule) or after the data was prepared; now validate_config refuses them, and _task prints one line
    from flatq_lightning.app.train import _task

    cfg = _compose(overrides)
    with pytest.raises(ConfigError, match=msg):
        validate_config(cfg)
    with pytest.raises(SystemExit) as ei:
        _task(cfg)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("flatq-train: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_good_trainer_lengths_and_accelerators_pass_validation():
    # a finite run by steps (max_epochs -1 or null with max_steps), no training at all (max_epochs=0), the
    # GPU names (checked by name only: the GPU experiments validate on a CPU machine)
    for overrides in (["trainer.max_epochs=-1", "+trainer.max_steps=3"], ["trainer.max_epochs=null", "+trainer.max_steps=3"],
                      ["trainer.max_epochs=0"], ["trainer.max_epochs=null"], ["trainer.accelerator=gpu"],
                      ["trainer.accelerator=cuda"], ["trainer.accelerator=auto"], ["data.batch_size=1"]):
        validate_config(_compose(overrides))


def test_flatq_train_names_the_two_dnq_config_entries():
    from omegaconf import OmegaConf

    dnq = {"_target_": "flatq_lightning.DNQ", "target": "w4a4"}
    cfg = OmegaConf.create({"dnq": dnq, "dnq2": dnq})
    with pytest.raises(ConfigError, match=r"^callbacks\.dnq and callbacks\.dnq2 are two DNQ callbacks with the same "
                                          r"state key .*\+\+callbacks\.dnq2\.name=\.\.\..*QuantErrorRecorder"):
        instantiate_callbacks(cfg)
    named = instantiate_callbacks(OmegaConf.create({"dnq": dnq, "dnq2": {**dnq, "name": "w4a4_b"}}))
    assert [c.recorder.name for c in named] == ["w4a4", "w4a4_b"]


def test_unknown_group_option_lists_the_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as ei:
        _compose(["model=nonexistent_net"])
    assert "model/nonexistent_net" in str(ei.value) and "cifar_resnet20" in str(ei.value)


def test_cli_missing_data_path_is_one_clear_line(tmp_path):
    missing = tmp_path / "no_such.zip"
    r = _cli(
        [
            "experiment=cifar10_resnet20_plain",
            "trainer=cpu",
            f"data.path={missing}",
            f"hydra.run.dir={tmp_path}/b",
        ],
        cwd=REPO,
    )
    assert r.returncode == 2, r.stderr
    assert (
        "flatq-train: error: data.path" in r.stderr
        and str(missing) in r.stderr
        and "Traceback" not in r.stderr
    )


def test_cli_pretrained_offline_is_one_clear_line(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    r = _cli(
        ["experiment=imagenet_resnet50_dnq", "model.name=test_resnet", "trainer=cpu", f"data.root={image_folder}",
         "data.num_workers=0", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("flatq-train: error: the pretrained weights of 'test_resnet'")
    assert "model.pretrained_file=PATH" in err[-1] and "Traceback" not in r.stderr


# --- runs ---------------------------------------------------------------------------------------------------
def test_quickstart_fast_dev_run(tmp_path, capsys):
    cfg = _compose(["++trainer.fast_dev_run=true", "ptq.calib_batches=1", "print_table=false"])
    res = run(cfg, tmp_path)
    # PTQ progress is on by default; in a log (not a terminal) it is plain lines
    err = capsys.readouterr().err
    assert err.count("PTQ: done, 4 bit-widths in") == 2 and "eval w2a4: done" in err and "\r" not in err
    assert "epoch 1" not in err  # quickstart's trainer.enable_progress_bar=false: no training progress
    assert list(res["variants"]) == ["plain", "dnq"]
    for name, v in res["variants"].items():
        assert set(v["ptq"]) == {"w8a8", "w4a4", "w3a3", "w2a4"}
        assert 0.0 <= v["fp_top1"] <= 100.0
        files = {f.name for f in (tmp_path / name).iterdir()}
        assert {f"ptq_report.{f}" for f in ("json", "md", "csv", "png")} <= files
        assert v["ptq_report"] == str(tmp_path / name / "ptq_report.json")
    assert res["variants"]["plain"]["callbacks"] == []
    assert res["variants"]["dnq"]["callbacks"][0] == "DNQ"
    assert json.loads((tmp_path / "results.json").read_text())["experiment"] == "quickstart"
    md = (tmp_path / "results.md").read_text()
    assert "| bits | plain | dnq |" in md and "| W2A4 |" in md
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["plain", "dnq"] and "w4a4_top1" in rows[0]


@pytest.mark.slow
def test_cli_training_progress_in_a_log_is_plain_lines(tmp_path):
    # the quickstart with the progress bar on, output to files: plain lines, not Lightning's tqdm bar
    rc, out, err = _cli_to_files(
        ["trainer.enable_progress_bar=true", "trainer.max_epochs=2", "+trainer.limit_train_batches=3",
         "+trainer.limit_val_batches=1", "ptq.bits=[w4a4]", "ptq.calib_batches=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )
    assert rc == 0, err[-3000:]
    for text in (out, err):
        assert "\r" not in text and "\x1b[" not in text
    assert err.count("epoch 2/2: done, 3/3 batches in ") == 2, err  # plain and dnq, each with its line per epoch
    line = next(ln for ln in err.splitlines() if ln.startswith("epoch 1/2: done"))
    assert "train/loss_step " in line and "val/acc " in line and "val/loss " in line
    assert err.count("PTQ: done, 1 bit-widths in") == 2 and "| W4A4 |" in out


# the ImageNet experiments as a user runs them (the CLI, the default CSV logger on), on a real ImageFolder:
# timm's tiny test models at 32 px instead of ResNet-50 / ViT-B/16, the CPU trainer instead of DDP
IMAGEFOLDER_TINY = {
    "imagenet_resnet50_dnq": ["model.name=test_resnet"],
    "imagenet_vit_b16_dnq": ["model.name=test_vit", "+model.kwargs.img_size=32"],
}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(IMAGEFOLDER_TINY))
def test_imagenet_experiment_on_an_image_folder(experiment, image_folder, tmp_path):
    out = tmp_path / "run"
    r = _cli(
        [
            f"experiment={experiment}",
            *IMAGEFOLDER_TINY[experiment],
            "model.pretrained=false",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "trainer.log_every_n_steps=1",
            f"data.root={image_folder}",
            "data.image_size=32",
            "data.batch_size=4",
            "data.eval_batch_size=4",
            "data.num_workers=0",
            "ptq.bits=[w4a4]",
            "ptq.calib_batches=1",
            "ptq.calib_batch_size=4",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    main = res["variants"]["main"]
    assert res["experiment"] == experiment and set(main["ptq"]) == {"w4a4"}
    assert main["callbacks"][0] == "DNQ" and Path(main["checkpoint"]).is_file()
    hp = yaml.safe_load(next(out.rglob("hparams.yaml")).read_text())
    assert hp["num_classes"] == 3 and hp["root"] == str(image_folder)
    # the DNQ and PTQ settings are hyperparameters, PTQ accuracies and per-layer SQNR metrics, κ_t per step
    assert hp["dnq/preset"] == "w4a4" and hp["dnq/weight_noise/mode"] == "differential" and hp["ptq/bits"] == "w4a4"
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    cols = {k for r in rows for k, v in r.items() if v not in ("", None)}
    assert {"ptq/w4a4/top1", "dnq/kappa", "dnq/warmup"} <= cols
    assert any(c.startswith("ptq/w4a4/sqnr_db/") and c.endswith("/weight") for c in cols)
    assert {p.name for p in out.glob("ptq_report*")} == {f"ptq_report.{f}" for f in ("json", "md", "csv", "png")}


def test_cifar_experiment_fast_dev_run_on_synthetic_data(tmp_path):
    # the cifar10_resnet20_dnq recipe (empty model.kwargs, cosine schedule, DNQ + MSE) on 32x32 synthetic data
    cfg = _compose(
        [
            "experiment=cifar10_resnet20_dnq",
            "trainer=cpu",
            "data=synthetic",
            "data.num_samples=32",
            "data.val_samples=16",
            "data.batch_size=8",
            "++trainer.fast_dev_run=true",
            "callbacks=[dnq]",
            "ptq.bits=[w4a4]",
            "ptq.calib_batches=1",
            "print_table=false",
        ]
    )
    assert cfg.model.kwargs == {}
    res = run(cfg, tmp_path)
    main = res["variants"]["main"]
    assert main["model"] == "cifar_resnet20" and main["mse_weight"] == 0.0 and set(main["ptq"]) == {"w4a4"}


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
def test_tensorboard_hparams_session_holds_module_data_dnq_and_ptq_settings(tmp_path):
    # trainer.logger=TensorBoardLogger, PTQ run by the app after the fit (no PTQ callback): TensorBoard's HPARAMS
    # view reads the first hparams summary of the run; it holds every setting
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hp_metadata

    tb = tmp_path / "tb"
    cfg = _compose([*TINY, "variants.plain=null", "+trainer.logger._target_=lightning.pytorch.loggers.TensorBoardLogger",
                    f"+trainer.logger.save_dir={tb}", "+trainer.logger.name=tb"])
    run(cfg, tmp_path / "run")
    (log_dir,) = {p.parent for p in tb.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.SummaryMetadata(hp_metadata.SESSION_START_INFO_TAG).plugin_data.content
    session = hp_metadata.parse_session_start_info_plugin_data(content).hparams
    assert {"lr", "optimizer", "num_samples", "dnq/preset", "dnq/weight_noise/mode", "dnq/act_noise/p", "ptq/bits",
            "ptq/observer", "ptq/calib_batches_requested"} <= set(session), sorted(session)
    assert session["ptq/bits"].string_value == "w8a8,w4a4" and session["dnq/preset"].string_value == "w4a4"
    assert session["num_samples"].number_value == 64 and session["lr"].number_value == 0.1


def test_run_with_ptq_callback_and_checkpoint_then_flatq_ptq(tmp_path, capsys):
    cfg = _compose([*TINY, "variants=null", "callbacks=[ptq,checkpoint]", "ptq.progress=false"])
    res = run(cfg, tmp_path)
    main = res["variants"]["main"]
    assert set(main["ptq"]) == {"w8a8", "w4a4"} and main["callbacks"] == [
        "PostTrainingQuantization",
        "ModelCheckpoint",
    ]
    ckpt = Path(main["checkpoint"])
    assert ckpt.is_file() and ckpt.parent == tmp_path / "checkpoints"

    # flatq-ptq rebuilds the synthetic data module from the checkpoint and reports
    out = tmp_path / "ptq_cli"
    rc = ptq_cli.main(
        [
            str(ckpt),
            "--bits",
            "w8a8,w4a4",
            "--calib-batches",
            "1",
            "--no-progress",
            "--save-dir",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    rep = json.loads((out / "ptq_report.json").read_text())
    assert [r["bits"] for r in rep["rows"]] == ["w8a8", "w4a4"] and rep["num_eval_samples"] == 32
    assert rep["fp_top1"] == pytest.approx(main["fp_top1"])  # same network, same test split
    assert (out / "ptq_report.md").is_file() and (out / "ptq_report.csv").is_file()
    assert (out / "ptq_report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| w4a4 |" in capsys.readouterr().out
    # the callback's report is the job's: written once, into the run directory, same file names
    assert main["ptq_report"] == str(tmp_path / "ptq_report.json")
    assert {p.name for p in tmp_path.glob("ptq_report*")} == {f"ptq_report.{f}" for f in ("json", "md", "csv", "png")}

    # a second flatq-ptq run keeps the first report; --overwrite replaces it
    first = (out / "ptq_report.json").read_text()
    argv = [str(ckpt), "--bits", "w4a4", "--calib-batches", "1", "--no-progress", "--save-dir", str(out),
            "--device", "cpu"]
    assert ptq_cli.main(argv) == 0
    assert (out / "ptq_report.json").read_text() == first
    assert json.loads((out / "ptq_report_2.json").read_text())["rows"][0]["bits"] == "w4a4"
    assert "ptq_report_2.json" in capsys.readouterr().out
    assert ptq_cli.main([*argv, "--overwrite"]) == 0
    assert [r["bits"] for r in json.loads((out / "ptq_report.json").read_text())["rows"]] == ["w4a4"]
    assert not (out / "ptq_report_3.json").exists()


@pytest.mark.timeout(900)  # a two-job Hydra sweep in a subprocess; its old fixed subprocess timeouts allowed 600 s
def test_multirun_writes_a_summary_table(tmp_path):
    sweep = tmp_path / "sweep"
    r = _cli(
        ["-m", "quant=w8a8,w4a4", "variants=null", *TINY, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p.parent.name for p in sweep.glob("*/results.json"))
    assert jobs == ["0", "1"]
    md = (sweep / "summary.md").read_text()
    assert "| 0 | quant=w8a8 | main |" in md and "| 1 | quant=w4a4 | main |" in md and "w4a4_top1" in md
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2 and {r["variant"] for r in rows} == {"main"}
    assert all(0.0 <= float(r["w8a8_top1"]) <= 100.0 for r in rows)


def test_sweep_jobs_reuse_a_fit_that_depends_on_nothing_swept(tmp_path, monkeypatch):
    # jobs of one sweep share <sweep dir>/.fits: quickstart's plain variant is fitted in the first job only
    from flatq_lightning.app import train as train_mod

    fitted: list[tuple[str, str]] = []

    def fake_fit(name, cfg, dm, vdir):  # the fit itself is tested elsewhere; here: which fits happen
        fitted.append((name, quant_target(cfg).name))
        return {"fp_top1": 50.0 + len(fitted), "ptq": {}, "fit_seconds": 1.0, "model": str(cfg.model.name)}

    monkeypatch.setattr(train_mod, "_fit_variant", fake_fit)
    monkeypatch.setattr(train_mod, "_sweep_cache_dir", lambda out: tmp_path / ".fits")
    r0 = run(_compose([*TINY, "quant=w8a8"]), tmp_path / "0")
    r1 = run(_compose([*TINY, "quant=w4a4"]), tmp_path / "1")
    assert fitted == [("plain", "w8a8"), ("dnq", "w8a8"), ("dnq", "w4a4")]
    plain0, plain1 = r0["variants"]["plain"], r1["variants"]["plain"]
    assert "reused_from" not in plain0 and plain1["reused_from"] == str(tmp_path / "0" / "plain")
    assert plain1["fp_top1"] == plain0["fp_top1"] == 51.0 and plain1["fingerprint"] == plain0["fingerprint"]
    assert json.loads((tmp_path / "1" / "results.json").read_text())["variants"]["plain"]["reused_from"]
    # another seed is another fit; reuse_variants=false refits; outside a multirun nothing is shared
    run(_compose([*TINY, "quant=w4a4", "seed=1"]), tmp_path / "2")
    assert fitted[3:] == [("plain", "w4a4"), ("dnq", "w4a4")]
    run(_compose([*TINY, "quant=w4a4", "reuse_variants=false"]), tmp_path / "3")
    assert fitted[5:] == [("plain", "w4a4"), ("dnq", "w4a4")]
    monkeypatch.undo()
    monkeypatch.setattr(train_mod, "_fit_variant", fake_fit)
    run(_compose([*TINY, "quant=w8a8"]), tmp_path / "4")
    assert fitted[7:] == [("plain", "w8a8"), ("dnq", "w8a8")]


@pytest.mark.slow
@pytest.mark.timeout(900)  # a four-job Hydra sweep in a subprocess; its old fixed subprocess timeouts allowed 600 s
def test_multirun_over_quant_and_seed_fits_the_baseline_once_per_seed(tmp_path):
    # flatq-train -m quant=w4a4,w3a3 seed=0,1 as a user types it (the quickstart's plain and dnq variants, on
    # tiny synthetic data): 4 jobs in the order (w4a4,0) (w4a4,1) (w3a3,0) (w3a3,1)
    sweep = tmp_path / "sweep"
    r = _cli(["-m", "quant=w4a4,w3a3", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in sweep.iterdir()} >= {"0", "1", "2", "3", "summary.md", "summary.csv", "summary_seeds.csv"}
    res = {j: json.loads((sweep / str(j) / "results.json").read_text()) for j in range(4)}
    swept = [sorted(o for o in job["overrides"] if o.startswith(("quant=", "seed="))) for job in res.values()]
    assert swept == [["quant=w4a4", "seed=0"], ["quant=w4a4", "seed=1"], ["quant=w3a3", "seed=0"], ["quant=w3a3", "seed=1"]]
    assert [job["seed"] for job in res.values()] == [0, 1, 0, 1]
    # plain depends on nothing quant changes: fitted in jobs 0 and 1 (one per seed), reused by jobs 2 and 3
    plain = {j: job["variants"]["plain"] for j, job in res.items()}
    assert "reused_from" not in plain[0] and "reused_from" not in plain[1]
    assert plain[2]["reused_from"] == str(sweep / "0" / "plain") and plain[3]["reused_from"] == str(sweep / "1" / "plain")
    assert plain[2]["fp_top1"] == plain[0]["fp_top1"] and plain[3]["ptq"] == plain[1]["ptq"]
    assert plain[0]["fingerprint"] != plain[1]["fingerprint"]  # another seed, another fit
    assert [(sweep / str(j) / "plain").is_dir() for j in range(4)] == [True, True, False, False]
    assert r.stderr.count("[plain] reused from") == 2
    # dnq depends on quant: fitted in every job
    assert all("reused_from" not in job["variants"]["dnq"] for job in res.values())
    assert all((sweep / str(j) / "dnq" / "lightning_logs").is_dir() for j in range(4))
    # the summary: one row per job and variant, then mean ± std and n over the seeds per quant and variant
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 8 and {row["variant"] for row in rows} == {"plain", "dnq"}
    md = (sweep / "summary.md").read_text()
    assert "## Mean ± std over seeds (sample std; n seeds)" in md
    agg = {(row["overrides"], row["variant"]): row for row in csv.DictReader((sweep / "summary_seeds.csv").open())}
    assert set(agg) == {(q, v) for q in ("quant=w4a4", "quant=w3a3") for v in ("plain", "dnq")}
    assert all(row["n"] == "2" and row["seeds"] == "0,1" and " ± " in row["w4a4_top1"] for row in agg.values())
    a, b = (plain[0]["ptq"]["w4a4"]["top1"], plain[1]["ptq"]["w4a4"]["top1"])
    mean = float(agg[("quant=w4a4", "plain")]["w4a4_top1"].split(" ± ")[0])
    assert mean == pytest.approx((a + b) / 2, abs=0.006)
    assert agg[("quant=w4a4", "plain")]["fp_top1"] == agg[("quant=w3a3", "plain")]["fp_top1"]  # the same two fits
    assert "| quant=w3a3 | dnq | 2 | 0,1 |" in md and "multirun summary:" in r.stdout


def test_sweep_summary_aggregates_over_seeds(tmp_path):
    accs = {("w8a8", 0): 90.0, ("w8a8", 1): 92.0, ("w8a8", 2): 94.0, ("w4a4", 0): 70.0, ("w4a4", 1): 80.0}
    for job, ((q, seed), acc) in enumerate(accs.items()):
        d = tmp_path / str(job)
        d.mkdir()
        (d / "results.json").write_text(json.dumps({
            "experiment": "x", "overrides": [f"quant={q}", f"seed={seed}"], "bits": ["w4a4"],
            "variants": {"dnq": {"fp_top1": acc + 1, "ptq": {"w4a4": {"top1": acc}}, "fit_seconds": 2.0}},
        }))
    md_path, _ = summarize_sweep(tmp_path)
    md = md_path.read_text()
    assert "## Mean ± std over seeds (sample std; n seeds)" in md
    assert "| quant=w8a8 | dnq | 3 | 0,1,2 | 93.00 ± 2.00 | 92.00 ± 2.00 | 2.00 ± 0.00 |" in md
    assert "| quant=w4a4 | dnq | 2 | 0,1 | 76.00 ± 7.07 | 75.00 ± 7.07 | 2.00 ± 0.00 |" in md
    rows = list(csv.DictReader((tmp_path / "summary_seeds.csv").open()))
    assert [(r["overrides"], r["n"], r["w4a4_top1"]) for r in rows] == [
        ("quant=w8a8", "3", "92.00 ± 2.00"), ("quant=w4a4", "2", "75.00 ± 7.07")]
    # one seed only: no aggregate table
    for d in list(tmp_path.glob("[1-4]")):
        (d / "results.json").unlink()
    summarize_sweep(tmp_path)
    assert "Mean ± std" not in md_path.read_text() and not (tmp_path / "summary_seeds.csv").exists()


def test_variant_fingerprints_and_leaving_a_variant_out():
    from flatq_lightning.app.train import variant_fingerprint

    def fps(*over):
        return {n: variant_fingerprint(c) for n, c in _variants(_compose(list(over)))}

    a, b = fps("quant=w4a4"), fps("quant=w3a3")
    assert a["plain"] == b["plain"] and a["dnq"] != b["dnq"]  # plain: no DNQ callback, no MSE term
    mse = fps("quant=w4a4", "quant.weight.observer=mse")  # a QuantSpec field, not only the preset
    assert mse["plain"] == a["plain"] and mse["dnq"] != a["dnq"]
    assert fps("quant=w4a4", "seed=1")["plain"] != a["plain"]
    assert fps("quant=w4a4", "ptq.bits=[w4a4]")["plain"] != a["plain"]  # PTQ settings matter
    assert fps("quant=w4a4", "experiment_name=other")["plain"] == a["plain"]
    # with the MSE term on, the preset matters even without DNQ
    assert fps("quant=w4a4", "+variants.plain.module.mse_weight=0.1")["plain"] != fps(
        "quant=w3a3", "+variants.plain.module.mse_weight=0.1")["plain"]
    # variants.plain=null leaves the baseline out of a job
    assert [n for n, _ in _variants(_compose(["variants.plain=null"]))] == ["dnq"]


def test_summarize_sweep_and_comparison_table(tmp_path):
    assert summarize_sweep(tmp_path) is None
    for num, acc in ((0, 91.0), (1, 80.5)):
        d = tmp_path / str(num)
        d.mkdir()
        (d / "results.json").write_text(
            json.dumps(
                {
                    "experiment": "x",
                    "overrides": [f"quant=w{8 - 4 * num}a8", "seed=3"],
                    "bits": ["w4a4"],
                    "variants": {
                        "main": {"fp_top1": 92.0, "ptq": {"w4a4": {"top1": acc}}, "fit_seconds": 3.0}
                    },
                }
            )
        )
    md_path, csv_path = summarize_sweep(tmp_path)
    lines = md_path.read_text().splitlines()
    assert lines[2].startswith("| job | overrides | variant | fp_top1 | w4a4_top1 | fit_seconds |")
    assert "| 0 | quant=w8a8 | main | 92.00 | 91.00 | 3.0 |" in lines
    assert "| 1 | quant=w4a8 | main | 92.00 | 80.50 | 3.0 |" in lines
    assert len(list(csv.reader(csv_path.open()))) == 3
    table = comparison_table(
        {"bits": ["w4a4"], "variants": {"a": {"fp_top1": 1.0, "ptq": {}, "fit_seconds": 1}}}
    )
    assert "| W4A4 | — |" in table


def test_w3a3_experiment_is_the_dnq_recipe_aimed_at_w3a3_with_a_clean_first_half(tmp_path):
    w3, dnq = _compose(["experiment=cifar10_resnet20_dnq_w3a3"]), _compose(["experiment=cifar10_resnet20_dnq"])
    assert quant_target(w3).name == "w3a3" and quant_target(dnq).name == "w4a4"
    assert w3.callbacks.dnq.target == w3.quant
    assert w3.callbacks.dnq.warmup_fraction == 0.5
    for key in ("model", "data", "trainer", "ptq"):
        assert w3[key] == dnq[key], key
    assert w3.module.mse_target == w3.quant  # the MSE term (off by default) follows the target too
    assert {k: v for k, v in w3.module.items() if k != "mse_target"} == {k: v for k, v in dnq.module.items() if k != "mse_target"}
    rec, noise, act = instantiate_callbacks(w3.callbacks, checkpoint_dir=tmp_path)[0].parts
    assert (rec.weight_spec.bits, rec.act_spec.bits) == (3, 3)
    assert noise.warmup_fraction == act.warmup_fraction == 0.5


def test_sam_experiment_is_the_plain_recipe_with_sam():
    sam, plain = _compose(["experiment=cifar10_resnet20_sam"]), _compose(["experiment=cifar10_resnet20_plain"])
    assert sam.module.sam_rho == 0.05 and plain.module.sam_rho == 0.0
    for key in ("model", "data", "trainer", "quant", "ptq"):
        assert sam[key] == plain[key], key
    assert {k: v for k, v in sam.module.items() if k != "sam_rho"} == {k: v for k, v in plain.module.items() if k != "sam_rho"}
    assert "dnq" not in (sam.get("callbacks") or {})


def test_dnq_experiment_is_the_plain_recipe_with_the_dnq_callbacks():
    dnq, plain = _compose(["experiment=cifar10_resnet20_dnq"]), _compose(["experiment=cifar10_resnet20_plain"])
    for key in ("model", "data", "trainer", "quant", "ptq", "module"):
        assert dnq[key] == plain[key], key
    assert list(dnq.callbacks) == ["dnq", "checkpoint"] and list(plain.callbacks) == ["checkpoint"]
    assert dnq.module.scheduler == "cosine" and dnq.trainer.max_epochs == 100


def test_vit_experiment_is_the_resnet50_set_up_with_vit_and_adamw():
    vit, r50 = _compose(["experiment=imagenet_vit_b16_dnq"]), _compose(["experiment=imagenet_resnet50_dnq"])
    assert vit.model.name == "vit_base_patch16_224" and vit.model.pretrained and vit.module.optimizer == "adamw"
    assert (vit.data.mean, vit.data.interpolation, vit.data.batch_size) == ([0.5, 0.5, 0.5], "bicubic", 64)
    for key in ("callbacks", "quant", "ptq"):
        assert vit[key] == r50[key], key
    assert vit.trainer.strategy == "ddp" and vit.module.mse_weight == r50.module.mse_weight == 0.1
