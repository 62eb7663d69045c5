"""Turn a finished run directory into its MLflow tree: plots, tables, datasets and the run layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qualgate.executors import EXECUTOR_FILE
from qualgate.instruments.base import publishers
from qualgate.tracking import plots
from qualgate.tracking.layout import build_layout
from qualgate.tracking.mlflow_log import Tracker, TrackingError
from qualgate.tracking.state import TrackingState

PLOTS_DIR = "plots"


def per_token_kl(report: dict[str, Any], run_dir: Path) -> dict[str, np.ndarray]:
    found = {}
    for stack in report["stacks"]:
        fidelity = stack["instruments"].get("fidelity")
        path = run_dir / fidelity["per_token"] if fidelity and fidelity.get("per_token") else None
        if path is not None and path.is_file():
            with np.load(path) as data:
                found[stack["name"]] = np.asarray(data["kl"], dtype=np.float64)
    return found


def render_plots(report: dict[str, Any], run_dir: Path) -> list[Path]:
    """Write the run's PNGs into RUN_DIR/plots (kept locally whether or not MLflow is reachable)."""
    out = run_dir / PLOTS_DIR
    out.mkdir(exist_ok=True)
    written = []
    for metric in plots.WATERFALL_METRICS:
        path = out / f"waterfall_{metric}.png"
        if plots.waterfall(report, metric, path):
            written.append(path)
    path = out / "kl_distribution.png"
    if plots.kl_distribution(per_token_kl(report, run_dir), path, f"{report['pipeline']}: per-token KL by stack"):
        written.append(path)
    for instrument in publishers(report):
        written += instrument.charts(report, run_dir)
    return written


def _findings_table(report: dict[str, Any]) -> dict[str, list[Any]]:
    rows = [{"stack": s["name"], **f} for s in report["stacks"] for f in s["findings"]]
    columns = [
        "stack",
        "instrument",
        "metric",
        "value",
        "low",
        "high",
        "pessimistic",
        "warn",
        "fail",
        "status",
        "gated",
        "n",
        "unit",
        "n_needed",
        "reason",
    ]
    return {c: [row.get(c) for row in rows] for c in columns}


def read_placement(run_dir: Path) -> dict[str, Any] | None:
    """Where each stack ran (executor.json; absent in runs from before executors: no tags)."""
    try:
        found = json.loads((run_dir / EXECUTOR_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def upload(run_dir: Path, report: dict[str, Any], state: TrackingState, uri: str, experiment: str) -> tuple[str, bool]:
    """Log RUN_DIR to MLflow (once; see Tracker.upload) and record the outcome in tracking.json."""
    state.uri, state.experiment = uri, experiment
    state.save(run_dir)  # before any upload: a crash half way leaves the uid, so sync can replace the partial
    images = render_plots(report, run_dir)
    layout = build_layout(report, state.run_uid, read_placement(run_dir))

    def attach(tracker: Tracker, parent_id: str, child_ids: dict[str, str]) -> None:
        for name in ("report.json", "summary.md", "junit.xml"):
            tracker.log_artifact(parent_id, run_dir / name)
        for image in images:
            tracker.log_artifact(parent_id, image, PLOTS_DIR)
        tracker.log_table(parent_id, _findings_table(report), "tables/findings.json")
        tracker.log_datasets(parent_id, report["provenance"].get("data", []), Path.cwd())
        known = {cls.name: cls for cls in publishers(report)}
        for stack_run in layout.stacks:
            child_id, stack = child_ids[stack_run.spec.name], stack_run.stack
            for name, section in stack["instruments"].items():
                kind = known.get(name)
                for artifact, table in (kind.mlflow_tables(section, run_dir) if kind else {}).items():
                    if isinstance(table, Path):  # a file, under the artifact path's folder
                        tracker.log_artifact(child_id, table, str(Path(artifact).parent))
                    else:
                        tracker.log_table(child_id, table, artifact)
                if kind:
                    tracker.log_traces(child_id, state.experiment_id or "", kind.mlflow_traces(section))
            tracker.log_datasets(child_id, report["provenance"].get("data", []), Path.cwd())

    try:
        tracker = Tracker(uri)
        state.experiment_id = tracker.experiment_id(experiment)
        parent_id, written = tracker.upload(layout, state, state.experiment_id, attach)
    except TrackingError as exc:
        state.status, state.error = "failed", str(exc)
        state.save(run_dir)
        raise
    state.status, state.error, state.parent_run_id = "logged", None, parent_id
    state.save(run_dir)
    return parent_id, written
