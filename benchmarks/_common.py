"""What the benchmark scripts share (they import it as ``benchmarks._common`` with the repository root on the path)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

import lightning.pytorch as pl


class Timer(pl.Callback):
    """Wall seconds of fit (``seconds``), and the process CPU seconds (``cpu_seconds``: steadier on a shared CPU
    machine)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0


# two-sided 95 % Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student t; NaN for fewer than 2 values)."""
    import math
    import statistics

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan
    return m, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def cifar_seed_models(models: str, seeds: str) -> list[tuple[int, Path]]:
    """``[(seed, <models>/seed<k>.pt)]`` for the comma-separated ``seeds``; exits naming a missing file."""
    from pathlib import Path

    out = []
    for s in [int(v) for v in seeds.split(",") if v]:
        path = Path(models) / f"seed{s}.pt"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: train it with benchmarks/quality.py --train-only")
        out.append((s, path))
    return out


def add_seed_model_args(ap: argparse.ArgumentParser) -> None:
    """The options of a benchmark over the saved CIFAR ResNet-20 seeds: --data, --models, --seeds, --threads."""
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    ap.add_argument("--models", default="benchmarks/results/quality/cpu/plain", help="folder with seed<k>.pt")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--threads", type=int, default=None)
