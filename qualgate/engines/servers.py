"""Managed engine servers: started from a command line, shared by every session that needs the same
one, stopped when too many are up and at exit (a server must never outlive the run that started it).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import sys
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qualgate.engines.process import ServerProcess


@dataclass(frozen=True)
class ServerSpec:
    engine: str  # "vllm", "llama.cpp"
    command: tuple[str, ...]  # without host and port, which the pool picks
    env: tuple[tuple[str, str], ...] = ()
    health: str = "/v1/models"
    startup_timeout: float = 600.0
    log_dir: Path = field(default=Path("runs/engine-logs"))

    @property
    def key(self) -> str:
        blob = json.dumps([self.engine, self.command, self.env])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class ManagedServer(ServerProcess):
    def __init__(self, spec: ServerSpec) -> None:
        super().__init__(spec.log_dir / f"{spec.engine}-{spec.key}.log")
        self.spec = spec
        self.name = f"{spec.engine} server"
        self.users = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ManagedServer:
        command = [*self.spec.command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a", encoding="utf-8") as handle:
            handle.write("$ " + " ".join(command) + "\n")
        url = f"http://127.0.0.1:{self.port}{self.spec.health}"

        def ready() -> bool:
            with urllib.request.urlopen(url, timeout=5) as response:
                return bool(response.status == 200)

        self.launch(command, ready, self.spec.startup_timeout, dict(self.spec.env), die_with_parent=True)
        return self


class ServerPool:
    """At most `max_live` idle-or-busy servers; the least recently used idle one is stopped first."""

    def __init__(self, max_live: int = 2) -> None:
        self.max_live = max_live
        self.servers: OrderedDict[str, ManagedServer] = OrderedDict()

    def acquire(self, spec: ServerSpec) -> ManagedServer:
        server = self.servers.get(spec.key)
        if server is not None and not server.running:
            del self.servers[spec.key]  # it died: start it again (its log keeps the previous run)
            server = None
        if server is None:
            self._make_room()
            print(f"qualgate: starting {spec.engine} server (log: {spec.log_dir})", file=sys.stderr, flush=True)
            server = ManagedServer(spec).start()
            self.servers[spec.key] = server
        self.servers.move_to_end(spec.key)
        server.users += 1
        return server

    def release(self, server: ManagedServer) -> None:
        server.users = max(0, server.users - 1)

    def _make_room(self) -> None:
        idle = [key for key, s in self.servers.items() if s.users == 0]
        while len(self.servers) >= self.max_live and idle:
            self.servers.pop(idle.pop(0)).stop()

    def stop_all(self) -> None:
        while self.servers:
            self.servers.popitem()[1].stop()


POOL = ServerPool()
atexit.register(POOL.stop_all)


def env_pairs(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(env.items()))
