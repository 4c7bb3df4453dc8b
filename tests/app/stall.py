"""A test helper callback: stop a training process at a known point, so that a test can kill it there."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StallMidEpoch(Callback):
    """With ``$FLATQ_TEST_STALL_MARKER`` set: at ``epoch``'s ``batch``, write the marker file (the global step)
    and wait, until the process is killed. Without the variable it does nothing."""

    def __init__(self, epoch: int = 1, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        marker = os.environ.get("FLATQ_TEST_STALL_MARKER")
        if marker and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            Path(marker).write_text(str(trainer.global_step))
            time.sleep(600)
