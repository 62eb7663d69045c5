"""The instrument extension point: one class per way of measuring a stack, and its registry.

An instrument owns everything about its measurement, so adding one is a module plus one registration:

- `Config`, the pydantic model of its section under `instruments:` in the pipeline file;
- `metrics`, the gated metrics it produces with their direction, and `default_gate`, their starting
  thresholds (a pipeline's `gate:` may name any registered metric);
- `measure(stack, ctx)`: run the stack through the shared run context (store, sessions, progress) and
  return the stack's section of the report, or None when the stack is not its business;
- `findings(section, stack, gate)`: the gated numbers of that section (`gate` applies the thresholds);
- `summary_lines`, `mlflow_metrics`, `mlflow_params`, `mlflow_tables`: how the section reads in
  summary.md and in MLflow. These read report.json alone (no run context), so `qualgate track` can
  log a finished run; the defaults log every number of the section and add nothing to the summary.

Built-ins register with `register_instrument` (instruments/__init__.py) as a plug-in does; a pipeline may also name an
instrument class by its import path (`instruments: {"mypkg.latency:Latency": {...}}`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from qualgate.errors import ConfigError
from qualgate.gate import METRIC_DIRECTION, Finding
from qualgate.registry import Registry, did_you_mean, import_object

if TYPE_CHECKING:
    from qualgate.config import Pipeline
    from qualgate.requirements import Need
    from qualgate.run.context import RunContext
    from qualgate.stack import Stack

C = TypeVar("C", bound=BaseModel)
Tiers = tuple[float | None, float | None]  # (warn, fail)
Gate = Callable[[Finding], Finding]


class Instrument(ABC, Generic[C]):
    """A way of measuring a stack against the unoptimized model. Subclass, set the class attributes,
    implement `measure` and `findings`, and register it."""

    name: ClassVar[str]  # the stack's report section and the MLflow metric prefix
    # The `instruments:` key its configuration is read from (default: `name`). Two instruments may share
    # one section: decode-path fidelity is measured on the equivalence prompts.
    section: ClassVar[str | None] = None
    Config: ClassVar[type[BaseModel]]
    metrics: ClassVar[dict[str, bool]] = {}  # gated metric -> bigger is worse
    # The `instrument` its findings carry when not its own name (the decode path reports as fidelity).
    reports_as: ClassVar[str | None] = None
    default_gate: ClassVar[dict[str, Tiers]] = {}
    needs: ClassVar[tuple[Need, ...]] = ()  # optional packages it imports (checked before a run)

    def __init__(self, config: C) -> None:
        self.config = config

    @classmethod
    def section_key(cls) -> str:
        return cls.section or cls.name

    @classmethod
    def enabled(cls, config: BaseModel) -> bool:
        """Whether a pipeline with this section runs the instrument (e.g. `decode_path: false`)."""
        return True

    # -- before the run (qualgate validate) ----------------------------------------------------------
    def inputs(self) -> list[str]:
        """Files and directories the configuration names: each must exist."""
        return []

    def check(self, pipeline: Pipeline, where: str) -> None:
        """What can be checked without a model (file formats, ids); raise ConfigError naming the fix."""

    def data(self, ctx: RunContext) -> list[dict[str, str]]:
        """Its evaluation inputs as `{name, role, source, sha256}` (report provenance, MLflow datasets)."""
        return []

    def provenance(self, ctx: RunContext) -> dict[str, Any]:
        """Entries it adds to the report's provenance (the fidelity golden's manifest)."""
        return {}

    # -- the run ---------------------------------------------------------------------------------------
    @abstractmethod
    def measure(self, stack: Stack, ctx: RunContext) -> dict[str, Any] | None:
        """The stack's report section (JSON-able), reusing finished work through `ctx.lookup`."""

    def close(self) -> None:
        """Stop what `measure` started for the run (a served judge); called once every stack is measured,
        or the run failed."""

    @abstractmethod
    def findings(self, section: dict[str, Any], stack: Stack, gate: Gate) -> list[Finding]:
        """Every gated number of the section, each passed through `gate`."""

    def finding(self, metric: str, estimate: dict[str, Any], n: int | None, unit: str, **kw: Any) -> Finding:
        """A finding of one of `metrics` from an estimate `{value, low, high}`."""
        return Finding(
            instrument=kw.pop("instrument", self.name),
            metric=metric,
            value=estimate["value"],
            low=estimate.get("low"),
            high=estimate.get("high"),
            n=n,
            unit=unit,
            **kw,
        )

    # -- publishing (from report.json alone) ---------------------------------------------------------
    @classmethod
    def summary_lines(cls, report: dict[str, Any]) -> list[str]:
        """Its section of summary.md (a heading and a table), or nothing."""
        return []

    @classmethod
    def charts(cls, report: dict[str, Any], run_dir: Path) -> list[Path]:
        """PNGs it draws from the report into RUN_DIR/plots when the run is written: summary.md links
        them (summary_lines) and they are logged with the run's plots to MLflow."""
        return []

    @classmethod
    def mlflow_metrics(cls, section: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """(key, value) pairs logged on the stack's MLflow run; default: every number of the section."""
        yield from numeric_leaves(cls.name, section)

    @classmethod
    def mlflow_params(cls, section: dict[str, Any]) -> dict[str, str]:
        return {}

    @classmethod
    def mlflow_tables(cls, section: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        """Artifact path -> pandas DataFrame (MLflow tables) or Path (a file) for the stack's run."""
        return {}

    @classmethod
    def mlflow_traces(cls, section: dict[str, Any]) -> list[TraceRecord]:
        """GenAI traces with assessments for the stack's run (MLflow's trace and evaluation views)."""
        return []


@dataclass(frozen=True)
class Assessment:
    """A judge's feedback on one trace: name, value, the reply it came from, who gave it."""

    name: str
    value: Any
    rationale: str
    source: str


@dataclass(frozen=True)
class TraceRecord:
    name: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    tags: dict[str, str]
    assessments: list[Assessment]


def numeric_leaves(prefix: str, tree: Any) -> Iterator[tuple[str, Any]]:
    """`prefix/a/b` for every finite number (or bool) in a nested mapping."""
    if isinstance(tree, dict):
        for key, value in sorted(tree.items()):
            yield from numeric_leaves(f"{prefix}/{key}", value)
    elif isinstance(tree, bool) or (isinstance(tree, int | float) and math.isfinite(tree)):
        yield prefix, tree


def estimate_metrics(key: str, estimate: dict[str, Any] | None) -> Iterator[tuple[str, Any]]:
    """An interval as `key`, `key_low`, `key_high`."""
    if isinstance(estimate, dict):
        for part, suffix in (("value", ""), ("low", "_low"), ("high", "_high")):
            yield f"{key}{suffix}", estimate.get(part)


INSTRUMENTS: Registry[type[Instrument[Any]]] = Registry("instrument")
InstrumentClass = TypeVar("InstrumentClass", bound=type[Instrument[Any]])


def _claim_metrics(cls: type[Instrument[Any]]) -> None:
    """Record the directions of the metrics `cls` declares. Metric names are the gate's keys, so they are
    unique across instruments: one declared with the opposite direction is refused."""
    for metric, bigger_is_worse in cls.metrics.items():
        known = METRIC_DIRECTION.setdefault(metric, bigger_is_worse)
        if known != bigger_is_worse:
            raise ConfigError(
                f"instrument '{cls.name}' declares metric '{metric}' with the opposite direction of an "
                "instrument registered before it; rename the metric"
            )


def register_instrument(cls: InstrumentClass) -> InstrumentClass:
    """Class decorator: the instrument under its `name` (what `instruments:` and reports call it)."""
    _claim_metrics(cls)
    return INSTRUMENTS.register(cls.name)(cls)  # type: ignore[return-value]


def instruments_for(key: str, where: str = "instruments") -> list[type[Instrument[Any]]]:
    """The instruments that read the `instruments:` section `key`: the registered ones whose section it
    is (in registration order, the order they measure in), else the plug-in class it names by path."""
    found = [cls for _, cls in INSTRUMENTS.entries() if cls.section_key() == key]
    if found:
        return found
    if ":" not in key:
        sections = list(dict.fromkeys(cls.section_key() for _, cls in INSTRUMENTS.entries()))
        raise ConfigError(
            f"unknown field '{where}.{key}'; {did_you_mean(key, sections)} "
            f"(valid fields here: {', '.join(sorted(sections))}, or a plug-in as 'package.module:Class')"
        )
    cls = import_object(key, "instrument")
    if not isinstance(cls, type) or not issubclass(cls, Instrument):
        raise ConfigError(f"{where}.{key}: '{key}' is not an instrument; a plug-in must subclass qualgate.Instrument")
    taken = INSTRUMENTS.entries()
    if any(name == cls.name and other is not cls for name, other in taken):
        raise ConfigError(f"{where}.{key}: its name '{cls.name}' is a registered instrument's; rename it")
    _claim_metrics(cls)
    return [cls]


def plugin_path(instrument: Instrument[Any]) -> str | None:
    """`module:Class` of an instrument that is not registered under its name (a plug-in named by path)."""
    kind = type(instrument)
    if kind.name in INSTRUMENTS and INSTRUMENTS.get(kind.name) is kind:
        return None
    return f"{kind.__module__}:{kind.__qualname__}"


def publishers(report: dict[str, Any]) -> list[type[Instrument[Any]]]:
    """The instrument classes that render and log a report's sections: the registered ones, then the
    plug-ins its provenance names (`plugins`: name -> path). A plug-in that no longer imports is skipped:
    its sections are still logged, as plain numbers."""
    found = [cls for _, cls in INSTRUMENTS.entries()]
    for name, path in (report.get("provenance", {}).get("plugins") or {}).items():
        if name in INSTRUMENTS:
            continue
        try:
            cls = import_object(str(path), "instrument")
        except ConfigError:
            continue
        if isinstance(cls, type) and issubclass(cls, Instrument):
            found.append(cls)
    return found


def sections(report: dict[str, Any], name: str) -> list[tuple[str, dict[str, Any]]]:
    """(stack name, section) of every stack in a report that has the section `name`."""
    found = [(stack["name"], stack.get("instruments", {}).get(name)) for stack in report["stacks"]]
    return [(stack, section) for stack, section in found if section]
