"""The Ray executor: the run's stacks spread over a Ray cluster, one actor per stack.

The driver (this process) plans, submits, streams completions (`ray.wait`), gates and reports; every
file goes into the driver's run directory, the content-addressed store that stays the source of truth.
So a retried call is idempotent, a killed driver resumes by rerunning the same command, and the report
is byte-identical to a local run's. The stack without layers goes first when the plan has one: the
other stacks compare with its results (benchmarks) and would otherwise each compute them again.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from qualgate.errors import ConfigError, InfrastructureError, MissingDependencyError, QualgateError

if TYPE_CHECKING:
    from qualgate.config import ExecutorConfig
    from qualgate.executors import Measured
    from qualgate.instruments import Instrument
    from qualgate.run.runner import Runner

CONNECT_TIMEOUT = 5.0  # seconds to reach the head before saying it is unreachable


def head_address(address: str) -> tuple[str, int] | None:
    """host and port of a Ray head address (`host:port`, `ray://host:port`), None for "auto"/"local"."""
    if address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if not parts.hostname:
        raise ConfigError(f"executor.address '{address}' is not host:port; pass the Ray head's address")
    return parts.hostname, parts.port or (10001 if address.startswith("ray://") else 6379)


def check_reachable(address: str) -> None:
    """A head that does not answer is exit 3 in seconds, not Ray's minutes of retries."""
    found = head_address(address)
    if found is None:
        return
    try:
        with socket.create_connection(found, timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InfrastructureError(
            f"the Ray head at {address} is unreachable ({reason}); start it (`ray start --head --port "
            f"{found[1]}`) or pass the running head's address with --ray-address; --executor local needs no cluster"
        ) from None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("ray", "executor 'ray'", "ray") from None
    return ray


class RayExecutor:
    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self.placement: dict[str, Any] = {"executor": "ray", "stacks": {}}

    def _connect(self, ray: Any) -> bool:
        """Join the cluster (or start a local one); True when this call started Ray and must stop it."""
        if ray.is_initialized():
            return False
        address = self.config.address or os.environ.get("RAY_ADDRESS")
        if address:
            check_reachable(address)
        ray.init(
            address=address or None,
            runtime_env=self.config.runtime_env or None,
            include_dashboard=False,
            log_to_driver=False,  # workers' logs stay in Ray's session directory; the driver prints one line per stack
            logging_level="error",
        )
        return True

    def measure(self, runner: Runner, instruments: list[Instrument[Any]]) -> list[Measured]:
        ray = _import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from qualgate.executors.ray_worker import RunFilesActor, StackWorker

        started_ray = self._connect(ray)
        try:
            here = ray.get_runtime_context().get_node_id()
            files = (
                ray.remote(RunFilesActor)
                .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
                .remote(str(runner.ctx.out.resolve()))
            )
            cfg = self.config
            worker = ray.remote(StackWorker).options(
                num_cpus=cfg.num_cpus,
                num_gpus=cfg.num_gpus,
                resources=dict(cfg.resources) or None,
                max_restarts=cfg.max_restarts,
                max_task_retries=cfg.max_task_retries,
            )
            threads = self._threads(runner)
            args = (runner.pipeline, runner.where, os.getcwd(), str(runner.ctx.out.resolve()), files, threads)
            planned = runner.planned
            first = [i for i, p in enumerate(planned) if not p.layer_names]
            waves = [first, [i for i in range(len(planned)) if i not in first]]
            results: dict[int, dict[str, Any]] = {}
            for wave in waves:
                self._wave(ray, runner, worker, args, wave, results)
        finally:
            if started_ray:
                ray.shutdown()
        failed = {i: r for i, r in results.items() if "error" in r}
        if failed:
            raise self._failure(runner, failed, len(results))
        return [(planned[i], results[i]["entry"], results[i]["findings"]) for i in range(len(planned))]

    @staticmethod
    def _threads(runner: Runner) -> int:
        """The torch threads of every stack actor: the backend's `threads`, else what this process uses,
        so the actors compute what a local run would. Token-by-token decoding on the CPU rounds
        differently with another thread count (measured on the nightly: every decode-path and
        equivalence number moved in its 6th digit with 1 thread instead of 2), so a report would differ."""
        import torch

        configured = runner.pipeline.backend.options.get("threads")
        return int(configured) if configured else torch.get_num_threads()

    def _wave(
        self, ray: Any, runner: Runner, worker: Any, args: tuple[Any, ...], wave: list[int], results: dict[int, Any]
    ) -> None:
        """Every stack of `wave` on its own actor; Ray starts them as resources allow and each is killed
        once its stack is in, freeing its CPUs (or GPUs) for the next."""
        if not wave:
            return
        actors = {i: worker.remote(*args) for i in wave}
        pending = {actors[i].measure.remote(i): i for i in wave}
        attempts = dict.fromkeys(wave, 1)
        started = time.perf_counter()
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            name = runner.planned[i].stack.name
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                ray.kill(actors[i], no_restart=True)
                if attempts[i] <= self.config.max_task_retries:
                    # A worker that died or stopped answering (a node under load misses its health checks):
                    # measuring is idempotent (finished units are records, finished chunks checkpoints),
                    # so a new worker picks the stack up where the last one left it.
                    attempts[i] += 1
                    runner.on_line(
                        f"[ray] stack {name}: its worker was lost ({type(exc).__name__}); "
                        f"retrying on a new worker (attempt {attempts[i]}/{self.config.max_task_retries + 1})"
                    )
                    actors[i] = worker.remote(*args)
                    pending[actors[i].measure.remote(i)] = i
                    continue
                result = {"node": "?", "error": f"its worker died ({type(exc).__name__})", "exit_code": 3}
            ray.kill(actors[i])
            results[i] = result
            self.placement["stacks"][name] = {k: result[k] for k in ("node", "host") if k in result}
            if "error" not in result:
                runner.ctx.computed += result["computed"]
                runner.ctx.reused += result["reused"]
                status = f"{result['computed']} units measured, {result['reused']} reused, {result['seconds']:.1f} s"
            else:
                status = f"failed: {result['error']}"
            runner.on_line(
                f"[ray] {len(results)}/{len(runner.planned)} stack {name} on node {result['node']} "
                f"(host {result.get('host', '?')}, pid {result.get('pid', '?')}): {status} "
                f"(wall {time.perf_counter() - started:.1f} s)"
            )

    @staticmethod
    def _failure(runner: Runner, failed: dict[int, dict[str, Any]], total: int) -> QualgateError:
        """One error for the stacks that failed: exit 2 when any was the user's input, else 3. The
        finished stacks are in the run directory; rerunning after the fix reuses them."""
        parts = [f"{runner.planned[i].stack.name}: {r['error']}" for i, r in sorted(failed.items())]
        message = (
            f"{len(failed)} of {total} stacks failed on the Ray cluster ({'; '.join(parts)}); the other stacks "
            "are kept in the run directory: rerun the same command after the fix to measure only these"
        )
        bad_input = any(r.get("exit_code") == ConfigError.exit_code for r in failed.values())
        return ConfigError(message) if bad_input else InfrastructureError(message)
