"""A real `mlflow server` (SQLite backend, local artifact root) on a free loopback port, for tests."""

from __future__ import annotations

import shutil
import sys
import urllib.request
from pathlib import Path

from server_process import ServerProcess, free_port

__all__ = ["MlflowServer", "free_port"]


class MlflowServer(ServerProcess):
    name = "mlflow server"

    def __init__(self, root: Path, port: int | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root / "server.log", port)
        self.root = root
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> MlflowServer:
        mlflow = shutil.which("mlflow") or f"{sys.executable} -m mlflow"
        command = [
            *mlflow.split(), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip

        def ready() -> bool:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return bool(response.status == 200)

        # MLflow 3's server also starts a job runner and six huey consumers (GenAI evaluation jobs), each a
        # full mlflow import: ~1 CPU-minute per start that tracking never uses.
        self.launch(command, ready, timeout, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        return self
