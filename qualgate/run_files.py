"""Where a run's files live: the one seam between measuring and storage.

Every byte a unit of work keeps (its record, the per-chunk checkpoints of a unit in progress, cached
model requests, per-token arrays and per-sample files) is read and written by a path relative to the run
directory through a `RunFiles`. In one process that is the run directory itself (`LocalFiles`); another
implementation can reach the same directory from elsewhere (a cluster worker writing through the
driver), so the run directory stays the single source of truth.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

from qualgate.fsio import atomic_write


class RunFiles(Protocol):
    def read(self, rel: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""

    def write(self, rel: str, data: bytes) -> None:
        """Atomically: the file holds `data` whole once this returns, never a torn write."""

    def discard(self, rel: str) -> None:
        """Remove a directory of partial work (a finished unit's checkpoints)."""


class LocalFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, rel: str) -> bytes | None:
        path = self.root / rel
        return path.read_bytes() if path.is_file() else None

    def write(self, rel: str, data: bytes) -> None:
        atomic_write(self.root / rel, data)

    def discard(self, rel: str) -> None:
        shutil.rmtree(self.root / rel, ignore_errors=True)
