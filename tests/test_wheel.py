"""The wheel carries the Hydra configs (``conf/`` stays at the repository root) and an installed
``flatq-train`` finds them from any directory."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import SUBPROCESS_TIMEOUT_S

REPO = Path(__file__).resolve().parents[1]
BUILD_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None,
    reason="building the wheel without isolation needs setuptools >= 70.1 (the dev extra has it)",
)
@pytest.mark.timeout(1200)  # pip wheel, pip install and two interpreters; its old fixed subprocess timeouts allowed 4 calls, 1,020 s
def test_wheel_ships_the_configs_and_flatq_train_finds_them(tmp_path):
    # build from a copy, so that the checkout gets no build/ or egg-info (and parallel runs do not collide)
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_FILES:
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "flatq_lightning", src / "flatq_lightning", ignore=ignore)
    shutil.copytree(REPO / "conf", src / "conf", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLATQ_CONF_DIR")}
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                        str(src)], cwd=src, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("flatq_lightning-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n.removeprefix("flatq_lightning/conf/") for n in zf.namelist() if n.endswith(".yaml")}
    expected = {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == expected

    site = tmp_path / "site"
    r = subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env["PYTHONPATH"] = str(site)
    script = site / "bin" / "flatq-train"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "flatq_lightning.app.train"]
    r = subprocess.run([*cmd, "--cfg", "job", "experiment=imagenet_resnet50_dnq"], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "experiment_name: imagenet_resnet50_dnq" in r.stdout and "_target_: flatq_lightning.app.data" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import flatq_lightning.app.train as t; print(t.CONF_DIR)"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert Path(r.stdout.strip()) == site / "flatq_lightning" / "conf", r.stderr[-2000:]
    assert not list(elsewhere.iterdir())  # --cfg job writes nothing
