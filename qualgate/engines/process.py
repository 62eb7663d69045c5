"""An engine server as a child process on a free loopback port: launched, waited for, torn down.

Its output goes to a log file that outlives it, so a server that dies names its last words.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from qualgate.errors import InfrastructureError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parent_death_signal() -> None:
    """In the child before exec: prctl(PR_SET_PDEATHSIG, SIGTERM)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


# "NotImplementedError: FP8 KV cache on CPU requires ..." after any logger prefix ("(Worker pid=1) ERROR ... ]").
_EXCEPTION = re.compile(r"(?:^|[\s\]])((?:[A-Za-z_][\w.]*)?(?:Error|Exception): \S.*)$")


def logged_exception(path: Path, raised_only: bool = False) -> str | None:
    """The root-cause exception in a server's log: the first one a traceback ends in (engines wrap it in
    generic ones after it), else (unless `raised_only`) the first one logged at all."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found: list[tuple[bool, str]] = []  # (inside a traceback, the exception line)
    in_traceback = False
    for line in text.splitlines():
        in_traceback = in_traceback or "Traceback (most recent call last)" in line
        match = _EXCEPTION.search(line.strip())
        if match:
            found.append((in_traceback, match.group(1).strip()))
    raised = next((line for inside, line in found if inside), None)
    return raised if raised or raised_only else (found[0][1] if found else None)


def startup_failure(path: Path) -> str:
    """Why a server died while starting: its root-cause exception, else its log's last lines; then
    the log's path."""
    return f"{logged_exception(path) or log_tail(path) or '(empty log)'} (log: {path})"


class ServerProcess:
    name = "server"

    def __init__(self, log: Path, port: int | None = None) -> None:
        self.log = log
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def launch(
        self,
        command: list[str],
        ready: Callable[[], bool],
        timeout: float,
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """Start `command` and return once `ready()` is true (an OSError from it means not yet).

        die_with_parent (Linux): the server gets SIGTERM when this process dies, even by SIGKILL, when
        no atexit handler runs; a managed engine must never outlive the run that started it."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: teardown reaches the workers it spawns
                env={**os.environ, **(env or {})},
                preexec_fn=_parent_death_signal if die_with_parent and sys.platform.startswith("linux") else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise InfrastructureError(
                    f"{self.name} exited with code {code} while starting: {startup_failure(self.log)}"
                )
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise InfrastructureError(
            f"{self.name} on port {self.port} did not come up within {timeout:.0f}s (log: {self.log})"
        )

    def failure(self) -> str | None:
        """Why this server stopped serving (it exited, or its log shows a traceback), for the error a
        failed request raises; None while nothing says it failed."""
        if self.process is not None and self.process.poll() is not None:
            return f"exited with code {self.process.returncode}: {startup_failure(self.log)}"
        cause = logged_exception(self.log, raised_only=True)
        return f"raised {cause} (log: {self.log})" if cause else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace` seconds."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        self.process = None

    def kill(self) -> None:
        """SIGKILL the whole process group: the server dies as a crashed server would."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None
