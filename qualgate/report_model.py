"""report.json as a typed, versioned document: written and read through these models.

Version 2 (this one) is strict JSON (a non-finite number is null) and every finding carries its sample
size, unit, interval kind and `n_needed`. Version 1 files (before the exit-code contract) still load:
the fields they lack take their defaults. A version this qualgate does not know is refused (exit 2),
never half-read: a newer report read by older code would otherwise gate on fields it ignores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qualgate.errors import ConfigError
from qualgate.fsio import read_text
from qualgate.redact import show

REPORT_VERSION = 2
KNOWN_VERSIONS = (1, 2)
Status = Literal["pass", "inconclusive", "warn", "fail", "error"]
Verdict = Literal["pass", "warn", "fail"]


class _Record(BaseModel):
    # Instruments add fields of their own (a plug-in's section, an engine probe's findings): kept, typed
    # where qualgate reads them.
    model_config = ConfigDict(extra="allow", frozen=True)


class FindingRecord(_Record):
    instrument: str
    metric: str
    value: float | None
    low: float | None = None
    high: float | None = None
    warn: float | None = None
    fail: float | None = None
    status: Status
    reason: str
    gated: Status | None = None
    pessimistic: float | None = None
    n: int | None = None
    unit: str | None = None
    interval: str | None = None
    cause: str | None = None
    n_needed: int | None = None


class ClaimRecord(_Record):
    stack: str
    metric: str
    bound: dict[str, float]
    verdict: Literal["holds", "refuted", "inconclusive"]
    n_needed: int | None = None
    reason: str = ""


class StackRecord(_Record):
    name: str
    role: str
    step: int
    lossless: bool
    layers: list[dict[str, Any]]
    instruments: dict[str, Any]
    findings: list[FindingRecord]
    verdict: Verdict
    measured: Verdict | None = None
    inconclusive: list[Any] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)


class Report(_Record):
    report_version: int
    pipeline: str
    verdict: Verdict
    measured: Verdict | None = None
    inconclusive: int = 0
    gate_policy: dict[str, Any] = Field(default_factory=dict)
    reasons: list[str] = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict)
    stacks: list[StackRecord]
    compound: dict[str, Any] = Field(default_factory=dict)
    claims: list[ClaimRecord] | None = None  # absent when the pipeline lists no claims


def parse(data: Any, where: str) -> Report:
    """A report from its JSON data, or exit 2 naming `where` and what is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is not a qualgate report (a JSON object); rerun the pipeline")
    version = data.get("report_version")
    if version is None:
        raise ConfigError(f"{where} is not a qualgate report (no report_version); rerun the pipeline")
    if version not in KNOWN_VERSIONS:
        raise ConfigError(
            f"{where}: report_version {show(version)} is not one this qualgate reads "
            f"({', '.join(map(str, KNOWN_VERSIONS))}); "
            "read it with the qualgate that wrote it (provenance.qualgate), or rerun the pipeline"
        )
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{where} is not a qualgate report ({path}: {first['msg']}); rerun the pipeline") from None


def load(path: Path) -> Report:
    try:
        data = json.loads(read_text(path, "report"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); rerun the pipeline to rewrite it"
        ) from None
    return parse(data, str(path))
