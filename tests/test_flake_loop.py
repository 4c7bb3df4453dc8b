"""The flake-hunting tools: the suite's own random order and tests/flake_loop.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SUBPROCESS_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]


def _collected(*args: str) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "tests/quant/test_spec.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT_S)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return [line for line in r.stdout.splitlines() if "::" in line]


@pytest.mark.slow
def test_shuffle_seed_reorders_the_same_tests_reproducibly():
    plain = _collected()
    a, b, c = _collected("--shuffle-seed", "1"), _collected("--shuffle-seed", "1"), _collected("--shuffle-seed", "2")
    assert sorted(a) == sorted(plain) and len(plain) > 5
    assert a == b and a != plain and a != c


@pytest.mark.slow
def test_flake_loop_runs_counts_and_reports_the_order(tmp_path):
    r = subprocess.run(["bash", "tests/flake_loop.sh", "-n", "2", "-r", "-o", str(tmp_path), "--",
                        "tests/quant/test_spec.py", "-q"], cwd=ROOT, capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT_S, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "flake_loop: 2 of 2 run(s) passed" in r.stdout and "order: random via" in r.stdout
    assert (tmp_path / "run1.log").exists() and (tmp_path / "run2.log").exists()
    seeds = [line.rsplit("seed=", 1)[1] for line in r.stdout.splitlines() if line.startswith("run ")]
    assert len(seeds) == 2 and all(s.isdigit() for s in seeds)
