"""Progress for the long waits (decoding a data set, training, PTQ), readable in a terminal and in a log file.

In a terminal :func:`progress` is a tqdm bar; when the stream is not a terminal (a log file, a pipe, CI, a
SLURM output file) it prints plain lines instead, a few at most: one every ``interval_s`` seconds while it
runs and one at the end, with no carriage returns or escape codes.

Training is the same: :func:`progress_bar_callback` gives a Trainer :class:`PlainProgressBar` (a line per epoch,
at most one every ``interval_s`` seconds within it) when the output goes to a log, and leaves Lightning's own
tqdm bar in a terminal.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> sum(progress(range(3), "counting", stream=out))
    3
    >>> out.getvalue().startswith("counting: done, 3 it in ")
    True
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

__all__ = ["PlainProgressBar", "is_terminal", "progress", "progress_bar_callback", "status"]


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and objects without ``isatty``)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def status(message: str, stream: TextIO | None = None) -> None:
    """One plain line on ``stream`` (default stderr), flushed: for a wait that has no natural count."""
    stream = stream if stream is not None else sys.stderr
    print(message, file=stream, flush=True)


def _plain(
    iterable: Iterable[Any], desc: str, total: int | None, stream: TextIO, interval_s: float, unit: str
) -> Iterator[Any]:
    t0 = last = time.perf_counter()
    n = 0
    of = f"/{total}" if total is not None else ""
    for item in iterable:
        yield item
        n += 1
        now = time.perf_counter()
        if now - last >= interval_s and (total is None or n < total):
            print(f"{desc}: {n}{of} {unit}, {now - t0:.1f} s", file=stream, flush=True)
            last = now
    print(f"{desc}: done, {n} {unit} in {time.perf_counter() - t0:.1f} s", file=stream, flush=True)


def progress(
    iterable: Iterable[Any],
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    leave: bool = True,
    stream: TextIO | None = None,
    interval_s: float = 10.0,
    unit: str = "it",
) -> Iterable[Any]:
    """``iterable`` with progress on ``stream`` (default stderr): a tqdm bar on a terminal, plain lines otherwise.

    Args:
        desc: what is being waited for (the line's prefix).
        total: the number of items, when ``len(iterable)`` does not tell.
        enabled: False returns ``iterable`` unchanged.
        leave: keep the tqdm bar after it finishes (terminal only).
        interval_s: seconds between two plain lines while it runs (not a terminal).
        unit: what an item is ("batches", "images").
    """
    if not enabled:
        return iterable
    stream = stream if stream is not None else sys.stderr
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True, file=stream, unit=unit)
    return _plain(iterable, desc, total, stream, float(interval_s), unit)


# ---------------------------------------------------------------------------------------------------------
# training: Lightning's progress as plain lines in a log
# ---------------------------------------------------------------------------------------------------------
def _value(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.4g}"


def _nth(totals: Any, i: int) -> float | None:
    try:
        return totals[i]
    except (IndexError, KeyError, TypeError):
        return None


def _count(n: int, total: float | int | None) -> str:
    return f"{n}/{int(total)}" if total is not None and math.isfinite(total) else str(n)


class PlainProgressBar(ProgressBar):
    """Lightning's progress bar as plain lines, for logs: a line at the end of each training epoch (batches,
    time and the progress-bar metrics, validation's included) and, within an epoch or a long validation, at most
    one line every ``interval_s`` seconds. No carriage returns, no escape codes. Lines look like::

        epoch 1/12: 10/23 batches, 30.0 s, train/loss_step 1.874
        epoch 1/12: done, 23/23 batches in 61.5 s, train/loss_epoch 1.5, train/loss_step 1.02, val/acc 0.64, val/loss 1.1
        validation: 40/98 batches, 30.0 s

    Lightning refuses a progress bar callback under ``Trainer(enable_progress_bar=False)``:
    :func:`progress_bar_callback` returns none then. Like every Lightning progress bar it is disabled on the
    ranks other than zero and by :meth:`disable` (the tuner does that while it searches).

    Args:
        interval_s: seconds between two lines within an epoch (or a validation, test or predict run).
        stream: where the lines go (default: ``sys.stderr`` at the time of writing).

    Example:
        >>> import io, lightning as L, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class M(L.LightningModule):
        ...     def __init__(self): super().__init__(); self.lin = torch.nn.Linear(2, 1)
        ...     def training_step(self, b, i): loss = self.lin(b[0]).pow(2).mean(); self.log("loss", loss, prog_bar=True); return loss
        ...     def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> out = io.StringIO()
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[PlainProgressBar(stream=out)], logger=False,
        ...                     enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
        >>> trainer.fit(M(), DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=4))
        >>> [line.split(" in ")[0] for line in out.getvalue().splitlines()]
        ['epoch 1/2: done, 2/2 batches', 'epoch 2/2: done, 2/2 batches']
    """

    def __init__(self, interval_s: float = 30.0, stream: TextIO | None = None) -> None:
        super().__init__()
        self.interval_s = float(interval_s)
        self._stream = stream
        self._enabled = True
        self._t0 = self._last = self._eval_t0 = self._eval_last = 0.0

    # the ProgressBar interface ------------------------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **kwargs, file=self.stream, flush=True)

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    # lines ----------------------------------------------------------------------------------------------------
    def _line(self, text: str) -> None:
        if self._enabled:
            print(text, file=self.stream, flush=True)

    def _start(self) -> None:
        self._t0 = self._last = time.perf_counter()

    def _due(self) -> float | None:
        """Seconds since the start when a line is due (``interval_s`` since the last one), else None."""
        now = time.perf_counter()
        if now - self._last < self.interval_s:
            return None
        self._last = now
        return now - self._t0

    def _metrics(self, trainer: Any, pl_module: Any) -> str:
        items = self.get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return "".join(f", {k} {_value(v)}" for k, v in sorted(items.items()))

    def _epoch(self, trainer: Any) -> str:
        n = trainer.max_epochs
        return f"epoch {trainer.current_epoch + 1}" + (f"/{n}" if n is not None and n > 0 else "")

    # training -------------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        n, total = batch_idx + 1, self.total_train_batches
        if not self._enabled or (math.isfinite(total) and n >= total):
            return  # the epoch's last batch: its line comes at the epoch's end, with validation's metrics
        t = self._due()
        if t is not None:
            self._line(f"{self._epoch(trainer)}: {_count(n, total)} batches, {t:.1f} s{self._metrics(trainer, pl_module)}")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        n = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        t = time.perf_counter() - self._t0
        self._line(
            f"{self._epoch(trainer)}: done, {_count(n, self.total_train_batches)} batches in {t:.1f} s"
            f"{self._metrics(trainer, pl_module)}"
        )
        self._last = time.perf_counter()

    # evaluation: a line every interval_s during a long one, a closing line when it is not part of a fit ------
    def _eval_start(self) -> None:
        self._eval_t0 = self._eval_last = time.perf_counter()

    def _eval_batch(self, what: str, n: int, total: float | int | None) -> None:
        now = time.perf_counter()
        if self._enabled and now - self._eval_last >= self.interval_s and not (total and n >= total):
            self._eval_last = now
            self._line(f"{what}: {_count(n, total)} batches, {now - self._eval_t0:.1f} s")

    def _eval_end(self, what: str, trainer: Any, pl_module: Any, n: int) -> None:
        self._line(f"{what}: done, {n} batches in {time.perf_counter() - self._eval_t0:.1f} s"
                   f"{self._metrics(trainer, pl_module)}")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start()

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self._eval_batch("validation", batch_idx + 1, _nth(trainer.num_val_batches, dataloader_idx))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if not trainer.sanity_checking and trainer.state.fn != TrainerFn.FITTING:  # a fit's epoch line says it
            self._eval_end("validation", trainer, pl_module, int(sum(trainer.num_val_batches)))

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start()

    def on_test_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch("test", batch_idx + 1, _nth(trainer.num_test_batches, dataloader_idx))

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_end("test", trainer, pl_module, int(sum(trainer.num_test_batches)))

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start()

    def on_predict_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch("predict", batch_idx + 1, _nth(trainer.num_predict_batches, dataloader_idx))

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        n = int(sum(trainer.num_predict_batches))
        self._line(f"predict: done, {n} batches in {time.perf_counter() - self._eval_t0:.1f} s")


def progress_bar_callback(
    enabled: bool = True, callbacks: Iterable[Any] = (), interval_s: float = 30.0
) -> PlainProgressBar | None:
    """The progress bar to add to a Trainer's callbacks, or None when there is none to add.

    None when ``enabled`` (the Trainer's ``enable_progress_bar``) is False, when ``callbacks`` already hold a
    progress bar, or when stdout and stderr are both terminals (Lightning's own tqdm bar, on stdout, is right
    then); otherwise a :class:`PlainProgressBar` on stderr, so that a log file gets plain lines.

    Example:
        >>> progress_bar_callback(enabled=False) is None
        True
    """
    if not enabled or any(isinstance(c, ProgressBar) for c in callbacks):
        return None
    if is_terminal(sys.stdout) and is_terminal(sys.stderr):
        return None
    return PlainProgressBar(interval_s=interval_s)
