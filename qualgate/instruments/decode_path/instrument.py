"""The decode-path instrument: a lossy stack's per-step KL and same-top-1 along the baseline's greedy
continuations of the equivalence prompts, scored as it serves, and (with a KV-cache layer) its shape
dependence. Configured by the equivalence section (`decode_path: false` turns it off); its findings
are fidelity metrics, so they are gated and reported as `fidelity.decode_kl_mean` and `fidelity.shape_kl`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from qualgate.chat import prompt_source
from qualgate.fmt import fmt, interval
from qualgate.gate import Finding
from qualgate.instruments.base import (
    Gate,
    Instrument,
    Tiers,
    estimate_metrics,
    numeric_leaves,
    sections,
)
from qualgate.instruments.decode_path.path import BaselinePath, baseline_paths, run_decode_path
from qualgate.instruments.equivalence.section import EquivalenceSection
from qualgate.instruments.generation import without_generation_layers
from qualgate.stack import Stack

if TYPE_CHECKING:
    from qualgate.run.context import RunContext

# A KV cache whose numbers depend on the block a token was written in: the KL between serving shapes of
# one stack. A correct FP8 cache stays below 1e-4 on the bundled model (float32 kernels: ~1e-10); the
# tiers are an order of magnitude under kl_mean's, because this is noise every stacked lossless layer
# inherits, not the quantizer's accepted loss.
SHAPE_KL_WARN = 0.001
SHAPE_KL_FAIL = 0.01


class DecodePath(Instrument[EquivalenceSection]):
    name = "decode_path"
    section = "equivalence"
    Config = EquivalenceSection
    metrics: ClassVar[dict[str, bool]] = {"decode_kl_mean": True, "shape_kl": True}
    reports_as: ClassVar[str | None] = "fidelity"  # the same distributions, along greedy continuations
    default_gate: ClassVar[dict[str, Tiers]] = {"shape_kl": (SHAPE_KL_WARN, SHAPE_KL_FAIL)}

    def __init__(self, config: EquivalenceSection) -> None:
        super().__init__(config)
        self._baseline: list[BaselinePath] | None = None

    @classmethod
    def enabled(cls, config: BaseModel) -> bool:
        return bool(getattr(config, "decode_path", True))

    def baseline_paths(self, ctx: RunContext) -> list[BaselinePath]:
        """The unoptimized model's greedy continuations of the prompts, scored as decoded; computed once
        per run (a record)."""
        if self._baseline is None:
            base = Stack(model=ctx.pipeline.model)
            key, record = ctx.lookup(
                {
                    "instrument": "decode-baseline",
                    "stack": base.identity(),
                    "prompts": self.config.prompt_files(),
                    "chat_template": self.config.chat_template,
                    "max_new_tokens": self.config.max_new_tokens,
                }
            )
            if record is None:
                prompts = self.config.load()
                with ctx.open(base) as session:
                    sources = [prompt_source(session, p.source, self.config.chat_template) for p in prompts]
                    gens = session.generate(sources, max_new_tokens=self.config.max_new_tokens, top_k=2)
                    record = {"paths": [path.as_record() for path in baseline_paths(session, gens)]}
                ctx.put(key, record)
            self._baseline = [BaselinePath.from_record(r) for r in record["paths"]]
        return self._baseline

    def measure(self, stack: Stack, ctx: RunContext) -> dict[str, Any] | None:
        """Shared by stacks that differ only in lossless layers; none for the baseline, and none on an
        endpoint that decides its own shapes (its generations are checked by equivalence)."""
        measured = without_generation_layers(stack)
        if not measured.layers or not ctx.backend.block_scoring:
            return None
        key, record = ctx.lookup(
            {
                "instrument": "decode-path",
                "stack": measured.identity(),
                "prompts": self.config.prompt_files(),
                "chat_template": self.config.chat_template,
                "max_new_tokens": self.config.max_new_tokens,
            }
        )
        if record is None:
            paths = self.baseline_paths(ctx)
            with ctx.open(measured) as session:
                progress = ctx.progress(f"decode path {measured.name}")
                summary = run_decode_path(session, paths, self.config.max_new_tokens, on_prompt=progress)
            record = {"stack": measured.name, "summary": summary}
            ctx.put(key, record)
        return dict(record["summary"])

    def findings(self, section: dict[str, Any], stack: Stack, gate: Gate) -> list[Finding]:
        prompts = section.get("prompts")
        found = [
            gate(self.finding("decode_kl_mean", section["decode_kl_mean"], prompts, "prompts", instrument="fidelity"))
        ]
        if section.get("shape") is not None:
            finding = gate(
                self.finding("shape_kl", section["shape"]["shape_kl"], prompts, "prompts", instrument="fidelity")
            )
            if finding.status != "pass":
                # Shape dependence is the KV layer's property: name it, so a lossless layer stacked on it
                # is not blamed for the noise it inherits.
                kv = next((layer.name for layer in stack.layers if layer.kind == "kv_quant"), "the kv_quant layer")
                finding = replace(
                    finding,
                    reason=f"{finding.reason} (KV layer '{kv}': its numbers depend on the block a token is written in)",
                )
            found.append(finding)
        return found

    @classmethod
    def summary_lines(cls, report: dict[str, Any]) -> list[str]:
        """Lossy stacks along greedy continuations, decoded as served; shape dependence of KV layers."""
        rows = sections(report, "decode_path")
        if not rows:
            return []
        lines = [
            "",
            "### Decode path (greedy continuations, one token at a time through the cache)",
            "",
            "| stack | per-step KL [95%] | same top-1 | exact continuations | first divergence (median) | "
            "shape KL [95%] |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, d in rows:
            kl = d["decode_kl_mean"]
            shape = d.get("shape")
            shape_cell = "-"
            if shape:
                est = shape["shape_kl"]
                shape_cell = interval(est, 2)
            lines.append(
                f"| `{name}` | {interval(kl, 2)} | "
                f"{d['decode_same_top1']['value']:.1%} | {d['exact_match_rate']:.1%} | "
                f"{fmt(d['first_divergence']['median'], 3)} | {shape_cell} |"
            )
        return lines

    @classmethod
    def mlflow_metrics(cls, section: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        yield from estimate_metrics("decode_path/kl_mean", section["decode_kl_mean"])
        yield from estimate_metrics("decode_path/same_top1", section["decode_same_top1"])
        yield "decode_path/kl_max", section.get("decode_kl_max")
        yield "decode_path/exact_match_rate", section.get("exact_match_rate")
        yield "decode_path/first_divergence_median", section["first_divergence"].get("median")
        shape = section.get("shape")
        if shape:
            yield from estimate_metrics("decode_path/shape_kl", shape["shape_kl"])
            yield from numeric_leaves("decode_path/shape_logprob_delta", shape.get("logprob_delta") or {})
