"""The benchmarks instrument: lm-eval tasks through each stack, compared with the unoptimized model
document by document (flips, McNemar with Holm across tasks, recovery with its paired interval)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from qualgate import chat
from qualgate.errors import InfrastructureError
from qualgate.fmt import fmt, interval
from qualgate.gate import Finding
from qualgate.instruments.base import Gate, Instrument, Tiers, estimate_metrics
from qualgate.instruments.benchmarks import run as benchmarks_run
from qualgate.instruments.benchmarks.config import BenchmarksConfig
from qualgate.instruments.benchmarks.paired import compare_task, holm
from qualgate.instruments.benchmarks.run import TaskResult
from qualgate.instruments.generation import without_generation_layers
from qualgate.requirements import Need
from qualgate.stack import Stack
from qualgate.stats import proportion
from qualgate.store import file_sha256, identity_key

if TYPE_CHECKING:
    from qualgate.config import Pipeline
    from qualgate.run.context import RunContext


class Benchmarks(Instrument[BenchmarksConfig]):
    name = "benchmarks"
    Config = BenchmarksConfig
    metrics: ClassVar[dict[str, bool]] = {"recovery": False}
    default_gate: ClassVar[dict[str, Tiers]] = {"recovery": (0.99, 0.97)}
    needs = (Need("lm_eval", "lm-eval", "lmeval", "the benchmarks instrument"),)

    def __init__(self, config: BenchmarksConfig) -> None:
        super().__init__(config)
        self._task_manager: Any = None
        # Every stack is compared with the same unoptimized model: its results are read once per run.
        self._baseline: dict[str, TaskResult] | None = None

    def inputs(self) -> list[str]:
        return list(self.config.include)

    def check(self, pipeline: Pipeline, where: str) -> None:
        self._task_manager = benchmarks_run.task_manager(self.config, where)  # every include dir, every task
        if self.config.chat_template:
            chat.require_template(pipeline.model, f"{where}: instruments.benchmarks.chat_template")

    def provenance(self, ctx: RunContext) -> dict[str, Any]:
        return {"benchmarks_chat_template": chat.provenance(ctx.pipeline.model)} if self.config.chat_template else {}

    def data(self, ctx: RunContext) -> list[dict[str, str]]:
        return [
            {"name": f"tasks-{Path(d).name}", "role": "benchmarks", "source": d, "sha256": file_sha256(Path(d))}
            for d in self.config.include
        ]

    def results(self, stack: Stack, ctx: RunContext) -> tuple[str, dict[str, TaskResult]]:
        """Every document's result of every task through `stack`. Loglikelihood requests are cached
        under the stack's scoring identity (generation layers do not change scores), generations under
        its full identity; the unit itself under the stack, the task settings and the task files."""
        inst = self.config
        tasks_hash = {d: file_sha256(Path(d)) for d in inst.include}
        key, record = ctx.lookup(
            {"instrument": "benchmarks", "stack": stack.identity(), "config": inst.model_dump(), "tasks": tasks_hash}
        )
        if record is None:
            block = inst.kv_block_size if stack.layer("kv_quant") else None
            scoring = without_generation_layers(stack)
            score_cache = ctx.store.requests(identity_key({"scoring": scoring.identity(), "block_size": block}))
            generate_cache = ctx.store.requests(identity_key({"generation": stack.identity(), "block_size": block}))
            if self._task_manager is None:
                self._task_manager = benchmarks_run.task_manager(inst, ctx.where)
            with ctx.open(stack) as session:
                progress = ctx.progress(f"benchmarks {stack.name}")
                results = benchmarks_run.run_tasks(
                    session, inst, self._task_manager, block, score_cache, generate_cache, progress
                )
            samples = f"samples/benchmarks.{key}.json"
            ctx.files.write(samples, json.dumps([r.as_dict() for r in results.values()]).encode("utf-8"))
            record = {"stack": stack.name, "samples": samples}
            ctx.put(key, record)
        stored = ctx.files.read(str(record["samples"]))
        if stored is None:
            raise InfrastructureError(
                f"{ctx.out / record['samples']} is missing from the run directory; rerun with --fresh"
            )
        data = json.loads(stored)
        return str(record["samples"]), {d["task"]: TaskResult.from_dict(d) for d in data}

    def measure(self, stack: Stack, ctx: RunContext) -> dict[str, Any]:
        """Per-task paired comparison of `stack` with the unoptimized model (Holm across tasks)."""
        if self._baseline is None:
            _, self._baseline = self.results(Stack(model=ctx.pipeline.model), ctx)
        baseline = self._baseline
        samples_file, candidate = self.results(stack, ctx)
        tasks = list(candidate)
        if not stack.layers:
            return {
                "samples": samples_file,
                "tasks": [
                    {
                        "task": t,
                        "metric": candidate[t].metric,
                        "n": len(candidate[t].samples),
                        "accuracy_baseline": proportion(
                            np.array([s.correct for s in candidate[t].samples.values()])
                        ).as_dict(),
                    }
                    for t in tasks
                ],
                "flips": {},
            }
        compared = [compare_task(t, candidate[t].metric, baseline[t].samples, candidate[t].samples) for t in tasks]
        for comparison, adjusted in zip(compared, holm([c.mcnemar_p for c in compared]), strict=True):
            comparison.holm_p = adjusted
        return {
            "samples": samples_file,
            "tasks": [c.summary() for c in compared],
            "flips": {c.task: c.flips for c in compared},
        }

    def findings(self, section: dict[str, Any], stack: Stack, gate: Gate) -> list[Finding]:
        found = []
        for task in section.get("tasks", []):
            if "recovery" not in task:
                continue
            # No flips at all: the interval is the exact zero-event bound, which narrows as 1/n.
            flipped = task["flips_b"] + task["flips_c"]
            cause = (
                f"baseline accuracy is {task['accuracy_baseline']['value']:g} on {task['n']} documents, so "
                "recovery (candidate / baseline accuracy) is undefined; use a task the baseline can solve"
            )
            finding = self.finding(
                "recovery",
                task["recovery"],
                task["n"],
                "documents",
                instrument=f"benchmarks.{task['task']}",
                interval="normal" if flipped else "zero-events",
                cause=cause,
            )
            found.append(gate(finding))
        return found

    @classmethod
    def summary_lines(cls, report: dict[str, Any]) -> list[str]:
        rows = [
            (stack["name"], task)
            for stack in report["stacks"]
            for task in stack.get("instruments", {}).get("benchmarks", {}).get("tasks", [])
            if "recovery" in task
        ]
        if not rows:
            return []
        lines = [
            "",
            "### Benchmarks (paired with the baseline, per document)",
            "",
            "| stack | task | accuracy baseline -> candidate | recovery [95%] | flips b / c | McNemar p (Holm) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, t in rows:
            lines.append(
                f"| `{name}` | {t['task']} ({t['metric']}, n={t['n']}) | {fmt(t['accuracy_baseline']['value'])} -> "
                f"{fmt(t['accuracy_candidate']['value'])} | {interval(t['recovery'])} | {t['flips_b']} / "
                f"{t['flips_c']} | {fmt(t['mcnemar_p'])} ({fmt(t['holm_p'])}) |"
            )
        return lines

    @classmethod
    def mlflow_metrics(cls, section: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        for task in section.get("tasks", []):
            prefix = f"benchmarks/{task['task']}"
            for name in ("accuracy_baseline", "accuracy_candidate", "difference", "recovery"):
                if name in task:
                    yield from estimate_metrics(f"{prefix}/{name}", task[name])
            for name in ("flips_b", "flips_c", "flip_rate", "mcnemar_p", "holm_p", "n"):
                yield f"{prefix}/{name}", task.get(name)

    @classmethod
    def mlflow_tables(cls, section: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        import pandas as pd

        tables: dict[str, Any] = {}
        samples = run_dir / section["samples"]
        if samples.is_file():
            for task in json.loads(samples.read_text(encoding="utf-8")):
                tables[f"tables/benchmarks_{task['task']}.json"] = pd.DataFrame(task["samples"])
            tables[f"samples/{samples.name}"] = samples
        flips = [{"task": t, **f} for t, rows in section.get("flips", {}).items() for f in rows]
        columns = ["task", "doc_id", "kind", "baseline", "candidate"]
        tables["tables/benchmark_flips.json"] = pd.DataFrame(flips, columns=columns)
        return tables
