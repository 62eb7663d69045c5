"""A real two-node Ray cluster on this machine (`ray start --head` plus a second node process), for tests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from server_process import free_port


class RayCluster:
    """1 CPU per node, 2 in all: two stacks run at once, one on each node."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's unix sockets live under its temp dir; their paths must stay short (108 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="qgray", dir="/tmp"))
        self.ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")

    def _ray(self, *args: str) -> None:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        done = subprocess.run([self.ray, *args], capture_output=True, text=True, env=env, timeout=120)
        if done.returncode:
            raise RuntimeError(f"ray {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")

    def start(self) -> RayCluster:
        """Ray 2.5x starts a head with token authentication: every node and driver needs its token. This
        cluster's own token (not ~/.ray/auth_token) reaches the nodes and the drivers the tests start
        through the environment, restored by stop()."""
        token = self.temp_dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        self._ray("start", "--head", "--port", str(self.port), "--include-dashboard=false", *common)
        self._ray("start", "--address", self.address, *common)
        return self

    def nodes(self) -> list[str]:
        """The alive nodes' ids (12 characters, as a run's progress lines and executor.json name them),
        asked from a fresh process: Ray reads its authentication settings once, at import."""
        script = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='error', log_to_driver=False); "
            "print(json.dumps([n['NodeID'][:12] for n in ray.nodes() if n['Alive']]))"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
        found: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
        return found

    def stop(self) -> None:
        subprocess.run([self.ray, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
