"""What every instrument measures through: the run's store, sessions on the pipeline's backend, progress.

A context manager: leaving it stops every managed engine server the run started, whatever ended the run
(the process's exit handler is only the backstop).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qualgate.backends import BACKENDS, Backend, Session, open_session
from qualgate.code_identity import class_identity
from qualgate.config import Pipeline
from qualgate.run_files import RunFiles
from qualgate.stack import Stack
from qualgate.store import RunStore, identity_key

OnProgress = Callable[[str], Callable[[int, int], None]]


class RunContext:
    def __init__(
        self,
        pipeline: Pipeline,
        where: str,
        out: Path,
        on_progress: OnProgress | None = None,
        files: RunFiles | None = None,
    ) -> None:
        """`files`: where records and samples go when not in `out` (a cluster worker writes through the
        driver); `out` is then only the worker's scratch directory (engine logs)."""
        self.pipeline = pipeline
        self.where = where
        self.out = out
        self.store = RunStore(out) if files is None else RunStore(files=files)
        self.files: RunFiles = self.store.files
        self.on_progress = on_progress
        self.reused = 0
        self.computed = 0
        self.backend: type[Backend] = BACKENDS.get(pipeline.backend.name)
        # The backend's configuration and its code (class and module sources) key every record.
        self.backend_identity = {**pipeline.backend.model_dump(), "code": class_identity(self.backend)}

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, *exc: object) -> None:
        from qualgate.engines.servers import POOL

        POOL.stop_all()

    def lookup(self, identity: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """The store key of a unit of work (its identity plus the backend) and its record, if finished."""
        key = identity_key({**identity, "backend": self.backend_identity})
        record = self.store.get(key)
        if record is not None:
            self.reused += 1
        return key, record

    def put(self, key: str, record: dict[str, Any]) -> None:
        """A finished unit of work: written atomically, so a crash after this loses none of it."""
        self.store.put(key, record)
        self.computed += 1

    def progress(self, label: str) -> Callable[[int, int], None] | None:
        return self.on_progress(label) if self.on_progress else None

    def open(self, stack: Stack) -> Session:
        """A session on the pipeline's backend; a managed engine writes its server logs into the run."""
        options = dict(self.pipeline.backend.options)
        if "log_dir" in getattr(getattr(self.backend, "Options", None), "model_fields", {}):
            options.setdefault("log_dir", str(self.out / "engine-logs"))
        session = open_session(stack, self.pipeline.backend.name, **options)
        found = session.provenance()
        if found is not None:
            # A record of its own: a resumed run that reuses this stack still reports what was found.
            self.store.put(self._probe_key(stack.name), found)
        return session

    def _probe_key(self, name: str) -> str:
        return identity_key({"engine_probe": name, "backend": self.pipeline.backend.model_dump()})

    def engine_probes(self, names: list[str]) -> dict[str, Any]:
        """What each named stack's session reported about its engine (an HTTP endpoint's probe)."""
        found = {name: self.store.get(self._probe_key(name)) for name in names}
        return {name: probe for name, probe in found.items() if probe is not None}
