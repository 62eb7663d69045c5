"""The fidelity instrument: each stack scored on the golden's domain text and compared token by token
with the reference scores recorded there (KL, same top-1, perplexity ratio)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from qualgate import golden, noise_floor
from qualgate.chunking import Chunk
from qualgate.errors import InfrastructureError
from qualgate.gate import Finding
from qualgate.golden_scores import GoldenReference
from qualgate.instruments.base import Gate, Instrument, Tiers, estimate_metrics
from qualgate.instruments.fidelity.compare import compare_scored
from qualgate.instruments.fidelity.scores import FidelityConfig, iter_scores
from qualgate.instruments.generation import without_generation_layers
from qualgate.store import file_sha256
from qualgate.text_source import as_source, is_dataset_spec

if TYPE_CHECKING:
    from qualgate.backends.base import Session
    from qualgate.config import Pipeline
    from qualgate.models import ModelSpec
    from qualgate.run.context import RunContext
    from qualgate.stack import Stack

# Why a fidelity mean or its interval can be non-finite: what the gate names when it refuses one.
KL_CAUSE = (
    "a candidate log-probability was -inf or NaN (a token the stack cannot produce, or a numerical overflow), "
    "or fewer than 2 chunks were scored (no interval); check the stack's logits and the golden's max_chunks"
)
# What a stack's report section keeps of the fidelity summary.
_VIEW = (
    "n_tokens",
    "n_chunks",
    "top_k",
    "block_size",
    "scoring",
    "reference_tail_mass",
    "ppl_reference",
    "ppl_candidate",
    "ln_ppl_ratio",
    "ppl_ratio",
    "kl_mean",
    "kl_estimator",
    "kl_bound",
    "kl_percentiles",
    "same_top1",
    "dp_rms",
    "nll_correlation",
    "kl_by_confidence",
)
_SCALARS = ("ppl_reference", "ppl_candidate", "dp_rms", "nll_correlation", "reference_tail_mass", "merged_mass")
# KL over the reference's top-k plus one tail bucket understates the full KL by roughly the reference's
# share of mass outside its top-k (tests/test_fidelity_crosschecks.py): say so when a stack's KL is
# that bound (an HTTP engine returning only its own top-k, or a golden without a tail sample).
LOOSE_TAIL_MASS = 0.05


class FidelitySection(BaseModel):
    """`instruments.fidelity` in a pipeline file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    golden: str = Field(description="golden directory (qualgate golden record)")
    text: str | None = Field(
        None,
        description="domain text: a file, or {dataset, config, split, field} from the local datasets cache; "
        "default: the source in the golden manifest",
    )

    _text = field_validator("text", mode="before")(as_source)
    block_size: int | None = Field(None, ge=1)
    kv_scoring: Literal["serve", "blocks"] = "serve"
    kv_block_size: int = Field(32, ge=1)


@dataclass(frozen=True)
class GoldenData:
    """What a run reads from the golden once: its directory, chunking, chunks, reference side (streamed
    from disk by each comparison) and the hash of scores.npz (part of every fidelity record's identity)."""

    directory: Path
    config: FidelityConfig
    chunks: list[Chunk]
    reference: GoldenReference
    scores_sha256: str
    manifest: dict[str, Any]


def load_golden(section: FidelitySection, model: ModelSpec, where: str) -> GoldenData:
    """The golden opened whole and checked against this comparison (model files, text, chunking)."""
    golden_dir = Path(section.golden)
    manifest = golden.read_manifest(golden_dir)
    config = manifest.fidelity_config(
        block_size=section.block_size, kv_scoring=section.kv_scoring, kv_block_size=section.kv_block_size
    )
    text = golden.domain_text(golden_dir, manifest, section.text, f"{where}: instruments.fidelity.text")
    source = section.text or manifest.text.get("source")
    chunks, reference = golden.open_reference(golden_dir, model, text, config, source)
    scores = file_sha256(golden_dir / golden.SCORES)
    return GoldenData(golden_dir, config, chunks, reference, scores, manifest.model_dump())


def fidelity_record(
    data: GoldenData,
    stack: Stack,
    ctx: RunContext,
    opener: Callable[[Stack], Session] | None = None,
    role: str | None = None,
) -> dict[str, Any]:
    """The stack scored against the golden (its record: summary and per-token file), reused when a run
    already holds it. `opener` opens the session (default: the pipeline's backend); `role` tells
    records of the same stack apart when they were measured elsewhere (`simulated`: in process)."""
    # Generation-time layers do not change the distribution: the stack without them is measured once.
    measured = without_generation_layers(stack)
    identity = {
        "instrument": "fidelity",
        "stack": measured.identity(),
        "config": data.config.model_dump(),
        "golden": data.scores_sha256,
    }
    key, record = ctx.lookup({**identity, "role": role} if role else identity)
    if record is not None:
        return record
    checkpoint = ctx.store.chunks(key)
    with (opener or ctx.open)(measured) as session, data.reference.rows() as reference:
        progress = ctx.progress(f"fidelity {measured.name}" + (f" ({role})" if role else ""))
        result = compare_scored(iter_scores(session, data.chunks, data.config, reference, progress, checkpoint))
    buffer = io.BytesIO()
    save: Any = np.savez_compressed  # numpy's stub reads **arrays as its allow_pickle flag
    save(buffer, **result.per_token)
    ctx.files.write(f"samples/fidelity.{key}.npz", buffer.getvalue())
    record = {
        "stack": measured.name,
        "golden": str(data.directory),
        "summary": result.summary,
        "per_token": f"samples/fidelity.{key}.npz",
    }
    ctx.put(key, record)
    checkpoint.discard()
    return record


