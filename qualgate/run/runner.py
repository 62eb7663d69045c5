"""Run a pipeline: plan the stacks, measure each with every instrument (reusing finished work), gate the
findings and assemble the report. Publishing (files, terminal) lives in report.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qualgate.budgets import budget_finding, budget_rows
from qualgate.claims import judge_claims
from qualgate.config import Pipeline
from qualgate.controls import judge_control
from qualgate.devices import describe
from qualgate.executors import EXECUTOR_FILE, executor_for
from qualgate.gate import Finding, judge, verdict, worst_status
from qualgate.instruments import Instrument
from qualgate.instruments.base import plugin_path
from qualgate.plan import PlannedStack, plan
from qualgate.preflight import Checked, preflight
from qualgate.redact import redact
from qualgate.report_model import REPORT_VERSION
from qualgate.run.compound import compound_table
from qualgate.run.context import OnProgress, RunContext
from qualgate.run.provenance import git_state
from qualgate.run.storage import kv_storage_bits
from qualgate.run_files import RunFiles
from qualgate.version import __version__


class Runner:
    def __init__(
        self,
        pipeline: Pipeline,
        where: str,
        out_dir: Path,
        on_progress: OnProgress | None = None,
        files: RunFiles | None = None,
        on_line: Callable[[str], None] = print,
    ) -> None:
        """`files`: the run directory reached from elsewhere (a cluster worker measuring one stack);
        `on_line`: where an executor reports each finished stack."""
        self.pipeline = pipeline
        self.where = where
        self.ctx = RunContext(pipeline, where, out_dir, on_progress, files)
        self.planned = plan(pipeline, pipeline.built_layers(where))
        self.on_line = on_line

    @property
    def computed(self) -> int:
        return self.ctx.computed

    @property
    def reused(self) -> int:
        return self.ctx.reused

    def gated(self, finding: Finding) -> Finding:
        """The finding judged against the pipeline's thresholds for its metric (none: it passes)."""
        tiers = self.pipeline.gate.get(finding.metric)
        return judge(
            finding, tiers.warn if tiers else None, tiers.fail if tiers else None, self.pipeline.gate_inconclusive
        )

    def stack(self, planned: PlannedStack, instruments: list[Instrument[Any]]) -> tuple[dict[str, Any], list[Finding]]:
        """One stack through every instrument: its report entry (without a verdict yet) and findings."""
        sections: dict[str, Any] = {}
        findings: list[Finding] = []
        for instrument in instruments:
            section = instrument.measure(planned.stack, self.ctx)
            if section:
                sections[instrument.name] = section
                findings += instrument.findings(section, planned.stack, self.gated)
        layers = []
        for name, bits in zip(planned.layer_names, kv_storage_bits(planned.stack), strict=True):
            # What a KV layer stores per element (metadata included) sits beside its configuration.
            layers.append({"name": name, **self.pipeline.layers[name], **({"storage_bits": bits} if bits else {})})
        entry = {
            "name": planned.stack.name,
            "layers": layers,
            "role": planned.role,
            "step": planned.step,
            "lossless": planned.stack.lossless,
            "instruments": sections,
        }
        return entry, findings

    def budgets(self, planned: PlannedStack, entry: dict[str, Any], done: dict[tuple[str, ...], Any]) -> list[Finding]:
        """The layer budgets this stack spends: a ladder step's added layer against the step before it,
        a single layer against the baseline (rows into the entry, judged findings out)."""
        if not self.pipeline.budgets or planned.role not in ("ladder", "single"):
            return []
        added = planned.layer_names[-1]
        rows = budget_rows(
            self.pipeline.budgets,
            added,
            entry,
            done.get(planned.layer_names[:-1]),
            done.get((added,)),
            self.ctx.out,
        )
        chunks = entry["instruments"].get("fidelity", {}).get("n_chunks")
        findings = []
        for row in rows:
            finding = judge(budget_finding(row, chunks), None, row["budget"], self.pipeline.gate_inconclusive)
            row["status"] = finding.status
            findings.append(finding)
        if rows:
            entry["budgets"] = rows
        return findings

    @staticmethod
    def finish(entry: dict[str, Any], findings: list[Finding], planned: PlannedStack | None = None) -> dict[str, Any]:
        done = {
            **entry,
            "findings": [f.as_dict() for f in findings],
            **verdict(findings),
            "reasons": [f"{f.instrument}.{f.reason}" for f in findings if f.status != "pass"],
        }
        if planned is not None and planned.role == "control":
            return judge_control(done, list(planned.must_fail))  # its fail is the pass the run wants
        return done

    def run(self, checked: Checked | None = None) -> dict[str, Any]:
        # `qualgate run` checks before it takes the run directory, and hands over what it opened.
        checked = checked or preflight(self.pipeline, self.where)
        instruments = checked.instruments
        with self.ctx as ctx:
            # Where the stacks are measured (this process, or a cluster) changes no byte of the report:
            # the executor hands back the same entries and findings in plan order.
            executor = executor_for(self.pipeline.executor)
            try:
                measured = executor.measure(self, instruments)
            finally:
                for instrument in instruments:
                    instrument.close()  # what an instrument started for the run (a served judge) stops with it
            ctx.files.write(EXECUTOR_FILE, json.dumps(executor.placement, indent=1, sort_keys=True).encode())
            # Budgets compare stacks with each other (a step with the one before, a layer alone), so they
            # are judged once every stack is measured.
            done = {planned.layer_names: entry for planned, entry, _ in measured}
            stacks = [self.finish(e, f + self.budgets(p, e, done), p) for p, e, f in measured]
            provenance: dict[str, Any] = {
                "qualgate": __version__,
                "git": git_state(),
                "model": self.pipeline.model.model_dump(),
                "model_files": self.pipeline.model.fingerprint(),
                "golden": None,
                "backend": self.pipeline.backend.name,
                "tracking": self.pipeline.tracking.model_dump(),
                # Every evaluation input by path and content hash (logged as MLflow datasets).
                "data": [entry for instrument in instruments for entry in instrument.data(ctx)],
                # What each served endpoint's capability probe found (mode, top-k, canary agreement).
                "engine_probes": ctx.engine_probes([p.stack.name for p in self.planned]),
            }
            if self.pipeline.backend.name == "hf":
                # The device the in-process model ran on (its kernels set the last bits of every number).
                provenance["device"] = describe(self.pipeline.model.torch_device())
            for instrument in instruments:
                provenance.update(instrument.provenance(ctx))
            plugins = {i.name: path for i in instruments if (path := plugin_path(i)) is not None}
            if plugins:
                # report, summary and tracking find a plug-in's renderers by this path.
                provenance["plugins"] = plugins
        report = {
            "report_version": REPORT_VERSION,
            "pipeline": self.pipeline.name,
            "verdict": worst_status([s["verdict"] for s in stacks]),
            "measured": worst_status([s["measured"] for s in stacks]),
            "inconclusive": sum(len(s["inconclusive"]) for s in stacks),
            "gate_policy": {"inconclusive": self.pipeline.gate_inconclusive},
            "reasons": [f"{s['name']}: {reason}" for s in stacks for reason in s["reasons"]],
            "provenance": provenance,
            "stacks": stacks,
            "compound": compound_table(self.planned, stacks),
        }
        if self.pipeline.claims:
            report["claims"] = judge_claims(self.pipeline.claims, stacks)
        # Whatever a user wrote under a credential's name (an endpoint's api_key) never reaches the
        # report, the summary, JUnit or MLflow.
        safe: dict[str, Any] = redact(report)
        return safe
