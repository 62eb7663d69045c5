"""Upload a finished run directory to MLflow, idempotently, and find earlier runs of a pipeline.

Everything goes through `MlflowClient` with explicit run ids (no fluent global "active run"), so a
sync in another process, or a retry after a server died half way, logs the same tree. A parent is
tagged `qualgate.complete = true` only after every child and artifact is in; a sync that finds a
complete parent with the same `qualgate.run_uid` does nothing, and one that finds a partial upload
deletes it first, so a run appears once however often it is synced.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qualgate.errors import ConfigError, InfrastructureError, MissingDependencyError
from qualgate.redact import cap
from qualgate.tracking.layout import RunLayout, RunSpec
from qualgate.tracking.state import TrackingState

if TYPE_CHECKING:
    from qualgate.instruments.base import TraceRecord

DEFAULT_URI = "sqlite:///mlflow.db"  # current MLflow's own default: a SQLite file in the working directory
COMPLETE_TAG = "qualgate.complete"
T = TypeVar("T")


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's trace exporter writes to the process-wide tracking URI: point it at `uri`, synchronously
    (a trace must exist before feedback can reference it), then put back exactly what was there, the
    module global, MLFLOW_TRACKING_URI and the async switch. `mlflow.set_tracking_uri(previous)` would
    not: it pins the global and the variable, so a caller's later change of the variable (or a test's)
    would be ignored, or a dead server's address would outlive the run."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING")
    saved_env = {name: os.environ.get(name) for name in names}
    saved_global = tracking_utils._tracking_uri
    os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_global)  # type: ignore[arg-type]  # None unsets it, as before
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class TrackingError(InfrastructureError):
    """The tracking store is unreachable or refused a write (exit code 3 when the gate itself passed)."""


def resolve_uri(cli: str | None = None, pipeline: str | None = None) -> str:
    """--tracking-uri, then the pipeline's `tracking.uri`, then MLFLOW_TRACKING_URI, then ./mlflow.db.
    A relative SQLite path is made absolute so `qualgate sync` from another directory finds the store."""
    uri = cli or pipeline or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


# The stores MLflow's client opens; anything else fails deep inside it, after the run.
KNOWN_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


def check_uri(uri: str, where: str = "tracking URI") -> None:
    """Exit 2 for a URI MLflow cannot open; exit 3 for a SQLite store whose directory cannot be
    written. Checked before the run measures anything, so a typo does not wait for the end."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return  # a local path (a file store), or a bare name such as `databricks`
    if scheme.split("+")[0] not in KNOWN_SCHEMES:
        raise ConfigError(
            f"{where} '{cap(uri, 120)}': MLflow has no store for scheme '{cap(scheme, 40)}'; use "
            "sqlite:///path/mlflow.db, http(s)://host:port or file:///path (or pass --no-tracking)"
        )
    if scheme == "sqlite":
        database = Path(rest.removeprefix("/")) if not rest.startswith("//") else Path(rest[1:])
        directory = database.parent
        if not directory.is_dir():
            raise ConfigError(
                f"{where} '{uri}': directory {directory} does not exist; create it or pass --tracking-uri"
            )
        if not os.access(directory, os.W_OK) or (database.exists() and not os.access(database, os.W_OK)):
            raise InfrastructureError(
                f"{where} '{uri}': {directory} is not writable, so MLflow cannot create or update "
                f"{database.name}; pass --tracking-uri with a writable place, or --no-tracking"
            )