def per_token(record: dict[str, Any], ctx: RunContext) -> dict[str, np.ndarray]:
    """A fidelity record's per-token arrays, read back from the run."""
    data = ctx.files.read(record["per_token"])
    if data is None:
        raise InfrastructureError(f"{record['per_token']} is missing from the run directory; rerun with --fresh")
    with np.load(io.BytesIO(data)) as arrays:
        return {name: arrays[name] for name in arrays.files}


class Fidelity(Instrument[FidelitySection]):
    name = "fidelity"
    Config = FidelitySection
    metrics: ClassVar[dict[str, bool]] = {"kl_mean": True, "same_top1": False, "ppl_ratio": True}
    default_gate: ClassVar[dict[str, Tiers]] = {
        "kl_mean": (0.01, 0.05),
        "same_top1": (0.95, 0.90),
        "ppl_ratio": (1.15, 1.30),
    }

    def __init__(self, config: FidelitySection) -> None:
        super().__init__(config)
        self.golden: GoldenData | None = None

    def inputs(self) -> list[str]:
        text = self.config.text
        return [self.config.golden, *([text] if text and not is_dataset_spec(text) else [])]

    def check(self, pipeline: Pipeline, where: str) -> None:
        """The golden opens whole and belongs to this comparison; the thresholds are above its noise
        floor. The run reuses what this opened."""
        self.golden = load_golden(self.config, pipeline.model, where)
        floors = noise_floor.floor_values(self.golden.directory)
        for metric, tiers in pipeline.gate.items():
            for threshold in (tiers.warn, tiers.fail):
                if threshold is not None:
                    noise_floor.check_thresholds({metric: threshold}, floors, f"{where}: gate")

    def opened(self, ctx: RunContext) -> GoldenData:
        if self.golden is None:
            self.golden = load_golden(self.config, ctx.pipeline.model, ctx.where)
        return self.golden

    def data(self, ctx: RunContext) -> list[dict[str, str]]:
        data = self.opened(ctx)
        source = self.config.text or data.manifest["text"].get("source") or "(recorded text)"
        return [
            {"name": "domain-text", "role": "fidelity", "source": source, "sha256": data.manifest["text"]["sha256"]},
            {"name": "golden", "role": "fidelity", "source": self.config.golden, "sha256": data.scores_sha256},
        ]

    def provenance(self, ctx: RunContext) -> dict[str, Any]:
        return {"golden": self.opened(ctx).manifest}

    def measure(self, stack: Stack, ctx: RunContext) -> dict[str, Any]:
        record = fidelity_record(self.opened(ctx), stack, ctx)
        s = record["summary"]
        # merged_mass: reference top-k mass an HTTP engine did not return (0 in process and in old records)
        return {
            **{k: s[k] for k in _VIEW if k in s},
            "merged_mass": s.get("merged_mass", 0.0),
            "per_token": record["per_token"],
        }

    def findings(self, section: dict[str, Any], stack: Stack, gate: Gate) -> list[Finding]:
        chunks = section.get("n_chunks")
        return [
            gate(self.finding("kl_mean", section["kl_mean"], chunks, "chunks", cause=KL_CAUSE)),
            gate(self.finding("ppl_ratio", section["ppl_ratio"], chunks, "chunks", cause=KL_CAUSE)),
            gate(self.finding("same_top1", section["same_top1"], section.get("n_tokens"), "tokens")),
        ]

    @classmethod
    def summary_lines(cls, report: dict[str, Any]) -> list[str]:
        """A note under the summary when a stack's KL is the top-k bound rather than an estimate."""
        bounded = [
            (stack["name"], fidelity)
            for stack in report["stacks"]
            if (fidelity := stack.get("instruments", {}).get("fidelity"))
            and fidelity.get("kl_estimator", {}).get("kind", "bound") == "bound"
        ]
        if not bounded:
            return []
        names = ", ".join(f"`{name}`" for name, _ in bounded)
        k, tail = bounded[0][1]["top_k"], bounded[0][1]["reference_tail_mass"]
        why = bounded[0][1].get("kl_estimator", {}).get("why", "the golden has no tail sample")
        lines = ["", f"> KL of {names} is a lower bound (top-{k} plus one tail bucket: {why}), not an estimate."]
        if tail > LOOSE_TAIL_MASS:
            lines.append(
                f"> {tail:.0%} of the reference's probability lies outside its top-{k}, so it may be understated "
                "by about that share: gate it with care, or score the stack in process against a golden with a "
                "tail sample."
            )
        return lines

    @classmethod
    def mlflow_metrics(cls, section: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        for name in ("kl_mean", "ppl_ratio", "ln_ppl_ratio", "same_top1"):
            yield from estimate_metrics(f"fidelity/{name}", section.get(name))
        for name in (*_SCALARS, "n_tokens"):
            yield f"fidelity/{name}", section.get(name)
        for name, value in section.get("kl_percentiles", {}).items():
            yield f"fidelity/kl_{name}", value
        for bucket in section.get("kl_by_confidence", []):
            # `[0.25,0.5)` -> `0.25-0.5`: MLflow keys allow only letters, digits, `_-. /`.
            yield f"fidelity/kl_confidence_{bucket['bucket'].strip('[]()').replace(',', '-')}", bucket["kl_mean"]

    @classmethod
    def mlflow_params(cls, section: dict[str, Any]) -> dict[str, str]:
        return {"fidelity.top_k": str(section.get("top_k"))}

    @classmethod
    def mlflow_tables(cls, section: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        path = run_dir / section["per_token"] if section.get("per_token") else None
        if path is None or not path.is_file():
            return {}
        import pandas as pd

        with np.load(path) as data:
            return {"tables/fidelity_tokens.json": pd.DataFrame({key: data[key] for key in data.files})}
