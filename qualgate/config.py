"""The pipeline file: what to evaluate, how, and what passes. Parameters only; logic stays in Python.

Every key is checked (unknown keys are errors), and every error names the file, the YAML path and
the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qualgate.errors import ConfigError
from qualgate.instruments.benchmarks.config import BenchmarksConfig
from qualgate.instruments.equivalence import EquivalenceConfig
from qualgate.instruments.equivalence.check import TOLERANCE_FACTOR, TOLERANCE_FLOOR
from qualgate.instruments.judge.config import JudgeConfig
from qualgate.layers import Layer, build_layer
from qualgate.models import ModelSpec
from qualgate.redact import show
from qualgate.registry import did_you_mean
from qualgate.validation import describe
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


class FidelityInstrument(Strict):
    golden: str = Field(description="golden directory (qualgate golden record)")
    text: str | None = Field(None, description="domain text; default: the path in the golden manifest")
    block_size: int | None = Field(None, ge=1)
    kv_scoring: Literal["serve", "blocks"] = "serve"
    kv_block_size: int = Field(32, ge=1)


class EquivalenceInstrument(Strict):
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(EquivalenceConfig.model_fields["max_new_tokens"].default, ge=1)
    eps: float = Field(EquivalenceConfig.model_fields["eps"].default, ge=0)
    # None: calibrated per check from the reference stack's own noise in the candidate's shapes.
    logprob_tolerance: float | None = Field(None, ge=0)
    tolerance_factor: float = Field(TOLERANCE_FACTOR, gt=0)
    tolerance_floor: float = Field(TOLERANCE_FLOOR, ge=0)
    # Prompt pairs built from domain text for prefix caching and acceptance groups for speculation.
    probes: bool = True
    probe_text: str | None = Field(None, description="text for the probes; default: the fidelity domain text")
    # Greedy continuations of lossy stacks scored as they serve (per-step KL, shape dependence).
    decode_path: bool = True

    def config(self) -> EquivalenceConfig:
        return EquivalenceConfig.model_validate(
            {
                "max_new_tokens": self.max_new_tokens,
                "eps": self.eps,
                "logprob_tolerance": self.logprob_tolerance,
                "tolerance_factor": self.tolerance_factor,
                "tolerance_floor": self.tolerance_floor,
            }
        )


class Instruments(Strict):
    fidelity: FidelityInstrument | None = None
    equivalence: EquivalenceInstrument | None = None
    benchmarks: BenchmarksConfig | None = None
    judge: JudgeConfig | None = None


class TrackingConfig(Strict):
    """Where the run is logged in MLflow (see qualgate.tracking)."""

    enabled: bool = True
    experiment: str | None = Field(default=None, description="MLflow experiment; default: the pipeline name")
    uri: str | None = Field(default=None, description="tracking URI; default: MLFLOW_TRACKING_URI, else ./mlflow.db")


class Threshold(Strict):
    # NaN compares false with everything: a NaN threshold would pass any stack. Refused at load.
    warn: float | None = Field(default=None, allow_inf_nan=False)
    fail: float | None = Field(default=None, allow_inf_nan=False)


# A KV cache whose numbers depend on the block a token was written in: the KL between serving shapes of
# one stack. A correct FP8 cache stays below 1e-4 on the bundled model (float32 kernels: ~1e-10); the
# tiers are an order of magnitude under kl_mean's, because this is noise every stacked lossless layer
# inherits, not the quantizer's accepted loss.
SHAPE_KL_WARN = 0.001
SHAPE_KL_FAIL = 0.01


def default_gate() -> dict[str, Threshold]:
    """The default starting tiers (tune per model family)."""
    return {
        "kl_mean": Threshold(warn=0.01, fail=0.05),
        "same_top1": Threshold(warn=0.95, fail=0.90),
        "ppl_ratio": Threshold(warn=1.15, fail=1.30),
        "real_divergences": Threshold(fail=0),
        "recovery": Threshold(warn=0.99, fail=0.97),
        "net_loss": Threshold(warn=0.05, fail=0.10),
        "shape_kl": Threshold(warn=SHAPE_KL_WARN, fail=SHAPE_KL_FAIL),
    }


InconclusivePolicy = Literal["pass", "warn", "fail"]


class Pipeline(Strict):
    version: Literal[1]
    name: str
    model: ModelSpec = ModelSpec()
    backend: BackendConfig = BackendConfig()
    layers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stacks: Literal["auto"] | list[StackConfig] = "auto"
    instruments: Instruments = Instruments()
    gate: dict[str, Threshold] = Field(default_factory=default_gate)
    # gate.inconclusive in the YAML: what a finding that crosses a threshold only for lack of samples
    # counts as. Kept beside the thresholds for the user, held apart from them here.
    gate_inconclusive: InconclusivePolicy = "warn"
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _split_gate_policy(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("gate"), dict) and "inconclusive" in data["gate"]:
            gate = dict(data["gate"])
            policy = gate.pop("inconclusive")
            # `gate: {inconclusive: fail}` alone keeps the default thresholds with a stricter policy.
            data = {**data, "gate_inconclusive": policy, **({"gate": gate} if gate else {})}
            if not gate:
                data.pop("gate")
        return data

    def built_layers(self, where: str) -> dict[str, Layer[Any]]:
        return {name: build_layer(spec, where=f"{where}: layers.{name}") for name, spec in self.layers.items()}


GATE_METRICS = (
    "kl_mean",
    "same_top1",
    "ppl_ratio",
    "real_divergences",
    "recovery",
    "net_loss",
    "shape_kl",
    "decode_kl_mean",
)


def check_tier_order(metric: str, tiers: Threshold, where: str) -> None:
    """Warn comes before fail: a looser warn than fail would make the gate judge against the wrong tier."""
    from qualgate.gate import METRIC_DIRECTION

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
        pipeline = Pipeline.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, where, Pipeline)) from None
    for metric, tiers in pipeline.gate.items():
        if metric not in GATE_METRICS:
            raise ConfigError(
                f"{where}: gate.{metric} is not a gated metric; {did_you_mean(metric, list(GATE_METRICS))}"
            )
        check_tier_order(metric, tiers, where)
    pipeline.built_layers(where)  # every layer is checked now, not halfway through a run
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
    for inst_path in _paths(pipeline):
        if not Path(inst_path).exists():
            raise ConfigError(
                f"{where}: file '{inst_path}' does not exist (paths are relative to the working "
                "directory: run qualgate from the repository root)"
            )
    return pipeline


def _paths(pipeline: Pipeline) -> list[str]:
    paths: list[str] = []
    if pipeline.instruments.fidelity is not None:
        paths.append(pipeline.instruments.fidelity.golden)
        if pipeline.instruments.fidelity.text:
            paths.append(pipeline.instruments.fidelity.text)
    if pipeline.instruments.equivalence is not None:
        paths.extend(pipeline.instruments.equivalence.prompts)
        if pipeline.instruments.equivalence.probe_text:
            paths.append(pipeline.instruments.equivalence.probe_text)
    if pipeline.instruments.benchmarks is not None:
        paths.extend(pipeline.instruments.benchmarks.include)
    if pipeline.instruments.judge is not None:
        paths.append(pipeline.instruments.judge.prompts)
    return paths
