"""The pipeline file: what to evaluate, how, and what passes. Parameters only; logic stays in Python.

Every key is checked (unknown keys are errors), and every error names the file, the YAML path and
the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo, model_validator

from qualgate.budgets import check_budgets
from qualgate.claims import Claim
from qualgate.controls import Control, check_controls
from qualgate.errors import ConfigError
from qualgate.gate import METRIC_DIRECTION
from qualgate.instruments import Instrument, instruments_for
from qualgate.instruments.base import INSTRUMENTS
from qualgate.layers import Layer, build_layer
from qualgate.models import ModelSpec
from qualgate.redact import show
from qualgate.registry import did_you_mean
from qualgate.validation import describe, validate
from qualgate.yaml_file import load_yaml

PIPELINE_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendConfig(Strict):
    name: str = "hf"
    options: dict[str, Any] = Field(default_factory=dict)


class StackConfig(Strict):
    name: str | None = None
    layers: list[str]


class TrackingConfig(Strict):
    """Where the run is logged in MLflow (see qualgate.tracking)."""

    enabled: bool = True
    experiment: str | None = Field(default=None, description="MLflow experiment; default: the pipeline name")
    uri: str | None = Field(default=None, description="tracking URI; default: MLFLOW_TRACKING_URI, else ./mlflow.db")


class ExecutorConfig(Strict):
    """Where the stacks are measured: one after another in this process (local), or spread over a Ray
    cluster, one actor per stack (qualgate/executors/ray_executor.py)."""

    name: Literal["local", "ray"] = "local"
    address: str | None = Field(default=None, description="Ray head (host:port); default: start one")
    num_cpus: float = Field(default=1, gt=0, description="CPUs each stack's actor reserves (its torch threads)")
    num_gpus: float = Field(default=0, ge=0, description="GPUs each stack's actor reserves (an engine on a GPU)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per stack actor")
    max_restarts: int = Field(default=2, ge=0, description="restarts of a stack's actor whose process died")
    max_task_retries: int = Field(default=2, ge=0, description="retries of its unfinished call after a restart")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env for the workers")


class Threshold(Strict):
    # NaN compares false with everything: a NaN threshold would pass any stack. Refused at load.
    warn: float | None = Field(default=None, allow_inf_nan=False)
    fail: float | None = Field(default=None, allow_inf_nan=False)


def default_gate(plugins: tuple[type[Instrument[Any]], ...] = ()) -> dict[str, Threshold]:
    """The starting tiers every registered instrument (and a pipeline's plug-ins) declares; tune them
    per model family."""
    kinds = [cls for _, cls in INSTRUMENTS.entries()] + [cls for cls in plugins if cls.name not in INSTRUMENTS]
    return {
        metric: Threshold(warn=warn, fail=fail) for cls in kinds for metric, (warn, fail) in cls.default_gate.items()
    }


C = TypeVar("C", bound=BaseModel)


InconclusivePolicy = Literal["pass", "warn", "fail"]


class Pipeline(Strict):
    version: Literal[1]
    name: str
    model: ModelSpec = ModelSpec()
    backend: BackendConfig = BackendConfig()
    layers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stacks: Literal["auto"] | list[StackConfig] = "auto"
    # Each section validated by its instrument's Config (a registered name, or a plug-in's import path).
    instruments: dict[str, SerializeAsAny[BaseModel]] = Field(default_factory=dict)
    gate: dict[str, Threshold] = Field(default_factory=default_gate)
    # gate.inconclusive in the YAML: what a finding that crosses a threshold only for lack of samples
    # counts as. Kept beside the thresholds for the user, held apart from them here.
    gate_inconclusive: InconclusivePolicy = "warn"
    # gate.budgets in the YAML: per layer, the most it may add to a metric (qualgate/budgets.py).
    budgets: dict[str, dict[str, float]] = Field(default_factory=dict)
    # Published statements checked against this run's numbers (qualgate/claims.py); they do not gate.
    claims: list[Claim] = Field(default_factory=list)
    # Known-bad stacks the run must fail (qualgate/controls.py): proof that the instruments can fail.
    controls: list[Control] = Field(default_factory=list)
    tracking: TrackingConfig = TrackingConfig()
    executor: ExecutorConfig = ExecutorConfig()

    @model_validator(mode="before")
    @classmethod
    def _instrument_sections(cls, data: Any, info: ValidationInfo) -> Any:
        """Every `instruments:` section through its instrument's Config; the default gate includes the
        plug-ins' own tiers."""
        if not isinstance(data, dict) or not isinstance(data.get("instruments"), dict):
            return data
        where = (info.context or {}).get("where", "pipeline")
        sections: dict[str, BaseModel] = {}
        plugins: list[type[Instrument[Any]]] = []
        for key, spec in data["instruments"].items():
            try:
                kinds = instruments_for(str(key))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            plugins += [k for k in kinds if ":" in str(key)]
            if spec is None:
                continue  # `fidelity:` left empty: the instrument is off
            config = kinds[0].Config
            sections[str(key)] = (
                spec if isinstance(spec, config) else validate(config, spec, where, ("instruments", key))
            )
        data = {**data, "instruments": sections}
        gate = data.get("gate", {})
        if isinstance(gate, dict) and set(gate) <= {"inconclusive", "budgets"}:
            data["gate"] = {**default_gate(tuple(plugins)), **gate}  # `gate: {inconclusive: fail}` keeps them
        return data

    @model_validator(mode="before")
    @classmethod
    def _split_gate_policy(cls, data: Any) -> Any:
        gate_keys = set(data["gate"]) if isinstance(data, dict) and isinstance(data.get("gate"), dict) else set()
        if {"inconclusive", "budgets"} & gate_keys:
            gate = dict(data["gate"])
            moved = {"gate_inconclusive": gate.pop("inconclusive")} if "inconclusive" in gate else {}
            if "budgets" in gate:
                moved["budgets"] = gate.pop("budgets")
            # `gate: {inconclusive: fail}` alone keeps the default thresholds with a stricter policy.
            data = {**data, **moved, **({"gate": gate} if gate else {})}
            if not gate:
                data.pop("gate")
        return data

    def config_of(self, kind: type[Instrument[C]]) -> C | None:
        """The section an instrument reads, validated (None: the pipeline does not use it)."""
        return cast(C | None, self.instruments.get(kind.section_key()))

    def active_instruments(self) -> list[Instrument[Any]]:
        """The instruments this pipeline runs, each with its section, in measuring order: the registered
        ones in registration order, then plug-ins named by path in the order the file lists them."""
        found: list[Instrument[Any]] = []
        for _, kind in INSTRUMENTS.entries():
            config = self.instruments.get(kind.section_key())
            if config is not None and kind.enabled(config):
                found.append(kind(config))
        for key, config in self.instruments.items():
            if ":" in key:
                found += [kind(config) for kind in instruments_for(key) if kind.enabled(config)]
        return found

    def built_layers(self, where: str) -> dict[str, Layer[Any]]:
        return {name: build_layer(spec, where=f"{where}: layers.{name}") for name, spec in self.layers.items()}


def check_tier_order(metric: str, tiers: Threshold, where: str) -> None:
    """Warn comes before fail: a looser warn than fail would make the gate judge against the wrong tier."""
    if tiers.warn is None or tiers.fail is None or tiers.warn == tiers.fail:
        return
    bigger_is_worse = METRIC_DIRECTION.get(metric, True)
    if (tiers.warn > tiers.fail) == bigger_is_worse:
        order = "below" if bigger_is_worse else "above"
        raise ConfigError(
            f"{where}: gate.{metric}: warn {tiers.warn:g} must be {order} fail {tiers.fail:g} "
            f"({'bigger' if bigger_is_worse else 'smaller'} is worse for {metric}); swap them"
        )


def load_pipeline(path: Path) -> Pipeline:
    where = str(path)
    if not path.exists():
        raise ConfigError(f"pipeline file '{path}' does not exist; try pipelines/demo.yaml")
    data = load_yaml(path, "pipeline file")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with version, name, model, layers, ...")
    if data.get("version") != PIPELINE_VERSION:
        raise ConfigError(f"{where}: field 'version' must be {PIPELINE_VERSION} (got {show(data.get('version'))})")
    policy = data.get("gate", {}).get("inconclusive", "warn") if isinstance(data.get("gate"), dict) else "warn"
    if policy not in ("pass", "warn", "fail"):
        raise ConfigError(f"{where}: gate.inconclusive must be pass, warn or fail (got {show(policy)})")
    try:
        pipeline = Pipeline.model_validate(data, context={"where": where})
    except ValidationError as exc:
        raise ConfigError(describe(exc, where, Pipeline)) from None
    for metric, tiers in pipeline.gate.items():
        if metric not in METRIC_DIRECTION:
            raise ConfigError(
                f"{where}: gate.{metric} is not a gated metric; {did_you_mean(metric, list(METRIC_DIRECTION))}"
            )
        check_tier_order(metric, tiers, where)
    pipeline.built_layers(where)  # every layer is checked now, not halfway through a run
    check_budgets(pipeline.budgets, pipeline.layers, where)
    if pipeline.stacks != "auto":
        names: dict[str, int] = {}
        for i, stack in enumerate(pipeline.stacks):
            if stack.name is not None:
                if stack.name in names:
                    raise ConfigError(
                        f"{where}: stacks[{i}].name '{stack.name}' is also stacks[{names[stack.name]}].name; "
                        "stack names must be unique (they name report rows, JUnit cases and MLflow runs)"
                    )
                names[stack.name] = i
            for name in stack.layers:
                if name not in pipeline.layers:
                    raise ConfigError(
                        f"{where}: stacks[{i}].layers names '{name}', which is not in layers; "
                        f"{did_you_mean(name, list(pipeline.layers))}"
                    )
    # What a control's must_fail may name: the instrument labels gated findings carry.
    active = pipeline.active_instruments()
    labels = {i.name: (i.reports_as or i.name) if i.metrics else None for i in active}
    stacks = [tuple(s.layers) for s in pipeline.stacks] if pipeline.stacks != "auto" else []
    check_controls(pipeline.controls, pipeline.layers, stacks, labels, where)
    for instrument in active:
        for inst_path in instrument.inputs():
            if not Path(inst_path).exists():
                raise ConfigError(
                    f"{where}: file '{inst_path}' does not exist (paths are relative to the working "
                    "directory: run qualgate from the repository root)"
                )
    return pipeline
