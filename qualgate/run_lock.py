"""One run per run directory: a lock file holding the PID of the run that owns `--out`.

Two runs into one directory would interleave records and overwrite each other's report; the second one
exits 3 at once, naming the holder. A lock left by a process that died (SIGKILL, a lost machine) is
taken over: the PID in it is no longer alive on this host.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from types import TracebackType

from qualgate.errors import InfrastructureError
from qualgate.fsio import write_failure

LOCK_FILE = ".qualgate.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _holder(path: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file, or None when it is unreadable (torn by a kill)."""
    try:
        pid, _, host = path.read_text(encoding="utf-8").strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        me = f"{os.getpid()} {socket.gethostname()}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failure(self.path.parent, exc) from None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(self.path)
                if holder is not None and (holder[1] != socket.gethostname() or _alive(holder[0])):
                    raise InfrastructureError(
                        f"{self.path.parent} is in use by another qualgate run (pid {holder[0]} on {holder[1]}); "
                        f"wait for it, or pass another --out (remove {self.path} if that run is gone)"
                    ) from None
                # A dead holder on this host (or a torn lock): take it over.
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            except OSError as exc:
                raise write_failure(self.path, exc) from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(me + "\n")
            self.held = True
            return
        raise InfrastructureError(f"{self.path}: another run took the lock while this one cleared a stale one; rerun")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
