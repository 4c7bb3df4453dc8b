"""The module names of earlier versions still import, as the very modules they moved to (README, Package layout)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from flatq_lightning._aliases import MOVED, new_name
from tests.helpers import SUBPROCESS_TIMEOUT_S

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_name_is_the_new_module(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_submodules_and_names_follow_their_package():
    from flatq_lightning.data.cifar import CIFAR10DataModule as Old

    from flatq_lightning.app.data.cifar import CIFAR10DataModule

    assert Old is CIFAR10DataModule
    assert new_name("flatq_lightning.data.cifar") == "flatq_lightning.app.data.cifar"
    assert new_name("flatq_lightning.quant.spec") is None  # did not move


def test_python_dash_m_on_an_old_name_runs_the_new_module():
    r = subprocess.run(
        [sys.executable, "-m", "flatq_lightning.ptq_cli", "--help"], cwd=REPO, capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert r.returncode == 0, r.stderr
    assert "--export" in r.stdout and "calibration batches (default: 32)" in r.stdout