def _batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Tracker:
    def __init__(self, uri: str) -> None:
        # Fail within seconds, not after MLflow's default minutes of retries: the run is safe on disk
        # and `qualgate sync` uploads it later. A user's own settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise MissingDependencyError("mlflow", "MLflow tracking") from None
        self.uri = uri
        if uri.startswith(("http://", "https://")):
            self._probe()
        self.client = MlflowClient(tracking_uri=uri)

    def _probe(self) -> None:
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"tracking server {self.uri} is unreachable ({reason})") from None

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Every MLflow call goes through here so any failure becomes one line naming the store."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MLflow raises MlflowException, requests and sqlalchemy errors alike
            message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise TrackingError(f"tracking store {self.uri}: {what} failed: {message[:300]}") from None

    # -- experiments ------------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        experiment = self._call("get experiment", self.client.get_experiment_by_name, name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                self._call("restore experiment", self.client.restore_experiment, experiment.experiment_id)
            return str(experiment.experiment_id)
        location = None
        if self.uri.startswith("sqlite:///"):
            # Artifacts beside the database (a SQLite experiment stores an absolute artifact path).
            db = Path(self.uri[len("sqlite:///") :])
            location = (db.parent / "mlartifacts").as_uri()
        return str(self._call("create experiment", self.client.create_experiment, name, artifact_location=location))

    def runs(self, experiment_id: str, filter_string: str, order_by: list[str] | None = None) -> list[Any]:
        return list(
            self._call(
                "search runs",
                self.client.search_runs,
                [experiment_id],
                filter_string=filter_string,
                order_by=order_by,
                max_results=1000,
            )
        )

    # -- logging ----------------------------------------------------------------------------------
    def _create(self, experiment_id: str, spec: RunSpec, start_ms: int, parent_id: str | None = None) -> str:
        from mlflow.entities import Metric, Param

        tags = dict(spec.tags)
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id  # what MLflow's UI nests children by
        run = self._call(
            "create run", self.client.create_run, experiment_id, start_time=start_ms, tags=tags, run_name=spec.name
        )
        run_id = str(run.info.run_id)
        params = [Param(k, v) for k, v in spec.params.items()]
        for param_batch in _batches(params, 100):  # MLflow: at most 100 params + tags per call
            self._call("log params", self.client.log_batch, run_id, params=param_batch)
        metrics = [Metric(key, value, start_ms, step) for key, value, step in spec.metrics]
        for metric_batch in _batches(metrics, 1000):
            self._call("log metrics", self.client.log_batch, run_id, metrics=metric_batch)
        return run_id

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if path.is_file():
            self._call(f"upload {path.name}", self.client.log_artifact, run_id, str(path), artifact_path)

    def log_table(self, run_id: str, data: Any, artifact_file: str) -> None:
        self._call(
            f"upload table {artifact_file}", self.client.log_table, run_id, data=data, artifact_file=artifact_file
        )

    def log_traces(self, run_id: str, experiment_id: str, traces: Sequence[TraceRecord]) -> None:
        """GenAI traces linked to the run, each with its assessments (MLflow's Traces tab and evaluation
        view browse them). The trace exporter writes to the process-wide tracking URI, so it is pointed
        at this store for the upload, synchronously: a trace must exist before feedback can reference it."""
        if not traces:
            return
        import mlflow
        from mlflow.entities import AssessmentSource, AssessmentSourceType

        with _process_tracking_uri(self.uri):
            for trace in traces:
                span = self._call(
                    f"start trace {trace.name}",
                    self.client.start_trace,
                    name=trace.name,
                    inputs=trace.inputs,
                    tags=trace.tags,
                    experiment_id=experiment_id,
                    run_id=run_id,
                )
                self._call(f"end trace {trace.name}", self.client.end_trace, span.trace_id, outputs=trace.outputs)
                for found in trace.assessments:
                    source = AssessmentSource(source_type=AssessmentSourceType.LLM_JUDGE, source_id=found.source)
                    self._call(
                        f"log feedback {found.name}",
                        mlflow.log_feedback,
                        trace_id=span.trace_id,
                        name=found.name,
                        value=found.value,
                        rationale=found.rationale,
                        source=source,
                    )

    def log_datasets(self, run_id: str, data: list[dict[str, str]], base: Path) -> None:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for item in data:
            source = Path(item["source"])
            dataset = MetaDataset(  # type: ignore[abstract]  # MLflow's documented by-reference dataset
                source=LocalArtifactDatasetSource(str(source if source.is_absolute() else base / source)),
                name=item["name"],
                digest=item["sha256"][:16],
            )
            inputs.append(
                DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", item["role"])])
            )
        if inputs:
            self._call("log datasets", self.client.log_inputs, run_id, datasets=inputs)

    def finish(self, run_id: str, end_ms: int) -> None:
        self._call("finish run", self.client.set_terminated, run_id, "FINISHED", end_ms)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call("set tag", self.client.set_tag, run_id, key, value)

    def delete(self, run_id: str) -> None:
        self._call("delete partial run", self.client.delete_run, run_id)

    def existing(self, experiment_id: str, run_uid: str) -> tuple[str | None, list[str]]:
        """(id of a complete parent with this uid, ids of every run of a partial upload)."""
        found = self.runs(experiment_id, f"tags.`qualgate.run_uid` = '{run_uid}'")
        for run in found:
            tags = run.data.tags
            if tags.get("qualgate.kind") == "run" and tags.get(COMPLETE_TAG) == "true":
                return str(run.info.run_id), []
        return None, [str(run.info.run_id) for run in found]

    def upload(
        self,
        layout: RunLayout,
        state: TrackingState,
        experiment_id: str,
        attach: Any,
    ) -> tuple[str, bool]:
        """Log the tree; `attach(tracker, parent_id, child_ids)` uploads artifacts. Returns (parent id,
        whether anything was written)."""
        complete, partial = self.existing(experiment_id, state.run_uid)
        if complete:
            return complete, False
        for run_id in partial:
            self.delete(run_id)
        parent_id = self._create(experiment_id, layout.parent, state.started_ms)
        child_ids = {}
        for stack_run in layout.stacks:
            child_id = self._create(experiment_id, stack_run.spec, state.started_ms, parent_id)
            child_ids[stack_run.spec.name] = child_id
        attach(self, parent_id, child_ids)
        for child_id in child_ids.values():
            self.finish(child_id, state.finished_ms)
        self.set_tag(parent_id, COMPLETE_TAG, "true")  # last: only now is the upload whole
        self.finish(parent_id, state.finished_ms)
        return parent_id, True
