import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import SUBPROCESS_TIMEOUT_S


@pytest.mark.slow
def test_ddp_two_cpu_processes_identical_params_and_stats(tmp_path):
    script = Path(__file__).with_name("ddp_script.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    for key in ("act_var", "act_lo", "weight_var"):
        assert r0[key].keys() == r1[key].keys() and r0[key]
        for n in r0[key]:
            assert torch.equal(r0[key][n], r1[key][n]), (key, n)
    assert r0["applied"] is None and r1["applied"] is None
