"""A fault test of the whole app: flatq-train killed with SIGKILL while it trains, then rerun in the same run
directory with resume=last."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import SUBPROCESS_TIMEOUT_S
from tests.test_benchmarks import _tiny_cifar_zip

EPOCHS = 6


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from flatq_lightning.app.train import main; main()",
            "data=cifar10", f"data.path={data}", "data.num_workers=0", "data.batch_size=8", "data.eval_batch_size=32",
            "model=small_cnn", "model.kwargs.width=4", "variants=null", "callbacks=[dnq,checkpoint]",
            "+callbacks.stall._target_=tests.app.stall.StallMidEpoch",
            f"trainer.max_epochs={EPOCHS}", "trainer.enable_progress_bar=false", "ptq.bits=[w8a8,w4a4]",
            "ptq.calib_batches=1", "ptq.progress=false", "torch_threads=1", f"hydra.run.dir={out}", *extra]


@pytest.mark.slow
def test_sigkill_while_training_then_resume_last(tmp_path):
    data = _tiny_cifar_zip(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "FLATQ_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    last = out / "checkpoints" / "last.ckpt"
    # 1. a fit killed with SIGKILL (no handler runs) in the middle of its second epoch, after the first epoch's
    # checkpoint: the stall callback marks the point and waits there, so the kill lands in training every time
    marker = tmp_path / "stalled"
    proc = subprocess.Popen(_cmd(data, out), env={**env, "FLATQ_TEST_STALL_MARKER": str(marker)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    while not marker.exists() and proc.poll() is None and time.monotonic() - t0 < SUBPROCESS_TIMEOUT_S:
        time.sleep(0.05)
    assert proc.poll() is None, f"the fit ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
    assert last.exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()  # it died before the end
    import torch

    killed_at = torch.load(last, map_location="cpu", weights_only=False)["epoch"]  # our own file, just written
    assert killed_at == 0 and int(marker.read_text()) > 0  # the last checkpoint is epoch 0's; it died in epoch 1
    logs_before = {p: p.read_bytes() for p in (out / "lightning_logs").rglob("*") if p.is_file()}

    # 2. the same command in the same directory with resume=last: it continues and finishes
    r = subprocess.run(_cmd(data, out, "resume=last"), env=env, capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT_S)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"resuming from {last}" in r.stderr
    res = json.loads((out / "results.json").read_text())
    main = res["variants"]["main"]
    assert main["resumed_from"] == str(last)
    assert main["epochs"] == EPOCHS and main["steps"] > 0
    assert set(main["ptq"]) == {"w8a8", "w4a4"} and main["fp_top1"] >= 0
    report = json.loads(Path(main["ptq_report"]).read_text())
    assert [row["bits"] for row in report["rows"]] == ["w8a8", "w4a4"]
    # nothing the killed run wrote was replaced: its logs are byte for byte there, the new fit logged elsewhere
    for p, content in logs_before.items():
        assert p.read_bytes() == content, p
    assert len(list((out / "lightning_logs").glob("version_*"))) == 2

    # 3. once more: nothing left to fit; the results go to results_2.*, the first ones stay
    first = (out / "results.json").read_bytes()
    r2 = subprocess.run(_cmd(data, out, "resume=last"), env=env, capture_output=True, text=True,
                        timeout=SUBPROCESS_TIMEOUT_S)
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    assert (out / "results.json").read_bytes() == first
    assert json.loads((out / "results_2.json").read_text())["variants"]["main"]["epochs"] == EPOCHS


def test_bad_resume_values_are_one_error_line(tmp_path):
    from omegaconf import OmegaConf

    from flatq_lightning.app.train import ConfigError, validate_config
    from tests.app.test_train import TINY, _compose

    cfg = _compose([*TINY, "variants=null"])
    for value, match in ((str(tmp_path / "missing.ckpt"), "no such checkpoint file"), ("", "resume must be")):
        OmegaConf.update(cfg, "resume", value, force_add=True)
        with pytest.raises(ConfigError, match=match):
            validate_config(cfg)
