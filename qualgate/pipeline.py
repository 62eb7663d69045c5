"""Run a pipeline: plan the stacks, measure each with its instruments (reusing finished work), compare,
gate, and return the report. Publishing (files, terminal) lives in report.py.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qualgate import __version__, golden
from qualgate.backends import BACKENDS, Session, open_session
from qualgate.code_identity import class_identity
from qualgate.config import Pipeline
from qualgate.fsio import atomic_write, atomic_write_text
from qualgate.gate import Finding, judge, verdict, worst_status
from qualgate.instruments.benchmarks import run as benchmarks_run
from qualgate.instruments.benchmarks.paired import compare_task, holm
from qualgate.instruments.benchmarks.run import TaskResult
from qualgate.instruments.decode_path import BaselinePath, baseline_paths, run_decode_path
from qualgate.instruments.equivalence import (
    GENERATION_KINDS,
    Prompt,
    load_prompts,
    prefix_probes,
    reference_stack,
    run_equivalence,
    speculation_probes,
    without_generation_layers,
)
from qualgate.instruments.fidelity import compare, score_text
from qualgate.instruments.judge.client import JudgeClient, judge_identity
from qualgate.instruments.judge.run import answers as judge_answers
from qualgate.instruments.judge.run import load_prompts as load_judge_prompts
from qualgate.instruments.judge.run import run_judge
from qualgate.plan import plan
from qualgate.preflight import Checked, GoldenData, load_golden, preflight, probe_text_path
from qualgate.redact import redact
from qualgate.report_model import REPORT_VERSION
from qualgate.run.compound import compound_table
from qualgate.run.findings import stack_findings
from qualgate.run.provenance import git_state
from qualgate.stack import Stack
from qualgate.stats import proportion
from qualgate.store import RunStore, file_sha256, identity_key

Progress = Callable[[str, int, int], None]


class Runner:
    def __init__(
        self,
        pipeline: Pipeline,
        where: str,
        out_dir: Path,
        on_progress: Callable[[str], Callable[[int, int], None]] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.where = where
        self.out = out_dir
        self.store = RunStore(out_dir)
        self.samples = out_dir / "samples"
        self.samples.mkdir(parents=True, exist_ok=True)
        self.on_progress = on_progress
        self.reused = 0
        self.computed = 0
        self.layers = pipeline.built_layers(where)
        # The backend's configuration and its code (class and module sources) key every record.
        self.backend_identity = {
            **pipeline.backend.model_dump(),
            "code": class_identity(BACKENDS.get(pipeline.backend.name)),
        }
        self.planned = plan(pipeline, self.layers)
        self._golden: GoldenData | None = None
        self._task_manager: Any = None
        # Every stack is compared with the same unoptimized model: its results are read once per run.
        self._baseline_benchmarks: dict[str, TaskResult] | None = None
        self._baseline_answers: list[str] | None = None
        self._baseline_paths: list[BaselinePath] | None = None

    def _lookup(self, identity: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """The store key of a unit of work (its identity plus the backend) and its record, if finished."""
        key = identity_key({**identity, "backend": self.backend_identity})
        record = self.store.get(key)
        if record is not None:
            self.reused += 1
        return key, record

    # -- fidelity ---------------------------------------------------------------------------------
    def _golden_data(self) -> GoldenData:
        """The golden's chunks, reference scores and scores hash, loaded once per run (record keys need them)."""
        if self._golden is None:
            self._golden = load_golden(self.pipeline)
        assert self._golden is not None, "only a pipeline with a fidelity instrument reads its golden"
        return self._golden

    def fidelity(self, stack: Stack) -> dict[str, Any]:
        data = self._golden_data()
        # Generation-time layers do not change the distribution: the stack without them is measured once.
        measured = without_generation_layers(stack)
        key, record = self._lookup(
            {
                "instrument": "fidelity",
                "stack": measured.identity(),
                "config": data.config.model_dump(),
                "golden": data.scores_sha256,
            }
        )
        if record is not None:
            return record
        with self._open(measured) as session:
            progress = self.on_progress(f"fidelity {measured.name}") if self.on_progress else None
            checkpoint = self.store.chunks(key)
            scores = score_text(
                session, data.chunks, data.config, reference=data.reference, on_chunk=progress, checkpoint=checkpoint
            )
        result = compare(data.reference, scores)
        buffer = io.BytesIO()
        save: Any = np.savez_compressed  # numpy's stub reads **arrays as its allow_pickle flag
        save(buffer, **result.per_token)
        atomic_write(self.samples / f"fidelity.{key}.npz", buffer.getvalue())
        record = {
            "stack": measured.name,
            "golden": str(data.directory),
            "summary": result.summary,
            "per_token": f"samples/fidelity.{key}.npz",
        }
        self.store.put(key, record)
        checkpoint.discard()
        self.computed += 1
        return record

    # -- equivalence ------------------------------------------------------------------------------
    def probe_text(self) -> tuple[str, str] | None:
        """(path, sha256) of the text the prefix-cache and speculation probes are cut from: the
        pipeline's probe_text, else the fidelity domain text; None without either (or probes: false)."""
        path = probe_text_path(self.pipeline)
        if path is None:
            # No domain text to cut probes from: the prompt files alone. A prefix-cache check then says
            # whether they exercised the cache (coverage), and fails if they did not.
            return None
        return path, file_sha256(Path(path))

    def equivalence_prompts(self, stack: Stack, session: Session) -> list[Prompt]:
        """The prompt files, then probes cut from the domain text for the stack's lossless layers."""
        inst = self.pipeline.instruments.equivalence
        assert inst is not None
        prompts = [p for path in inst.prompts for p in load_prompts(Path(path))]
        probe = self.probe_text()
        if probe is None:
            return prompts
        text_ids = session.encode(golden.read_text_file(probe[0]), add_bos=False)
        prefix = stack.layer("prefix_cache")
        if prefix is not None:
            prompts += prefix_probes(text_ids, session.bos_token_id, int(getattr(prefix.params, "block_size", 16)))
        if stack.layer("speculation") is not None:
            prompts += speculation_probes(text_ids, session.bos_token_id)
        return prompts

    def equivalence(self, stack: Stack) -> dict[str, Any] | None:
        inst = self.pipeline.instruments.equivalence
        if inst is None or not any(layer.kind in GENERATION_KINDS for layer in stack.layers):
            return None
        reference = reference_stack(stack)
        prompt_files = {p: file_sha256(Path(p)) for p in inst.prompts}
        config = inst.config()
        key, record = self._lookup(
            {
                "instrument": "equivalence",
                "stack": stack.identity(),
                "reference": reference.identity(),
                "config": config.model_dump(),
                "prompts": prompt_files,
                "probes": self.probe_text(),
            }
        )
        if record is not None:
            return record
        with (
            self._open(stack) as candidate,
            self._open(reference) as ref,
        ):
            prompts = self.equivalence_prompts(stack, ref)
            checkpoint = self.store.generations(key)
            result = run_equivalence(candidate, ref, prompts, config, checkpoint=checkpoint)
        record = {"stack": stack.name, "summary": result.summary()}
        self.store.put(key, record)
        checkpoint.discard()
        self.computed += 1
        return record

    # -- decode path --------------------------------------------------------------------------------
    def _decode_prompts(self) -> tuple[dict[str, str], list[Prompt]]:
        inst = self.pipeline.instruments.equivalence
        assert inst is not None
        files = {p: file_sha256(Path(p)) for p in inst.prompts}
        return files, [p for path in inst.prompts for p in load_prompts(Path(path))]

    def baseline_paths(self) -> list[BaselinePath]:
        """The unoptimized model's greedy continuations of the equivalence prompts, scored as decoded;
        computed once per run (a record)."""
        if self._baseline_paths is None:
            inst = self.pipeline.instruments.equivalence
            assert inst is not None
            files, prompts = self._decode_prompts()
            base = Stack(model=self.pipeline.model)
            key, record = self._lookup(
                {
                    "instrument": "decode-baseline",
                    "stack": base.identity(),
                    "prompts": files,
                    "max_new_tokens": inst.max_new_tokens,
                }
            )
            if record is None:
                with self._open(base) as session:
                    gens = session.generate([p.source for p in prompts], max_new_tokens=inst.max_new_tokens, top_k=2)
                    record = {"paths": [path.as_record() for path in baseline_paths(session, gens)]}
                self.store.put(key, record)
                self.computed += 1
            self._baseline_paths = [BaselinePath.from_record(r) for r in record["paths"]]
        return self._baseline_paths

    def decode_path(self, stack: Stack) -> dict[str, Any] | None:
        """Decode-path fidelity of a lossy stack (shared by stacks that differ only in lossless layers)."""
        inst = self.pipeline.instruments.equivalence
        measured = without_generation_layers(stack)
        if inst is None or not inst.decode_path or not measured.layers:
            return None
        if not BACKENDS.get(self.pipeline.backend.name).block_scoring:
            return None  # an endpoint decides its own shapes: its generations are checked by equivalence
        files, _ = self._decode_prompts()
        key, record = self._lookup(
            {
                "instrument": "decode-path",
                "stack": measured.identity(),
                "prompts": files,
                "max_new_tokens": inst.max_new_tokens,
            }
        )
        if record is not None:
            return record
        paths = self.baseline_paths()
        with self._open(measured) as session:
            progress = self.on_progress(f"decode path {measured.name}") if self.on_progress else None
            summary = run_decode_path(session, paths, inst.max_new_tokens, on_prompt=progress)
        record = {"stack": measured.name, "summary": summary}
        self.store.put(key, record)
        self.computed += 1
        return record

    def _open(self, stack: Stack) -> Session:
        """A session on the pipeline's backend; a managed engine writes its server logs into the run."""
        options = dict(self.pipeline.backend.options)
        backend = BACKENDS.get(self.pipeline.backend.name)
        if "log_dir" in getattr(getattr(backend, "Options", None), "model_fields", {}):
            options.setdefault("log_dir", str(self.out / "engine-logs"))
        session = open_session(stack, self.pipeline.backend.name, **options)
        probe = getattr(session, "probe", None)  # HTTP sessions carry their endpoint's capability probe
        if probe is not None:
            # A record of its own: a resumed run that reuses this stack still reports its probe.
            self.store.put(self._probe_key(stack.name), probe.as_dict())
        return session

    def _probe_key(self, name: str) -> str:
        return identity_key({"engine_probe": name, "backend": self.pipeline.backend.model_dump()})

    def engine_probes(self) -> dict[str, Any]:
        """What the capability probe found on each planned stack's endpoint (HTTP backends)."""
        found = {p.stack.name: self.store.get(self._probe_key(p.stack.name)) for p in self.planned}
        return {name: probe for name, probe in found.items() if probe is not None}

    # -- gate ---------------------------------------------------------------------------------------
    def _gated(self, finding: Finding) -> Finding:
        """The finding judged against the pipeline's thresholds for its metric (none: it passes)."""
        tiers = self.pipeline.gate.get(finding.metric)
        return judge(
            finding, tiers.warn if tiers else None, tiers.fail if tiers else None, self.pipeline.gate_inconclusive
        )

    def data_provenance(self, golden_manifest: dict[str, Any] | None) -> list[dict[str, str]]:
        """Every evaluation input by path and content hash (logged as MLflow datasets)."""
        data = []
        fidelity, equivalence = self.pipeline.instruments.fidelity, self.pipeline.instruments.equivalence
        if fidelity and golden_manifest:
            text = golden_manifest["text"]
            source = fidelity.text or text.get("source") or "(recorded text)"
            data.append({"name": "domain-text", "role": "fidelity", "source": source, "sha256": text["sha256"]})
            data.append(
                {
                    "name": "golden",
                    "role": "fidelity",
                    "source": fidelity.golden,
                    "sha256": self._golden_data().scores_sha256,
                }
            )

        def on_disk(name: str, role: str, path: str) -> dict[str, str]:
            return {"name": name, "role": role, "source": path, "sha256": file_sha256(Path(path))}

        for path in equivalence.prompts if equivalence else []:
            data.append(on_disk(Path(path).stem, "equivalence", path))
        probe = self.probe_text()
        if probe is not None:
            data.append({"name": "probe-text", "role": "equivalence", "source": probe[0], "sha256": probe[1]})
        judge_inst = self.pipeline.instruments.judge
        if judge_inst is not None:
            data.append(on_disk(Path(judge_inst.prompts).stem, "judge", judge_inst.prompts))
        benchmarks = self.pipeline.instruments.benchmarks
        for directory in benchmarks.include if benchmarks else []:
            data.append(on_disk(f"tasks-{Path(directory).name}", "benchmarks", directory))
        return data

    # -- benchmarks -------------------------------------------------------------------------------
    def benchmark_results(self, stack: Stack) -> tuple[str, dict[str, TaskResult]]:
        """Every document's result of every task through `stack`. Loglikelihood requests are cached
        under the stack's scoring identity (generation layers do not change scores), generations under
        its full identity; the unit itself under the stack, the task settings and the task files."""
        inst = self.pipeline.instruments.benchmarks
        assert inst is not None
        tasks_hash = {d: file_sha256(Path(d)) for d in inst.include}
        key, record = self._lookup(
            {"instrument": "benchmarks", "stack": stack.identity(), "config": inst.model_dump(), "tasks": tasks_hash}
        )
        if record is None:
            block = inst.kv_block_size if stack.layer("kv_quant") else None
            scoring = without_generation_layers(stack)
            score_cache = self.store.requests(identity_key({"scoring": scoring.identity(), "block_size": block}))
            generate_cache = self.store.requests(identity_key({"generation": stack.identity(), "block_size": block}))
            if self._task_manager is None:
                self._task_manager = benchmarks_run.task_manager(inst, self.where)
            with self._open(stack) as session:
                progress = self.on_progress(f"benchmarks {stack.name}") if self.on_progress else None
                results = benchmarks_run.run_tasks(
                    session, inst, self._task_manager, block, score_cache, generate_cache, progress
                )
            path = self.samples / f"benchmarks.{key}.json"
            atomic_write_text(path, json.dumps([r.as_dict() for r in results.values()]))
            record = {"stack": stack.name, "samples": f"samples/benchmarks.{key}.json"}
            self.store.put(key, record)
            self.computed += 1
        data = json.loads((self.out / record["samples"]).read_text(encoding="utf-8"))
        return str(record["samples"]), {d["task"]: TaskResult.from_dict(d) for d in data}

    def benchmarks(self, stack: Stack) -> dict[str, Any] | None:
        """Per-task paired comparison of `stack` with the unoptimized model (Holm across tasks)."""
        if self.pipeline.instruments.benchmarks is None:
            return None
        if self._baseline_benchmarks is None:
            _, self._baseline_benchmarks = self.benchmark_results(Stack(model=self.pipeline.model))
        baseline = self._baseline_benchmarks
        samples_file, candidate = self.benchmark_results(stack)
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

    # -- judge --------------------------------------------------------------------------------------
    def judge_answers(self, stack: Stack) -> list[str]:
        inst = self.pipeline.instruments.judge
        assert inst is not None
        key, record = self._lookup(
            {
                "instrument": "judge-answers",
                "stack": stack.identity(),
                "prompts": file_sha256(Path(inst.prompts)),
                "max_answer_tokens": inst.max_answer_tokens,
            }
        )
        if record is None:
            prompts = load_judge_prompts(Path(inst.prompts))
            with self._open(stack) as session:
                record = {"stack": stack.name, "answers": judge_answers(session, prompts, inst.max_answer_tokens)}
            self.store.put(key, record)
            self.computed += 1
        return list(record["answers"])

    def judge(self, stack: Stack) -> dict[str, Any] | None:
        """The stack's answers against the baseline's, judged (with the baseline-vs-baseline control).
        Each judgment is cached as it finishes, so a dead endpoint loses none of them."""
        inst = self.pipeline.instruments.judge
        if inst is None or not stack.layers:
            return None
        if self._baseline_answers is None:
            self._baseline_answers = self.judge_answers(Stack(model=self.pipeline.model))
        baseline = self._baseline_answers
        candidate = self.judge_answers(stack)
        identity = judge_identity(inst)
        # Everything that shapes the summary (protocols, resamples, validity rules); not the transport
        # (timeouts, retries, concurrency, the key's variable), which only decides how it is fetched.
        settings = inst.model_dump(exclude={"timeout", "max_retries", "concurrency", "api_key_env"})
        key, record = self._lookup(
            {"instrument": "judge", "judge": identity, "settings": settings, "answers": [baseline, candidate]}
        )
        if record is not None:
            return dict(record["summary"])
        client = JudgeClient(inst, cache=self.store.requests(identity_key({"judge": identity})))
        on_progress = self.on_progress
        phases = (lambda phase: on_progress(f"judge {stack.name} {phase}")) if on_progress else None
        summary = run_judge(inst, client, load_judge_prompts(Path(inst.prompts)), baseline, candidate, phases)
        self.store.put(key, {"stack": stack.name, "summary": summary})
        self.computed += 1
        return summary

    # -- run ----------------------------------------------------------------------------------------
    def run(self, checked: Checked | None = None) -> dict[str, Any]:
        # `qualgate run` checks before it takes the run directory, and hands over what it opened.
        checked = checked or preflight(self.pipeline, self.where)
        if self._golden is None:
            self._golden = checked.golden
        fidelity = self.pipeline.instruments.fidelity
        golden_manifest = golden.read_manifest(Path(fidelity.golden)).model_dump() if fidelity else None
        stacks: list[dict[str, Any]] = []
        for planned in self.planned:
            fid = self.fidelity(planned.stack) if self.pipeline.instruments.fidelity else None
            decode = self.decode_path(planned.stack)
            eq = self.equivalence(planned.stack)
            bench = self.benchmarks(planned.stack)
            judged = self.judge(planned.stack)
            findings = stack_findings(self._gated, fid, eq, bench, judged, decode, planned.stack.layers)
            outcome = verdict(findings)
            stacks.append(
                {
                    "name": planned.stack.name,
                    "layers": [{"name": n, **self.pipeline.layers[n]} for n in planned.layer_names],
                    "role": planned.role,
                    "step": planned.step,
                    "lossless": planned.stack.lossless,
                    "instruments": {
                        k: v
                        for k, v in (
                            ("fidelity", fid and _fidelity_view(fid)),
                            ("decode_path", decode and decode["summary"]),
                            ("equivalence", eq and eq["summary"]),
                            ("benchmarks", bench),
                            ("judge", judged),
                        )
                        if v
                    },
                    "findings": [f.as_dict() for f in findings],
                    **outcome,
                    "reasons": [f"{f.instrument}.{f.reason}" for f in findings if f.status != "pass"],
                }
            )
        # Whatever a user wrote under a credential's name (an endpoint's api_key) never reaches the
        # report, the summary, JUnit or MLflow.
        report = {
            "report_version": REPORT_VERSION,
            "pipeline": self.pipeline.name,
            "verdict": worst_status([s["verdict"] for s in stacks]),
            "measured": worst_status([s["measured"] for s in stacks]),
            "inconclusive": sum(len(s["inconclusive"]) for s in stacks),
            "gate_policy": {"inconclusive": self.pipeline.gate_inconclusive},
            "reasons": [f"{s['name']}: {reason}" for s in stacks for reason in s["reasons"]],
            "provenance": {
                "qualgate": __version__,
                "git": git_state(),
                "model": self.pipeline.model.model_dump(),
                "model_files": self.pipeline.model.fingerprint(),
                "golden": golden_manifest,
                "backend": self.pipeline.backend.name,
                "tracking": self.pipeline.tracking.model_dump(),
                "data": self.data_provenance(golden_manifest),
                # What each served endpoint's capability probe found (mode, top-k, canary agreement).
                "engine_probes": self.engine_probes(),
            },
            "stacks": stacks,
            "compound": compound_table(self.planned, stacks),
        }
        safe: dict[str, Any] = redact(report)
        return safe


def _fidelity_view(record: dict[str, Any]) -> dict[str, Any]:
    s = record["summary"]
    keep = (
        "n_tokens",
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
    # merged_mass: reference top-k mass an HTTP engine did not return (0 in process and in old records)
    return {
        **{k: s[k] for k in keep if k in s},
        "merged_mass": s.get("merged_mass", 0.0),
        "per_token": record["per_token"],
    }
