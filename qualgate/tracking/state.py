"""`tracking.json` in the run directory: the run's identity for MLflow and whether it reached MLflow.

The run directory is the source of truth; this file only says where its copy in MLflow is (or why it
is not there yet), so `qualgate sync` can finish the upload later and never upload it twice.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from qualgate.errors import ConfigError
from qualgate.fsio import atomic_write_text, read_text

STATE_FILE = "tracking.json"
Status = Literal["pending", "logged", "failed", "disabled"]


def now_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)


class TrackingState(BaseModel):
    run_uid: str
    started_ms: int
    finished_ms: int
    status: Status = "pending"
    uri: str | None = None
    experiment: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    error: str | None = None

    @classmethod
    def new(cls, started_ms: int) -> TrackingState:
        return cls(run_uid=uuid.uuid4().hex, started_ms=started_ms, finished_ms=now_ms())

    def save(self, run_dir: Path) -> None:
        atomic_write_text(run_dir / STATE_FILE, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> TrackingState:
        path = run_dir / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"{path} is missing: {run_dir} is not a finished qualgate run (run `qualgate run` first)")
        try:
            return cls.model_validate(json.loads(read_text(path, "tracking state")))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise ConfigError(
                f"{path} is not a valid tracking state ({exc.__class__.__name__}); rerun the pipeline"
            ) from None
