"""A real llama.cpp server (llama-cpp-python's OpenAI-compatible server) serving a bundled model."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from helpers import engine_threads
from server_process import ServerProcess


class LlamaServer(ServerProcess):
    name = "llama.cpp server"

    def __init__(self, model: Path, log: Path, port: int | None = None, alias: str = "judge") -> None:
        super().__init__(log, port)
        self.model = model
        self.alias = alias
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> LlamaServer:
        command = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model), "--model_alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", "1024", "--n_threads", str(engine_threads()), "--seed", "0", "--chat_format", "chatml",
        ]  # fmt: skip

        def ready() -> bool:
            with urllib.request.urlopen(self.url + "/models", timeout=2) as response:
                return bool(json.loads(response.read())["data"])

        self.launch(command, ready, timeout)
        return self
