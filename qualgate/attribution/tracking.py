"""An analysis (attribution, K vs V sweep) logged to the pipeline's MLflow experiment: one run with its
tables, charts and headline metrics, tagged so it is told apart from gate runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qualgate.config import Pipeline


def log_analysis(
    pipeline: Pipeline,
    cli_uri: str | None,
    kind: str,
    name: str,
    tables: dict[str, Any],
    files: list[Path],
    metrics: dict[str, Any],
) -> str | None:
    """The MLflow run id, or None when tracking is off for this pipeline."""
    if not pipeline.tracking.enabled:
        return None
    from qualgate.tracking.layout import RunSpec
    from qualgate.tracking.mlflow_log import Tracker, resolve_uri
    from qualgate.tracking.state import now_ms

    tracker = Tracker(resolve_uri(cli_uri, pipeline.tracking.uri))
    experiment = tracker.experiment_id(pipeline.tracking.experiment or pipeline.name)
    spec = RunSpec(name=name, tags={"qualgate.kind": kind, "qualgate.pipeline": pipeline.name})
    for key, value in metrics.items():
        spec.metric(key, value)
    started = now_ms()
    run_id = tracker._create(experiment, spec, started)
    for artifact, table in tables.items():
        tracker.log_table(run_id, table, artifact)
    for path in files:
        tracker.log_artifact(run_id, path)
    tracker.finish(run_id, now_ms())
    return run_id
