"""What the benchmark scripts share (they import it as ``benchmarks._common`` with the repository root on the path)."""

from __future__ import annotations

import time

import lightning.pytorch as pl


class Timer(pl.Callback):
    """Wall seconds of fit (``seconds``), and the process CPU seconds (``cpu_seconds``: steadier on a shared CPU
    machine)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0
