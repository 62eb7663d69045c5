"""The default executor: every stack in this process, one after another."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qualgate.executors import Measured
    from qualgate.instruments import Instrument
    from qualgate.run.runner import Runner


class LocalExecutor:
    def __init__(self) -> None:
        self.placement: dict[str, Any] = {"executor": "local", "stacks": {}}

    def measure(self, runner: Runner, instruments: list[Instrument[Any]]) -> list[Measured]:
        node = socket.gethostname()
        measured: list[Measured] = []
        for planned in runner.planned:
            entry, findings = runner.stack(planned, instruments)
            measured.append((planned, entry, findings))
            self.placement["stacks"][planned.stack.name] = {"node": node}
        return measured
