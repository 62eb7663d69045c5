"""Run lm-eval tasks on a qualgate session (lm-eval as a library) and keep each document's result.

Tasks come from the pipeline's include directories (task YAML with `dataset_path: json`, data files
relative to the working directory as lm-eval reads them) or, by name, from lm-eval's own registry when
their data is available offline. No chat template unless the pipeline asks; few-shot sampling uses
lm-eval's fixed seeds, so baseline and candidate see the same rendered prompts (checked by hash).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qualgate.backends.base import Session
from qualgate.errors import ConfigError, MissingDependencyError
from qualgate.instruments.benchmarks.config import BenchmarksConfig
from qualgate.instruments.benchmarks.paired import Sample
from qualgate.registry import did_you_mean
from qualgate.text_source import (
    PACKAGED_BUILDERS,
    cache_dir,
    fetch_command,
    fetch_hint,
    missing_from_cache,
    offline_by_environment,
)

if TYPE_CHECKING:
    from qualgate.instruments.benchmarks.lm import RequestCache

RESPONSE_CHARS = 80


@dataclass
class TaskResult:
    task: str
    metric: str
    version: str
    samples: dict[int, Sample]

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "version": self.version,
            "samples": [s.__dict__ for s in self.samples.values()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        samples = {int(s["doc_id"]): Sample(**s) for s in data["samples"]}
        return cls(data["task"], data["metric"], data["version"], samples)


def _quiet() -> None:
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def task_manager(config: BenchmarksConfig, where: str) -> Any:
    """lm-eval's TaskManager over the include directories; lm-eval's built-in registry (slow to index)
    only when a task is not found locally."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingDependencyError("lm-eval", "the benchmarks instrument", "lmeval") from None
    _quiet()
    for directory in config.include:
        if not Path(directory).is_dir():
            raise ConfigError(f"{where}: instruments.benchmarks.include: {directory} is not a directory")
    local = TaskManager(include_path=[str(Path(d).resolve()) for d in config.include], include_defaults=False)
    if all(task in local.all_tasks for task in config.tasks):
        return local
    full = TaskManager(include_path=[str(Path(d).resolve()) for d in config.include], include_defaults=True)
    for task in config.tasks:
        if task not in full.all_tasks:
            raise ConfigError(
                f"{where}: instruments.benchmarks.tasks: unknown task '{task}'"
                f"{did_you_mean(task, list(full.all_tasks))}; add its YAML to an include directory"
            )
        check_task_data(full, task, where)
    return full


def check_task_data(manager: Any, task: str, where: str) -> None:
    """A built-in task's dataset must be in the local datasets cache when this process may not download
    it: exit 2 at validation with the command that fetches it, not a traceback mid-run."""
    entry = manager._entry(task) if hasattr(manager, "_entry") else None  # lm-eval 0.4.13's task index
    cfg = getattr(entry, "cfg", None)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("dataset_path"), str):
        return  # a group or tag (its tasks load their own data), or an index this lm-eval does not expose
    dataset, name = cfg["dataset_path"], cfg.get("dataset_name")
    if dataset in PACKAGED_BUILDERS or Path(dataset).exists() or not offline_by_environment():
        return
    reason = missing_from_cache(dataset, name)
    if reason is not None:
        raise ConfigError(
            f"{where}: instruments.benchmarks.tasks: task '{task}' needs dataset '{dataset}'"
            f"{f' (config {name!r})' if name else ''}, which is not in the local datasets cache {cache_dir()} "
            f"({reason}); " + fetch_hint(fetch_command(dataset, name))
        )


def _primary_metric(task: str, config: BenchmarksConfig, task_config: dict[str, Any]) -> str:
    if task in config.metric:
        return str(config.metric[task])
    metrics = [m["metric"] for m in task_config.get("metric_list", []) if isinstance(m.get("metric"), str)]
    if not metrics:
        raise ConfigError(f"task {task} declares no metric; name one in instruments.benchmarks.metric.{task}")
    return str(metrics[0])


def _response(sample: dict[str, Any], output_type: str) -> str:
    filtered = sample.get("filtered_resps")
    if output_type == "multiple_choice" and isinstance(filtered, list) and filtered:
        scores = [float(r[0]) if isinstance(r, list | tuple) else float(r) for r in filtered]
        return f"choice {max(range(len(scores)), key=scores.__getitem__)}"
    text = filtered[0] if isinstance(filtered, list) and filtered else filtered
    return str(text)[:RESPONSE_CHARS]


def run_tasks(
    session: Session,
    config: BenchmarksConfig,
    manager: Any,
    block_size: int | None,
    score_cache: RequestCache | None = None,
    generate_cache: RequestCache | None = None,
    on_request: Callable[[int, int], None] | None = None,
) -> dict[str, TaskResult]:
    from lm_eval import simple_evaluate

    from qualgate.instruments.benchmarks.lm import QualgateLM

    _quiet()
    lm = QualgateLM(session, block_size, score_cache, generate_cache, on_request)
    out = simple_evaluate(
        model=lm,
        tasks=list(config.tasks),
        task_manager=manager,
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        log_samples=True,
        bootstrap_iters=0,  # qualgate computes its own paired statistics
        apply_chat_template=config.chat_template,
        cache_requests=False,  # lm-eval's request cache keys omit the model: never share it
        use_cache=None,
    )
    results = {}
    for task in config.tasks:
        task_config = out["configs"][task]
        metric = _primary_metric(task, config, task_config)
        samples = {}
        for row in out["samples"][task]:
            if metric not in row:
                raise ConfigError(f"task {task}: per-document metric '{metric}' not found; it has {sorted(row)}")
            args = json.dumps(row["arguments"], sort_keys=True, default=str)
            samples[int(row["doc_id"])] = Sample(
                doc_id=int(row["doc_id"]),
                correct=float(row[metric]),
                prompt_hash=hashlib.sha256(args.encode()).hexdigest()[:16],
                response=_response(row, task_config.get("output_type", "")),
            )
        version = str((task_config.get("metadata") or {}).get("version", ""))
        results[task] = TaskResult(task, metric, version, samples)
    lm.check_hygiene()
    return results
