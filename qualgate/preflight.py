"""Everything a run can check without loading a model, done before the first model load.

`qualgate validate` runs exactly this, so it catches every input-file problem `qualgate run` would:
the optional packages, the model path, layers and stacks, the backend and its options, the golden
(manifest, every array of scores.npz, domain text, noise floor), prompt files, probe text, judge
prompts and benchmark task directories. A mistake is exit 2 before minutes of scoring, not after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qualgate.backends import get_backend
from qualgate.claims import check_claims
from qualgate.config import Pipeline
from qualgate.errors import ConfigError
from qualgate.gate import METRIC_DIRECTION
from qualgate.instruments import Instrument
from qualgate.plan import PlannedStack, plan
from qualgate.requirements import check_installed
from qualgate.stack import Stack


def check_backend(pipeline: Pipeline, stacks: list[Stack], where: str) -> None:
    """Every planned stack can be opened on the pipeline's backend (its layers, its endpoint, its engine
    environment): a mistake is exit 2 before anything runs, not a failure after hours of earlier stacks."""
    try:
        backend = get_backend(pipeline.backend.name, **pipeline.backend.options)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for stack in stacks:
        try:
            backend.check(stack)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _unique_names(planned: list[PlannedStack], where: str) -> None:
    seen: dict[str, tuple[str, ...]] = {}
    for p in planned:
        if p.stack.name in seen:
            raise ConfigError(
                f"{where}: two stacks are named '{p.stack.name}' ({'+'.join(seen[p.stack.name]) or 'baseline'} and "
                f"{'+'.join(p.layer_names) or 'baseline'}); name them apart in stacks[].name"
            )
        seen[p.stack.name] = p.layer_names


@dataclass(frozen=True)
class Checked:
    """What preflight found: the planned stacks, and the pipeline's instruments with what their checks
    opened (the fidelity golden): the run measures with these."""

    planned: list[PlannedStack]
    instruments: list[Instrument[Any]]


def preflight(pipeline: Pipeline, where: str) -> Checked:
    """The planned stacks, once everything checkable without a model has been checked."""
    check_installed(pipeline, where)
    pipeline.model.local_path()  # a missing model directory, before any instrument needs it
    planned = plan(pipeline, pipeline.built_layers(where))
    _unique_names(planned, where)
    check_claims(pipeline.claims, [p.stack.name for p in planned], METRIC_DIRECTION, where)
    check_backend(pipeline, [p.stack for p in planned], where)
    instruments = pipeline.active_instruments()
    for instrument in instruments:
        instrument.check(pipeline, where)
    return Checked(planned, instruments)
