"""An instrument plug-in, as a user writes one (docs/extending.md shows the same class): the share of
prompts whose first greedy token is the unoptimized model's, with its Wilson interval.

Named in a pipeline by its path: `instruments: {"plugin_instruments:FirstToken": {prompts: ...}}`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from qualgate import Instrument, Stack
from qualgate.fmt import interval
from qualgate.instruments.base import Tiers, sections
from qualgate.jsonl import read_prompt_rows
from qualgate.stats import proportion
from qualgate.store import file_sha256


class FirstTokenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: str  # JSONL with a `prompt` per line


class FirstToken(Instrument[FirstTokenConfig]):
    name = "first_token"
    Config = FirstTokenConfig
    metrics: ClassVar[dict[str, bool]] = {"first_token_agreement": False}  # smaller is worse
    default_gate: ClassVar[dict[str, Tiers]] = {"first_token_agreement": (0.9, 0.8)}

    def inputs(self) -> list[str]:
        return [self.config.prompts]

    def first_tokens(self, stack: Stack, ctx: Any) -> list[int]:
        # A unit of work keyed by everything it depends on: a rerun reuses it, a changed file does not.
        key, record = ctx.lookup(
            {"instrument": self.name, "stack": stack.identity(), "prompts": file_sha256(Path(self.config.prompts))}
        )
        if record is None:
            prompts = [row["prompt"] for _, row in read_prompt_rows(Path(self.config.prompts))]
            with ctx.open(stack) as session:
                record = {"tokens": [g.token_ids[0] for g in session.generate(prompts, max_new_tokens=1)]}
            ctx.put(key, record)
        return list(record["tokens"])

    def measure(self, stack: Stack, ctx: Any) -> dict[str, Any] | None:
        if not stack.layers:
            return None  # the baseline agrees with itself
        baseline = self.first_tokens(Stack(model=ctx.pipeline.model), ctx)
        same = np.array(self.first_tokens(stack, ctx)) == np.array(baseline)
        return {"agreement": proportion(same).as_dict(), "prompts": int(same.size)}

    def findings(self, section: dict[str, Any], stack: Stack, gate: Any) -> list[Any]:
        return [gate(self.finding("first_token_agreement", section["agreement"], section["prompts"], "prompts"))]

    @classmethod
    def summary_lines(cls, report: dict[str, Any]) -> list[str]:
        rows = sections(report, cls.name)
        if not rows:
            return []
        lines = ["", "### First token (greedy, vs the baseline)", "", "| stack | agreement [95%] |", "| --- | --- |"]
        return lines + [f"| `{name}` | {interval(section['agreement'])} |" for name, section in rows]

    @classmethod
    def mlflow_metrics(cls, section: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        yield "first_token/agreement", section["agreement"]["value"]
        yield "first_token/agreement_low", section["agreement"]["low"]
