"""The benchmark scripts import, parse their arguments and build every variant (no training here)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from flatq_lightning import ActivationNoiseInjection, DifferentialNoiseInjection, QuantErrorRecorder

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script", ["quality", "overhead", "vit_attention", "ptq_timing", "calib_spread"])
def test_help(script):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout


def test_quality_variants_build_the_right_callbacks():
    q = _load("quality")
    kinds = {}
    for v in q.VARIANTS:
        cbs, extra, sam = q.variant_setup(v, total_steps=100, seed=0, mse_weight=0.3)
        kinds[v] = ({type(c).__name__ for c in cbs}, extra, sam)
    assert kinds["plain"] == (set(), {}, False)
    assert kinds["sam"] == (set(), {}, True)
    assert kinds["dnq_w"][0] == {"QuantErrorRecorder", "DifferentialNoiseInjection"}
    assert kinds["dnq_wa"][0] == {"QuantErrorRecorder", "DifferentialNoiseInjection", "ActivationNoiseInjection"}
    assert kinds["dnq_wa_mse"][1] == {"mse_weight": 0.3, "mse_every": 1}
    cbs, _, _ = q.variant_setup("dnq_wa_addrem", 100, 0)
    assert next(c for c in cbs if isinstance(c, DifferentialNoiseInjection)).mode == "add_remove"
    cbs, _, _ = q.variant_setup("dnq_uniform", 100, 0)
    assert next(c for c in cbs if isinstance(c, DifferentialNoiseInjection)).mode == "uniform"
    cbs, _, _ = q.variant_setup("dnq_wa_trap", 100, 0)
    noise = next(c for c in cbs if isinstance(c, DifferentialNoiseInjection))
    act = next(c for c in cbs if isinstance(c, ActivationNoiseInjection))
    assert noise.kappa(0) == 0.0 and noise.kappa(50) == 1.0 and noise.kappa(100) == 0.0
    assert act.noise_scale(50) == 1.0
    cbs, _, _ = q.variant_setup("dnq_wa_late", 100, 0)
    noise = next(c for c in cbs if isinstance(c, DifferentialNoiseInjection))
    act = next(c for c in cbs if isinstance(c, ActivationNoiseInjection))
    assert noise.warmup_fraction == act.warmup_fraction == 0.5 and noise.warmup_steps == act.warmup_steps == 0
    cbs, _, _ = q.variant_setup("dnq_wa_late_k05", 100, 0)
    noise = next(c for c in cbs if isinstance(c, DifferentialNoiseInjection))
    act = next(c for c in cbs if isinstance(c, ActivationNoiseInjection))
    assert noise.warmup_fraction == act.warmup_fraction == 0.5 and noise.kappa(60) == act.noise_scale == 0.5
    with pytest.raises(ValueError, match="unknown variant"):
        q.variant_setup("nope", 100, 0)


def test_quality_variant_target_sets_the_noise_statistics_quantizer():
    q = _load("quality")
    default = next(c for c in q.variant_setup("dnq_wa", 100, 0)[0] if isinstance(c, QuantErrorRecorder))
    assert (default.weight_spec.bits, default.act_spec.bits) == (4, 4)
    cbs, _, _ = q.variant_setup("dnq_wa@w3a3", 100, 0)
    rec = next(c for c in cbs if isinstance(c, QuantErrorRecorder))
    assert (rec.weight_spec.bits, rec.act_spec.bits) == (3, 3)
    assert any(isinstance(c, ActivationNoiseInjection) for c in cbs)
    rec = next(c for c in q.variant_setup("dnq_w@w2a4", 100, 0)[0] if isinstance(c, QuantErrorRecorder))
    assert rec.weight_spec.bits == 2
    with pytest.raises(ValueError, match="preset"):
        q.variant_setup("dnq_wa@foo", 100, 0)
    with pytest.raises(ValueError, match="unknown variant"):
        q.variant_setup("nope@w3a3", 100, 0)


def test_quality_summary_table():
    q = _load("quality")
    rows = [
        {"variant": v, "seed": s, "train_s": 10.0 * (i + 1), "fp_top1": 70.0 + s, "ptq": {"w4a4": 60.0 + s},
         "flatness": {"hessian_trace": 5.0, "top_eig": 1.0}}
        for i, v in enumerate(("plain", "dnq_wa")) for s in (0, 1)
    ]
    table = q.summarize(rows, ("w4a4",))
    lines = table.splitlines()
    assert lines[0].startswith("| training | seeds |") and len(lines) == 4
    assert "70.50 ± 0.71" in lines[2] and "2.00x" in lines[3]


def test_quality_accuracy_plot_shows_the_multi_seed_methods_with_error_bars(tmp_path, monkeypatch):
    import matplotlib.axes

    q = _load("quality")
    rows = [
        {"variant": v, "seed": s, "fp_top1": 70.0 + s, "ptq": {"w4a4": 60.0 + 2 * s},
         "flatness": {"hessian_trace": 5.0, "top_eig": 1.0}, "landscape": {"alphas": [-1.0, 0.0, 1.0], "losses": [2.0, 1.0, 2.0]}}
        for v, seeds in (("plain", (0, 1)), ("dnq_wa", (0, 1)), ("sam", (0,))) for s in seeds
    ]
    calls, errorbar = [], matplotlib.axes.Axes.errorbar

    def spy(self, x, y, yerr=None, **kw):
        calls.append((kw["label"], list(yerr)))
        return errorbar(self, x, y, yerr=yerr, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    q.plots(rows, ("w4a4",), tmp_path)
    assert [c[0] for c in calls] == ["plain (2 seeds)", "dnq_wa (2 seeds)"]  # the one-seed SAM run is left out
    assert calls[0][1] == pytest.approx([0.7071, 1.4142], abs=1e-4)  # std over seeds of FP and W4A4
    assert (tmp_path / "quality_accuracy_vs_bits.png").stat().st_size > 0
    calls.clear()
    q.plots(rows[-1:], ("w4a4",), tmp_path)  # no method with several seeds: all of them, without bars
    assert calls == [("sam (1 seed)", [0.0, 0.0])]


def test_overhead_callback_bytes_counts_the_pool_not_weights():
    o = _load("overhead")
    rec = QuantErrorRecorder("w4a4")
    assert o.callback_bytes([rec]) == {"weight_side": 0, "act_side": 0}


@pytest.mark.slow
def test_overhead_runs_and_reports_paired_ratios(tmp_path):
    out = tmp_path / "o.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--models", "cifar_resnet20:8:4", "--steps", "2",
           "--warmup", "1", "--repeats", "2", "--variants", "plain,dnq", "--stats-every", "2", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    row = json.loads(out.read_text())["results"][0]
    times = row["all_ms"]
    assert len(times["plain"]) == len(times["dnq"]) == 2
    paired = sorted(d / p for d, p in zip(times["dnq"], times["plain"]))
    assert row["ratio"] == pytest.approx(sum(paired) / 2, abs=2e-3)  # the median of two paired ratios
    assert row["ratio_min"] == pytest.approx(min(times["dnq"]) / min(times["plain"]), abs=2e-3)
    assert row["ratio_sam"] is None and row["extra_mem_mb"] > 0


@pytest.mark.slow
def test_saved_models_remeasure_and_calibration_spread(tmp_path):
    """quality.py --remeasure-flatness and calib_spread.py both read the models quality.py saves."""
    import json

    import torch

    from flatq_lightning.app.models import create_model

    data = _tiny_cifar_zip(tmp_path)
    out = tmp_path / "run"
    (out / "models").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(create_model("cifar_resnet20", num_classes=10).state_dict(), out / "models" / "plain_seed3.pt")
    env = {**__import__("os").environ, "FLATQ_CACHE": str(tmp_path / "cache")}
    common = ["--data", str(data), "--train-subset", "32"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), *common, "--out", str(out), "--remeasure-flatness",
         "--flat-batches", "1", "--flat-probes", "2", "--threads", "1"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = json.loads((out / "quality.json").read_text())["flatness_remeasured"]
    assert (row["variant"], row["seed"], row["probes"], row["batches"]) == ("plain", 3, 2, 1)
    assert row["hessian_trace"] != 0 and row["top_eig"] > 0
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "calib_spread.py"), *common, "--dir", str(out), "--bits", "w8a8",
         "--draws", "2"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (spread,) = json.loads((out / "calib_spread.json").read_text())["rows"]
    assert spread["model"] == "plain_seed3" and len(spread["top1"]["w8a8"]) == 2


def _tiny_cifar_zip(tmp_path):
    import zipfile

    from tests.app.data.conftest import CLASSES, N_TEST, N_TRAIN, _image, _jpeg

    data = tmp_path / "cifar10-jpeg.zip"
    with zipfile.ZipFile(data, "w") as zf:
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            for c, name in enumerate(CLASSES):
                for i in range(n):
                    zf.writestr(f"cifar10/{split}/{name}/{i:04d}.jpg", _jpeg(_image(c, i)))
    return data


@pytest.mark.slow
def test_quality_train_only_then_evaluate_recipes_and_paired_summary(tmp_path):
    """--train-only saves <variant>/seed<k>.pt; --evaluate runs every PTQ recipe on them without training;
    the summary gives the paired difference to plain per seed with a 95 % CI."""
    import json
    import os

    data = _tiny_cifar_zip(tmp_path)
    out = tmp_path / "q"
    env = {**os.environ, "FLATQ_CACHE": str(tmp_path / "cache")}
    common = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--data", str(data), "--train-subset", "64",
              "--epochs", "1", "--threads", "1", "--out", str(out)]
    run = subprocess.run([*common, "--train-only", "--variants", "plain,dnq_wa@w3a3", "--seeds", "0,1"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.pt")) == [
        "dnq_wa@w3a3/seed0.pt", "dnq_wa@w3a3/seed1.pt", "plain/seed0.pt", "plain/seed1.pt"]
    run = subprocess.run([*common, "--evaluate", "--recipes", "minmax,practical", "--eval-bits", "w4a4"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rec = json.loads((out / "dnq_wa@w3a3" / "seed1.json").read_text())
    assert rec["train"]["steps"] >= 1 and set(rec["evaluation"]["ptq"]) == {"minmax", "practical"}
    assert set(rec["evaluation"]["fp"]) == {"trained_bn", "clean_bn"} and rec["evaluation"]["commit"]
    assert not (out / "dnq_wa@w3a3" / "seed1.train.json").exists()  # folded into seed1.json
    summary = json.loads((out / "summary.json").read_text())
    paired = summary["paired"]["dnq_wa@w3a3"]["W4A4 practical"]
    plain = json.loads((out / "plain" / "seed0.json").read_text())["evaluation"]["ptq"]["practical"]["w4a4"]
    assert paired["per_seed"]["0"] == pytest.approx(
        json.loads((out / "dnq_wa@w3a3" / "seed0.json").read_text())["evaluation"]["ptq"]["practical"]["w4a4"] - plain)
    assert "Paired difference to `plain`" in (out / "summary.md").read_text()
    assert (out / "paired_difference.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_mean_ci95_and_divergence_stop():
    q = _load("quality")
    m, h = q.mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and h == pytest.approx(3.182 * 1.2909944 / 2, rel=1e-4)
    import torch

    class _T:
        global_step = 16

    with pytest.raises(RuntimeError, match="plain seed 0: the training loss is nan at step 16: the run diverged"):
        q.StopOnDivergence("plain seed 0").on_train_batch_end(_T(), None, {"loss": torch.tensor(float("nan"))}, None, 0)
    q.StopOnDivergence("x").on_train_batch_end(_T(), None, {"loss": torch.tensor(1.0)}, None, 0)
