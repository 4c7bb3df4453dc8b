"""flatq-ptq: options, defaults in --help, errors before any work (end to end on a checkpoint: tests/app)."""

from __future__ import annotations

import pytest

from flatq_lightning.ptq import cli as ptq_cli


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
