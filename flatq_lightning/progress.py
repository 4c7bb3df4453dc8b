"""Progress for the long waits (decoding a data set, PTQ), readable in a terminal and in a log file.

In a terminal :func:`progress` is a tqdm bar; when the stream is not a terminal (a log file, a pipe, CI, a
SLURM output file) it prints plain lines instead, a few at most: one every ``interval_s`` seconds while it
runs and one at the end, with no carriage returns or escape codes.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> sum(progress(range(3), "counting", stream=out))
    3
    >>> out.getvalue().startswith("counting: done, 3 it in ")
    True
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = ["is_terminal", "progress", "status"]


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
