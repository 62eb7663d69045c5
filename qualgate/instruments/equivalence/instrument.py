"""The equivalence instrument: a stack with lossless layers (speculation, prefix caching) must decode
the same greedy tokens as the stack without them; near-ties are told apart from real divergences."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qualgate import chat, golden
from qualgate.errors import ConfigError
from qualgate.fmt import fmt
from qualgate.gate import Finding
from qualgate.instruments.base import Gate, Instrument, Tiers, numeric_leaves, sections
from qualgate.instruments.equivalence.check import run_equivalence
from qualgate.instruments.equivalence.divergence import Divergence
from qualgate.instruments.equivalence.probes import Prompt, prefix_probes, speculation_probes
from qualgate.instruments.equivalence.section import EquivalenceSection, probe_text_path
from qualgate.instruments.generation import GENERATION_KINDS, reference_stack
from qualgate.jsonl import prompt_id, read_prompt_rows
from qualgate.text_source import is_dataset_spec, text_sha256

if TYPE_CHECKING:
    from qualgate.backends.base import Session
    from qualgate.config import Pipeline
    from qualgate.run.context import RunContext
    from qualgate.stack import Stack

_SCALARS = ("exact_match_rate", "real_divergences", "near_ties", "samples", "max_prefix_logprob_diff")


class Equivalence(Instrument[EquivalenceSection]):
    name = "equivalence"
    Config = EquivalenceSection
    metrics: ClassVar[dict[str, bool]] = {"real_divergences": True}
    default_gate: ClassVar[dict[str, Tiers]] = {"real_divergences": (None, 0)}

    def __init__(self, config: EquivalenceSection) -> None:
        super().__init__(config)
        self._probe_text: tuple[str, str] | bool | None = False  # False: not looked up yet

    def inputs(self) -> list[str]:
        probe = self.config.probe_text
        return [*self.config.prompts, *([probe] if probe and not is_dataset_spec(probe) else [])]

    def check(self, pipeline: Pipeline, where: str) -> None:
        """Every prompt file reads, ids are unique across the files, and the probe text reads."""
        owner: dict[str, str] = {}
        for path in self.config.prompts:
            for number, row in read_prompt_rows(Path(path)):
                name = prompt_id(Path(path), number, row)
                if name in owner and owner[name] != path:
                    raise ConfigError(
                        f"{where}: prompt id '{name}' is in both {owner[name]} and {path}; "
                        "ids must be unique across instruments.equivalence.prompts"
                    )
                owner[name] = path
        probe = probe_text_path(self.config, pipeline)
        if probe is not None:
            golden.read_text_file(probe, f"{where}: instruments.equivalence.probe_text")
        if self.config.chat_template:
            chat.require_template(pipeline.model, f"{where}: instruments.equivalence.chat_template")

    def provenance(self, ctx: RunContext) -> dict[str, Any]:
        return {"equivalence_chat_template": chat.provenance(ctx.pipeline.model)} if self.config.chat_template else {}

    def probe_text(self, ctx: RunContext) -> tuple[str, str] | None:
        """(path, sha256) of the text the prefix-cache and speculation probes are cut from; None without
        one: a prefix-cache check then says whether the prompt files exercised the cache at all."""
        if self._probe_text is False:
            path = probe_text_path(self.config, ctx.pipeline)
            self._probe_text = None if path is None else (path, text_sha256(path))
        return self._probe_text  # type: ignore[return-value]

    def data(self, ctx: RunContext) -> list[dict[str, str]]:
        found = [
            {"name": Path(p).stem, "role": "equivalence", "source": p, "sha256": sha}
            for p, sha in self.config.prompt_files().items()
        ]
        probe = self.probe_text(ctx)
        if probe is not None:
            found.append({"name": "probe-text", "role": "equivalence", "source": probe[0], "sha256": probe[1]})
        return found

    def prompts(self, stack: Stack, session: Session, ctx: RunContext) -> list[Prompt]:
        """The prompt files, then probes cut from the domain text for the stack's lossless layers."""
        prompts = self.config.load()
        probe = self.probe_text(ctx)
        if probe is None:
            return prompts
        text_ids = session.encode(golden.read_text_file(probe[0]), add_bos=False)
        prefix = stack.layer("prefix_cache")
        if prefix is not None:
            prompts += prefix_probes(text_ids, session.bos_token_id, int(getattr(prefix.params, "block_size", 16)))
        if stack.layer("speculation") is not None:
            prompts += speculation_probes(text_ids, session.bos_token_id)
        return prompts

    def measure(self, stack: Stack, ctx: RunContext) -> dict[str, Any] | None:
        if not any(layer.kind in GENERATION_KINDS for layer in stack.layers):
            return None
        reference = reference_stack(stack)
        config = self.config.config()
        key, record = ctx.lookup(
            {
                "instrument": "equivalence",
                "stack": stack.identity(),
                "reference": reference.identity(),
                "config": config.model_dump(),
                "prompts": self.config.prompt_files(),
                "probes": self.probe_text(ctx),
            }
        )
        if record is None:
            with ctx.open(stack) as candidate, ctx.open(reference) as ref:
                checkpoint = ctx.store.generations(key)
                result = run_equivalence(candidate, ref, self.prompts(stack, ref, ctx), config, checkpoint=checkpoint)
            record = {"stack": stack.name, "summary": result.summary()}
            ctx.put(key, record)
            checkpoint.discard()
        return dict(record["summary"])

    def findings(self, section: dict[str, Any], stack: Stack, gate: Gate) -> list[Finding]:
        divergences = float(section["real_divergences"])
        found = [gate(Finding(instrument=self.name, metric="real_divergences", value=divergences, low=None, high=None))]
        if section["problems"]:
            # A check that could not do its job (a prefix cache never hit): a failure, whatever the gate says.
            problems = section["problems"]
            found.append(
                Finding(
                    instrument=self.name,
                    metric="checks",
                    value=float(len(problems)),
                    low=None,
                    high=None,
                    fail=0,
                    status="fail",
                    reason="; ".join(problems),
                    gated="fail",
                )
            )
        return found

    @classmethod
    def summary_lines(cls, report: dict[str, Any]) -> list[str]:
        """Lossless layers: tokens, the calibrated tolerance and the drift it judged, probe coverage."""
        rows = sections(report, "equivalence")
        if not rows:
            return []
        lines = [
            "",
            "### Lossless layers (greedy equivalence)",
            "",
            "| stack | reference | exact | real div. | near-ties | noise floor p99.9 | tolerance (source) | "
            "drift p50 / p99 / max | prefix coverage |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, eq in rows:
            tolerance = eq.get("tolerance") or {}
            noise = ((tolerance.get("noise_floor") or {}).get("logprob_delta") or {}).get("p99.9")
            drift = eq.get("prefix_logprob_drift")
            drift_cell = (
                "-" if not drift else f"{fmt(drift['p50'], 2)} / {fmt(drift['p99'], 2)} / {fmt(drift['max'], 2)}"
            )
            coverage = eq.get("coverage") or {}
            cov = f"{coverage['crossed_differing_block']}/{coverage['lookups']}" if coverage else "-"
            lines.append(
                f"| `{name}` | `{eq['reference']}` | {eq['exact_match_rate']:.1%} | {eq['real_divergences']} | "
                f"{eq['near_ties']} | {fmt(noise, 2)} | {fmt(eq['logprob_tolerance'], 2)} "
                f"({tolerance.get('source', 'pipeline')}) | {drift_cell} | {cov} |"
            )
        return lines

    @classmethod
    def mlflow_metrics(cls, section: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        for name in _SCALARS:
            yield f"equivalence/{name}", section.get(name)
        yield from numeric_leaves("equivalence", section.get("layer_stats", {}))
        yield from numeric_leaves("equivalence/drift", section.get("prefix_logprob_drift") or {})
        yield "equivalence/tolerance", section.get("logprob_tolerance")
        noise = ((section.get("tolerance") or {}).get("noise_floor") or {}).get("logprob_delta") or {}
        yield from numeric_leaves("equivalence/noise_floor", noise)
        yield "equivalence/prefix_coverage", (section.get("coverage") or {}).get("crossed_differing_block")
        for group, stats in (section.get("groups") or {}).items():
            yield from numeric_leaves(f"equivalence/group/{group.replace(':', '_')}", stats)

    @classmethod
    def mlflow_params(cls, section: dict[str, Any]) -> dict[str, str]:
        params = {"equivalence.reference": str(section.get("reference"))}
        source = (section.get("tolerance") or {}).get("source")
        if source:
            params["equivalence.tolerance_source"] = str(source)
        return params

    @classmethod
    def mlflow_tables(cls, section: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        import pandas as pd

        columns = list(Divergence.__dataclass_fields__)  # an empty list still gets its columns in the UI
        rows = [{c: d.get(c) for c in columns} for d in section.get("divergences", [])]
        return {"tables/divergences.json": pd.DataFrame(rows, columns=columns)}
