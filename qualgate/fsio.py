"""Files in and out, with the exit-code contract: a user's unreadable file is exit 2 naming it, a disk
that refuses a write is exit 3 naming the path and the bytes needed, and nothing is ever half-written.

Every output goes through `atomic_write` (temp file beside the target, fsync, rename): a full disk or
a kill leaves the old file or the new one, never a report cut at 8 KiB. Temp names carry the PID, so
two processes never share one.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

from qualgate.errors import ConfigError, InfrastructureError

# errno values that mean "the environment refused the write", not "qualgate has a bug".
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_failure(path: Path, exc: OSError, needed: int | None = None) -> InfrastructureError:
    """The one-line exit-3 error for a write the environment refused."""
    if exc.errno in _DISK_FULL:
        try:
            free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        except OSError:
            free = 0
        size = f"{needed:,} bytes needed, {free:,} free" if needed is not None else f"{free:,} bytes free"
        return InfrastructureError(
            f"disk full writing {path} ({size}); free space and rerun the same command: finished work is kept"
        )
    if exc.errno in _REFUSED:
        return InfrastructureError(
            f"cannot write {path} ({os.strerror(exc.errno or 0)}); make the directory writable or pass another --out"
        )
    return InfrastructureError(f"cannot write {path} ({exc.strerror or exc}); check the disk and rerun")


def atomic_write(path: Path, data: bytes) -> None:
    """`path` holds `data` whole, or keeps what it held before (never a torn file)."""
    # Per process and thread: two threads may write the same file at once (a judge's control asks the
    # same request in both orders); a shared temporary name made one's rename find the file gone.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # whole on disk before the rename makes it visible
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, exc, len(data)) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def read_text(path: Path, what: str, fix: str = "") -> str:
    """A user's text file, or exit 2 naming it: missing, a directory, unreadable or not UTF-8."""
    hint = f"; {fix}" if fix else ""
    if not path.exists():
        raise ConfigError(f"{what} '{path}' does not exist{hint}")
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' is not a file{hint}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} '{path}' cannot be read ({exc.strerror}){hint}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} '{path}' is not UTF-8 (byte {exc.start}, line {line}); save it as UTF-8{hint}"
        ) from None
