"""What runs on the Ray cluster: the run directory's files served from the driver's node, and one actor
per stack that measures it with the same code a local run uses.

Workers need no shared filesystem: every byte a unit keeps goes to `RunFilesActor`, pinned to the
driver's node, which writes into the run directory there. A retried call after a worker died reads the
checkpoints its first attempt left (finished chunks, generations, requests) and measures only the rest.
Large payloads (per-token arrays as npz bytes) travel through Ray's object store as arguments, not JSON.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import ray

from qualgate.errors import QualgateError
from qualgate.run_files import LocalFiles


class RunFilesActor:
    """The run directory, on the driver's node, for every worker (`RunFiles` over Ray)."""

    def __init__(self, root: str) -> None:
        self.files = LocalFiles(Path(root))

    def read(self, rel: str) -> bytes | None:
        return self.files.read(rel)

    def write(self, rel: str, data: bytes) -> None:
        self.files.write(rel, data)

    def discard(self, rel: str) -> None:
        self.files.discard(rel)


class RemoteFiles:
    """`RunFiles` on a worker: each call is answered by the driver's `RunFilesActor`."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def read(self, rel: str) -> bytes | None:
        data: bytes | None = ray.get(self.actor.read.remote(rel))
        return data

    def write(self, rel: str, data: bytes) -> None:
        ray.get(self.actor.write.remote(rel, data))

    def discard(self, rel: str) -> None:
        ray.get(self.actor.discard.remote(rel))


def _cause(exc: BaseException) -> BaseException:
    """The error a Ray call raised on the other side (a write the driver's disk refused)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class StackWorker:
    """One stack of the run: the pipeline's instruments and sessions, built here, once per actor."""

    def __init__(self, pipeline: Any, where: str, cwd: str, out: str, files: Any, threads: int) -> None:
        self.args = (pipeline, where, out, files)
        # Relative paths in a pipeline (golden, prompts, tasks) resolve as on the driver: same checkout
        # path on every node, or a runtime_env working_dir that Ray ships (docs/scale-out.md).
        if os.path.isdir(cwd):
            os.chdir(cwd)
        self.threads = threads

    def measure(self, index: int) -> dict[str, Any]:
        """The stack's entry and findings, or the error that stopped it (a user's or the infrastructure's)."""
        from qualgate.run.runner import Runner

        started = time.perf_counter()
        context = ray.get_runtime_context()
        where_ran = {"node": context.get_node_id()[:12], "host": socket.gethostname(), "pid": os.getpid()}
        pipeline, where, out, files = self.args
        try:
            import torch

            torch.set_num_threads(self.threads)  # the driver's count: the same numbers as a local run
            runner = Runner(pipeline, where, Path(out), files=RemoteFiles(files))
            instruments = pipeline.active_instruments()
            for instrument in instruments:
                instrument.check(pipeline, where)
            with runner.ctx:  # stops a managed engine server this stack started
                entry, findings = runner.stack(runner.planned[index], instruments)
        except QualgateError as exc:
            found = _cause(exc)
            return {**where_ran, "error": str(found), "exit_code": getattr(found, "exit_code", 3)}
        return {
            **where_ran,
            "entry": entry,
            "findings": findings,
            "computed": runner.ctx.computed,
            "reused": runner.ctx.reused,
            "seconds": time.perf_counter() - started,
        }
