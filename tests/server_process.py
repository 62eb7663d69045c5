"""Test servers (MLflow, llama.cpp) on qualgate's own process handling; `stop` here is a crash."""

from __future__ import annotations

from qualgate.engines.process import ServerProcess as _ServerProcess
from qualgate.engines.process import free_port

__all__ = ["ServerProcess", "free_port"]


class ServerProcess(_ServerProcess):
    def stop(self, grace: float = 0.0) -> None:
        """SIGKILL: the tests stop servers the way a crashed server stops."""
        self.kill()
