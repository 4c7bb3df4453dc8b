"""An object whose unpickling would run code: files from users must never be unpickled (tests of the readers)."""

from __future__ import annotations

from pathlib import Path


class Exploit:
    """Unpickling this object would create ``marker`` (a stand-in for os.system & co)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
