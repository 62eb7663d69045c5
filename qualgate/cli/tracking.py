"""MLflow commands: logging a finished run, `qualgate sync RUN_DIR`, `qualgate compare RUN_DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qualgate import report as publish
from qualgate.tracking.state import TrackingState


def cmd_sync(args: argparse.Namespace) -> int:
    from qualgate.tracking.export import upload
    from qualgate.tracking.mlflow_log import resolve_uri

    run_dir = Path(args.run_dir)
    state = TrackingState.load(run_dir)
    result = publish.read(run_dir)
    uri = resolve_uri(args.tracking_uri, state.uri)
    experiment = (
        args.experiment or state.experiment or result["provenance"]["tracking"].get("experiment") or result["pipeline"]
    )
    parent_id, written = upload(run_dir, result, state, uri, experiment)
    print(f"MLflow: run {parent_id} {'logged' if written else 'already there, nothing to do'} ({uri})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from qualgate.tracking.compare import changes, previous_passing_run, stack_metrics
    from qualgate.tracking.mlflow_log import Tracker, resolve_uri

    run_dir = Path(args.run_dir)
    state = TrackingState.load(run_dir)
    result = publish.read(run_dir)
    if state.status != "logged" or not state.parent_run_id:
        from qualgate.errors import ConfigError

        raise ConfigError(f"{run_dir} is not in MLflow yet (status {state.status}); run: qualgate sync {run_dir}")
    tracker = Tracker(resolve_uri(args.tracking_uri, state.uri))
    experiment_id = tracker.experiment_id(state.experiment or result["pipeline"])
    previous = previous_passing_run(tracker, experiment_id, result["pipeline"], state.started_ms)
    if previous is None:
        print(f"compare: no earlier passing run of pipeline '{result['pipeline']}' in MLflow; nothing to compare")
        return 0
    found = changes(
        stack_metrics(tracker, experiment_id, state.parent_run_id),
        stack_metrics(tracker, experiment_id, previous.info.run_id),
    )
    (run_dir / "compare.json").write_text(
        json.dumps({"previous_run_id": previous.info.run_id, "changes": [c.as_dict() for c in found]}, indent=2) + "\n",
        encoding="utf-8",
    )
    table = Table(
        "stack", "metric", "then [95%]", "now [95%]", "delta", "changed", title=f"vs run {previous.info.run_id}"
    )

    def cell(value: float, low: float | None, high: float | None) -> str:
        return f"{value:.4g}" + ("" if low is None or high is None else f" [{low:.4g}, {high:.4g}]")

    for c in found:
        table.add_row(
            c.stack,
            c.metric,
            cell(c.then, c.then_low, c.then_high),
            cell(c.now, c.now_low, c.now_high),
            f"{c.delta:+.3g}",
            "yes" if c.significant else "no",
        )
    Console(no_color=args.no_color, width=160).print(table)
    significant = [c for c in found if c.significant]
    print(
        f"compare: {len(significant)} of {len(found)} metrics changed beyond both intervals; {run_dir / 'compare.json'}"
    )
    return 1 if significant and args.fail_on_change else 0


def add_commands(commands: Any) -> None:
    sync = commands.add_parser("sync", help="upload a finished run directory to MLflow (idempotent)")
    sync.add_argument("run_dir")
    sync.add_argument("--tracking-uri", default=None, help="default: the run's own, else MLFLOW_TRACKING_URI")
    sync.add_argument("--experiment", default=None, help="default: the run's own experiment")
    sync.set_defaults(func=cmd_sync)
    cmp = commands.add_parser("compare", help="compare a run with the latest passing run of its pipeline in MLflow")
    cmp.add_argument("run_dir")
    cmp.add_argument("--tracking-uri", default=None)
    cmp.add_argument("--fail-on-change", action="store_true", help="exit 1 when a metric moved beyond both intervals")
    cmp.add_argument("--no-color", action="store_true")
    cmp.set_defaults(func=cmd_compare)
