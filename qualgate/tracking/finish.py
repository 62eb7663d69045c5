"""Logging a just-finished run to MLflow: the policy of when tracking is off, where it goes, and what a
failure means (the run is complete on disk; `qualgate sync` uploads it later)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qualgate.config import Pipeline
from qualgate.tracking.state import TrackingState


def track_run(
    out: Path, result: dict[str, Any], pipeline: Pipeline, started_ms: int, cli_uri: str | None, disabled: bool
) -> bool:
    """Log a just-finished run; True when it is in MLflow (or tracking is off). A failure never loses
    the run: it is complete on disk and `qualgate sync` uploads it later."""
    from qualgate.tracking.export import upload
    from qualgate.tracking.mlflow_log import TrackingError, resolve_uri

    state = TrackingState.new(started_ms)
    if disabled or not pipeline.tracking.enabled:
        state.status = "disabled"
        state.save(out)
        return True
    uri = resolve_uri(cli_uri, pipeline.tracking.uri)
    experiment = pipeline.tracking.experiment or pipeline.name
    try:
        parent_id, _ = upload(out, result, state, uri, experiment)
    except TrackingError as exc:
        # One line, like every error: the run is safe on disk and the upload can be redone.
        print(
            f"qualgate: error: tracking failed: {exc}; the run is complete in {out}: upload it later with "
            f"qualgate sync {out}",
            file=sys.stderr,
        )
        return False
    print(f"MLflow: run {parent_id} in experiment '{experiment}' at {uri}")
    return True
