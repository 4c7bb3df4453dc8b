"""Atomic file writes that never replace an earlier result silently, and the free numbered names they use."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["free_path", "numbered_paths", "write_file_atomic"]

PathLike = str | os.PathLike


def numbered_paths(
    save_dir: PathLike, stem: str, formats: Sequence[str], overwrite: bool = False,
    taken: Sequence[str] | None = None,
) -> dict[str, Path]:
    """``{fmt: save_dir/<stem>.<fmt>}``, or, when any ``<stem>.<t>`` (``t`` in ``taken``, default ``formats``)
    exists and ``overwrite`` is False, the first free numbered set ``<stem>_2.<fmt>``, ``<stem>_3.<fmt>``, …

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> numbered_paths(d, "quantized_w4a4", ("onnx",))["onnx"].name
        'quantized_w4a4.onnx'
        >>> _ = (d / "quantized_w4a4.onnx").write_bytes(b"")
        >>> numbered_paths(d, "quantized_w4a4", ("onnx",))["onnx"].name
        'quantized_w4a4_2.onnx'
    """
    d = Path(save_dir)
    taken = tuple(taken) if taken is not None else tuple(formats)
    n = 1
    while True:
        s = stem if n == 1 else f"{stem}_{n}"
        # a number is taken as soon as any file of its set exists: two sets are never mixed
        if overwrite or not any((d / f"{s}.{f}").exists() for f in taken):
            return {f: d / f"{s}.{f}" for f in formats}
        n += 1


def free_path(path: PathLike, overwrite: bool = False) -> Path:
    """``path`` itself, or with ``overwrite`` False and ``path`` taken, the first free ``<stem>_<n><suffix>``
    beside it (the numbering of :func:`numbered_paths`).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "q.safetensors").write_bytes(b"")
        >>> free_path(d / "q.safetensors").name, free_path(d / "q.safetensors", overwrite=True).name
        ('q_2.safetensors', 'q.safetensors')
    """
    p = Path(path)
    fmt = p.suffix.removeprefix(".")
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    if not fmt:
        n, q = 1, p
        while q.exists() and not overwrite:
            n += 1
            q = p.with_name(f"{p.name}_{n}")
        return q
    return numbered_paths(p.parent, stem, (fmt,), overwrite=overwrite)[fmt]


def write_file_atomic(path: PathLike, write: Any, overwrite: bool = False) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a temporary file beside ``path`` (``write`` may also be
    ``bytes`` or ``str``), which is then moved into place. With ``overwrite`` False an existing ``path`` is never
    replaced: ``FileExistsError`` (the move is a hard link, which fails if the name was taken meanwhile, where
    the file system has hard links). A reader never sees a half-written file; a failure leaves nothing behind.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.bin"
        >>> write_file_atomic(p, b"one").read_bytes()
        b'one'
        >>> write_file_atomic(p, b"two")
        Traceback (most recent call last):
        ...
        FileExistsError: a.bin exists already: not replaced (pass overwrite=True to replace it)
    """
    p = Path(path)
    if not overwrite and p.exists():
        raise FileExistsError(f"{p.name} exists already: not replaced (pass overwrite=True to replace it)")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(p)
    try:
        if isinstance(write, bytes):
            tmp.write_bytes(write)
        elif isinstance(write, str):
            tmp.write_text(write)
        else:
            write(tmp)
        os.chmod(tmp, _default_mode())  # as any new file (some writers create theirs private: 0600)
        if overwrite:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)  # atomic and never clobbers
            except FileExistsError:
                raise FileExistsError(
                    f"{p.name} exists already: not replaced (pass overwrite=True to replace it)"
                ) from None
            except OSError:  # no hard links on this file system: checked above, then the rename
                if p.exists():
                    raise FileExistsError(
                        f"{p.name} exists already: not replaced (pass overwrite=True to replace it)"
                    ) from None
                os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def _temp_beside(path: Path) -> Path:
    """A fresh hidden file name in ``path``'s directory (same file system, so ``os.replace`` is atomic)."""
    import uuid

    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def _default_mode() -> int:
    """The permissions a new file gets here: ``0o666`` less the process umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask
