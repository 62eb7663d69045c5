"""Executors: where a run's stacks are measured. The runner plans, gates and reports; an executor only
measures every planned stack with every instrument and hands back, in plan order, what the runner would
have computed itself, so the report does not depend on where the work ran.

`local` (the default) measures the stacks one after another in this process; `ray` spreads them over a
Ray cluster, one actor per stack, every file written through the driver (executors/ray_executor.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from qualgate.config import ExecutorConfig
    from qualgate.gate import Finding
    from qualgate.instruments import Instrument
    from qualgate.plan import PlannedStack
    from qualgate.run.runner import Runner

# Where each stack ran (executor, node), beside report.json: tracking tags it, the report never holds it
# (the same pipeline gives the same report.json bytes on any executor).
EXECUTOR_FILE = "executor.json"

Measured = tuple["PlannedStack", dict[str, Any], list["Finding"]]


class Executor(Protocol):
    placement: dict[str, Any]  # {"executor": name, "stacks": {stack name: {"node": ...}}, ...}

    def measure(self, runner: Runner, instruments: list[Instrument[Any]]) -> list[Measured]:
        """Every planned stack's report entry (without a verdict yet) and findings, in plan order."""


def executor_for(config: ExecutorConfig) -> Executor:
    if config.name == "ray":
        from qualgate.executors.ray_executor import RayExecutor

        return RayExecutor(config)
    from qualgate.executors.local import LocalExecutor

    return LocalExecutor()
