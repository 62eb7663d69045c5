"""A judge qualgate serves for the run (`judge: {serve: ...}`): the model converted to GGUF once, served
by llama-cpp-python's OpenAI-compatible server on a free loopback port, judged through the openai client
exactly as a remote endpoint, and stopped with the run (at exit, and by the kernel if qualgate is killed)."""

from __future__ import annotations

import atexit
import json
import os
import sys
import urllib.request
from pathlib import Path

from qualgate.engines.process import ServerProcess
from qualgate.errors import ConfigError, MissingDependencyError
from qualgate.instruments.judge.config import SERVED_NAME, JudgeConfig
from qualgate.models import ModelSpec

START_TIMEOUT = 180.0
GGUF_CACHE = Path("runs/gguf")


def served_file(serve: str, where: str) -> Path | ModelSpec:
    """The .gguf file to serve, or the model to convert (checked without converting: validate is fast)."""
    if serve.endswith(".gguf"):
        path = Path(serve)
        if not path.is_file():
            raise ConfigError(f"{where}: {serve} does not exist; give a .gguf file, a model directory or bundled:NAME")
        return path
    spec = ModelSpec(path=serve, dtype="float32")
    try:
        local = spec.local_path()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if local is None or not (local / "config.json").is_file():
        raise ConfigError(f"{where}: '{serve}' is not a model directory with a config.json (or a .gguf file)")
    return spec


def judge_gguf(serve: str, where: str) -> Path:
    from qualgate.engines.gguf_quant import baseline_gguf

    found = served_file(serve, where)
    return found if isinstance(found, Path) else baseline_gguf(found, GGUF_CACHE)


def threads() -> int:
    """The server's threads: OMP_NUM_THREADS when set (a share of the machine), else every core."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


class JudgeServer(ServerProcess):
    name = "judge server"

    def __init__(self, config: JudgeConfig, log: Path) -> None:
        super().__init__(log)
        self.config = config
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> JudgeServer:
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError:
            raise MissingDependencyError("llama-cpp-python[server]", "instruments.judge.serve", "llamacpp") from None
        assert self.config.serve is not None
        model = judge_gguf(self.config.serve, "instruments.judge.serve")
        command = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(model), "--model_alias", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.config.serve_ctx), "--n_threads", str(threads()),
            "--seed", str(self.config.seed), "--chat_format", self.config.serve_chat_format,
        ]  # fmt: skip

        def ready() -> bool:
            with urllib.request.urlopen(self.url + "/models", timeout=2) as response:
                return bool(json.loads(response.read())["data"])

        self.launch(command, ready, START_TIMEOUT, die_with_parent=True)
        atexit.register(self.stop)  # stopped with the run however it ends
        return self
