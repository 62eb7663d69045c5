"""The judge instrument: each stack's answers against the baseline's, judged pairwise in both orders by
an LLM behind any OpenAI-compatible endpoint, with a sensitivity control (the baseline against its own
answers scrambled) and validity rules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qualgate import chat
from qualgate.fmt import fmt, interval
from qualgate.gate import Finding
from qualgate.instruments.base import (
    Assessment,
    Gate,
    Instrument,
    Tiers,
    TraceRecord,
    estimate_metrics,
    sections,
)
from qualgate.instruments.judge.client import JudgeClient, judge_identity
from qualgate.instruments.judge.config import JudgeConfig
from qualgate.instruments.judge.run import answers as judge_answers
from qualgate.instruments.judge.run import load_prompts, run_judge
from qualgate.instruments.judge.server import JudgeServer, served_file
from qualgate.instruments.judge.stats import combine
from qualgate.jsonl import read_prompt_rows
from qualgate.requirements import Need
from qualgate.stack import Stack
from qualgate.store import file_sha256, identity_key

if TYPE_CHECKING:
    from qualgate.config import Pipeline
    from qualgate.run.context import RunContext


class Judge(Instrument[JudgeConfig]):
    name = "judge"
    Config = JudgeConfig
    metrics: ClassVar[dict[str, bool]] = {"net_loss": True}
    default_gate: ClassVar[dict[str, Tiers]] = {"net_loss": (0.05, 0.10)}
    needs = (Need("openai", "openai", "judge", "the judge instrument"),)

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__(config)
        self._baseline: list[str] | None = None
        self._server: JudgeServer | None = None

    def inputs(self) -> list[str]:
        return [self.config.prompts]

    def check(self, pipeline: Pipeline, where: str) -> None:
        read_prompt_rows(Path(self.config.prompts), "judge prompts")
        if self.config.serve:
            served_file(self.config.serve, f"{where}: instruments.judge.serve")
        if self.config.chat_template:
            chat.require_template(pipeline.model, f"{where}: instruments.judge.chat_template")

    def provenance(self, ctx: RunContext) -> dict[str, Any]:
        return {"judge_chat_template": chat.provenance(ctx.pipeline.model)} if self.config.chat_template else {}

    def data(self, ctx: RunContext) -> list[dict[str, str]]:
        path = self.config.prompts
        return [{"name": Path(path).stem, "role": "judge", "source": path, "sha256": file_sha256(Path(path))}]

    def answers(self, stack: Stack, ctx: RunContext) -> list[str]:
        key, record = ctx.lookup(
            {
                "instrument": "judge-answers",
                "stack": stack.identity(),
                "prompts": file_sha256(Path(self.config.prompts)),
                "max_answer_tokens": self.config.max_answer_tokens,
                "chat_template": self.config.chat_template,
            }
        )
        if record is None:
            prompts = load_prompts(Path(self.config.prompts))
            with ctx.open(stack) as session:
                record = {
                    "stack": stack.name,
                    "answers": judge_answers(
                        session, prompts, self.config.max_answer_tokens, self.config.chat_template
                    ),
                }
            ctx.put(key, record)
        return list(record["answers"])

    def measure(self, stack: Stack, ctx: RunContext) -> dict[str, Any] | None:
        """Each judgment is cached as it finishes, so a dead endpoint loses none of them."""
        if not stack.layers:
            return None
        if self._baseline is None:
            self._baseline = self.answers(Stack(model=ctx.pipeline.model), ctx)
        baseline, candidate = self._baseline, self.answers(stack, ctx)
        identity = judge_identity(self.config)
        # Everything that shapes the summary (protocols, resamples, validity rules); not the transport
        # (timeouts, retries, concurrency, the key's variable), which only decides how it is fetched.
        settings = self.config.model_dump(exclude={"timeout", "max_retries", "concurrency", "api_key_env"})
        key, record = ctx.lookup(
            {"instrument": "judge", "judge": identity, "settings": settings, "answers": [baseline, candidate]}
        )
        if record is not None:
            return dict(record["summary"])
        cache = ctx.store.requests(identity_key({"judge": identity}))
        client = JudgeClient(self.config, cache=cache, base_url=self._served(ctx))
        progress = ctx.on_progress
        phases = (lambda phase: progress(f"judge {stack.name} {phase}")) if progress else None
        summary = run_judge(self.config, client, load_prompts(Path(self.config.prompts)), baseline, candidate, phases)
        ctx.put(key, {"stack": stack.name, "summary": summary})
        return summary

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def _served(self, ctx: RunContext) -> str | None:
        """The served judge's URL, started at its first use in this process (None: config.base_url)."""
        if not self.config.serve:
            return None
        if self._server is None or not self._server.running:
            self._server = JudgeServer(self.config, ctx.out / "engine-logs" / "judge-server.log").start()
        return self._server.url

    def findings(self, section: dict[str, Any], stack: Stack, gate: Gate) -> list[Finding]:
        if "pairwise" not in section:
            return []
        pairwise = section["pairwise"]
        cause = f"{pairwise.get('unparsed', 0)} of {pairwise['n'] + pairwise.get('unparsed', 0)} judgments unparsed"
        finding = gate(self.finding("net_loss", pairwise["net_loss"], pairwise["n"], "prompts", cause=cause))
        validity = section.get("validity", {"valid": True, "reasons": []})
        if not validity["valid"]:
            # A biased judge's verdict is neither a pass nor a fail: say so, loudly.
            reason = "; ".join(validity["reasons"])
            return [replace(finding, status="warn", gated="warn", reason=f"net_loss invalid: {reason}")]
        return [finding]

    @classmethod
    def summary_lines(cls, report: dict[str, Any]) -> list[str]:
        rows = sections(report, "judge")
        if not rows:
            return []
        lines = [
            "",
            "### Judge (pairwise in both orders; an order-dependent verdict is a tie)",
            "",
            "| stack | win / tie / loss | net loss [95%] | position consistency | length delta | single-grade delta "
            "(Wilcoxon p) | control / validity |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, j in rows:
            p = j.get("pairwise", {})
            net = p.get("net_loss", {})
            single = j.get("single")
            grade = f"{fmt(single['mean_delta']['value'])} ({fmt(single['wilcoxon_p'])})" if single else "-"
            control = j.get("control")
            valid = j.get("validity", {}).get("valid", True)
            lines.append(
                f"| `{name}` | {p.get('win', '-')} / {p.get('tie', '-')} / {p.get('loss', '-')} | "
                f"{interval(net)} | "
                f"{fmt(p.get('position_consistency'))} | {fmt(p.get('length_delta'))} | {grade} | "
                f"{('sees damage' if control['valid'] else 'BLIND') if control else '-'}"
                f"{'' if valid else ' — finding INVALID: ' + '; '.join(j['validity']['reasons'])} |"
            )
        return lines

    @classmethod
    def mlflow_tables(cls, section: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        """Every judgment of the stack (prompt, both answers, order, verdict, the judge's reply), browsable
        in the stack's run (MLflow's Artifacts tab renders the table)."""
        if not section.get("judgments"):
            return {}
        import pandas as pd

        return {"tables/judgments.json": pd.DataFrame(section["judgments"])}

    @classmethod
    def mlflow_traces(cls, section: dict[str, Any]) -> list[TraceRecord]:
        """One trace per prompt judged pairwise: the question and both answers in, the outcome for the
        candidate out, with the judge's verdict in each order as feedback (its reply as the rationale),
        so MLflow's trace view lists and filters them by outcome."""
        judge = str(section.get("judge", {}).get("model", "judge"))
        rows = [j for j in section.get("judgments", []) if j["protocol"] == "pairwise"]
        by_prompt: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_prompt.setdefault(row["id"], []).append(row)
        traces = []
        for prompt_id, (first, second) in ((k, v) for k, v in by_prompt.items() if len(v) == 2):
            outcome, consistent = combine(first["verdict"], second["verdict"])
            traces.append(
                TraceRecord(
                    name="judge/pairwise",
                    inputs={"prompt": first["prompt"], "baseline": first["answer_a"], "candidate": first["answer_b"]},
                    outputs={"outcome": outcome, "order_consistent": consistent},
                    tags={"qualgate.prompt_id": prompt_id, "qualgate.outcome": outcome},
                    assessments=[
                        Assessment("outcome", outcome, f"{first['reply']} | {second['reply']}", judge),
                        Assessment("verdict_baseline_first", str(first["verdict"]), first["reply"], judge),
                        Assessment("verdict_candidate_first", str(second["verdict"]), second["reply"], judge),
                    ],
                )
            )
        return traces

    @classmethod
    def mlflow_metrics(cls, section: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        pairwise = section.get("pairwise", {})
        for name in ("win", "tie", "loss", "unparsed", "position_consistency", "length_delta"):
            yield f"judge/{name}", pairwise.get(name)
        if "net_loss" in pairwise:
            yield from estimate_metrics("judge/net_loss", pairwise["net_loss"])
        for kind in ("single", "reference"):
            if kind in section:
                yield f"judge/{kind}_mean_delta", section[kind]["mean_delta"]["value"]
                yield f"judge/{kind}_wilcoxon_p", section[kind]["wilcoxon_p"]
        if "control" in section:
            yield "judge/control_valid", section["control"]["valid"]
            yield "judge/control_net_loss", section["control"]["net_loss"]["value"]
        if "validity" in section:
            yield "judge/valid", section["validity"]["valid"]

    @classmethod
    def mlflow_params(cls, section: dict[str, Any]) -> dict[str, str]:
        return {"judge.model": str(section["judge"]["model"]), "judge.template": str(section["judge"]["template"])}
