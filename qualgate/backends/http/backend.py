"""The `openai` backend: stacks served by endpoints the user already runs (one per stack), any engine
that speaks the OpenAI completions API. Every session is probed before it is measured."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qualgate.backends.base import Backend, register_backend
from qualgate.backends.http.client import CompletionsClient, Endpoint
from qualgate.backends.http.probe import check_canary, probe
from qualgate.backends.http.session import OpenAISession
from qualgate.errors import ConfigError
from qualgate.layers import Layer
from qualgate.models import ModelSpec, load_hf_tokenizer
from qualgate.registry import did_you_mean
from qualgate.stack import Stack
from qualgate.validation import validate


class EndpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    base_url: str = Field(description="the server's OpenAI API root, e.g. http://host:8000/v1")
    model: str = Field(description="the model name the server expects in requests")
    api_key: str = "EMPTY"


class HTTPOptions(BaseModel):
    """Options every HTTP backend shares (backend.options in the pipeline)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    concurrency: int = Field(4, ge=1, description="requests in flight per endpoint (scoring)")
    timeout: float = Field(300.0, gt=0, description="seconds per request")
    retries: int = Field(4, ge=0, description="retries of a failed request, with exponential backoff")
    canary: bool = Field(True, description="compare a canary's logprobs with the in-process baseline")
    canary_tolerance: float = Field(0.02, ge=0, description="mean |dlogprob| allowed, stacks without lossy layers")
    canary_tolerance_lossy: float = Field(1.0, ge=0, description="the same for stacks with lossy layers")
    require_scoring: bool = Field(True, description="refuse an endpoint whose prompt logprobs are unusable")


class OpenAIOptions(HTTPOptions):
    endpoints: dict[str, EndpointConfig] = Field(
        default_factory=dict, description="stack name -> endpoint serving it ('base' is the baseline)"
    )
    base_url: str | None = Field(None, description="one endpoint for every stack (when they share a server)")
    model: str | None = None


@cache
def _tokenizer(spec_json: str) -> Any:
    return load_hf_tokenizer(ModelSpec.model_validate_json(spec_json))


def model_vocab_size(spec: ModelSpec, tokenizer: Any) -> int:
    path = spec.local_path()
    config = path / "config.json" if path is not None else None
    if config is not None and config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        size = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
        if size:
            return int(size)
    return len(tokenizer)


def model_positions(spec: ModelSpec) -> int:
    path = spec.local_path()
    config = path / "config.json" if path is not None else None
    if config is not None and config.is_file():
        return int(json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings") or 0)
    return 0


@cache
def _baseline_scorer(spec_json: str) -> Callable[[list[int]], np.ndarray]:
    """The in-process HF baseline's logprobs of a token sequence, loaded once per model."""
    from qualgate.backends.hf import HFSession

    session = HFSession(Stack(model=ModelSpec.model_validate_json(spec_json)))
    return lambda ids: session.score(ids, top_k=1).logprobs


def canary_reference(spec: ModelSpec, enabled: bool) -> Callable[[list[int]], np.ndarray] | None:
    if not enabled:
        return None
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    return _baseline_scorer(spec.model_dump_json())


class HTTPBackend(Backend):
    """Opens a probed OpenAISession on the endpoint that serves a stack."""

    block_scoring: ClassVar[bool] = False

    Options: ClassVar[type[HTTPOptions]] = HTTPOptions

    def __init__(self, **options: Any) -> None:
        self.options = validate(self.Options, options, f"backend '{self.name}' options")

    def endpoint(self, stack: Stack) -> Endpoint:
        raise NotImplementedError

    def open(self, stack: Stack) -> OpenAISession:
        return self.open_on(stack, self.endpoint(stack))

    def open_on(
        self, stack: Stack, endpoint: Endpoint, diagnose: Callable[[], str | None] | None = None
    ) -> OpenAISession:
        o = self.options
        tokenizer = _tokenizer(stack.model.model_dump_json())
        client = CompletionsClient(endpoint, o.concurrency, o.timeout, o.retries, diagnose=diagnose)
        session = OpenAISession(
            stack,
            endpoint,
            tokenizer,
            model_vocab_size(stack.model, tokenizer),
            client,
            64,
            model_positions(stack.model),
        )
        session.configure(probe(session, o.require_scoring))
        reference = canary_reference(stack.model, o.canary)
        if reference is not None and session.probe is not None and session.probe.scoring:
            check_canary(session, reference, o.canary_tolerance if stack.lossless else o.canary_tolerance_lossy)
        return session


@register_backend
class OpenAIBackend(HTTPBackend):
    name: ClassVar[str] = "openai"
    Options = OpenAIOptions
    options: OpenAIOptions

    def supports(self, layer: Layer[Any]) -> bool:
        # The endpoint already applies its layers; the pipeline's layers describe what it serves.
        return True

    def check(self, stack: Stack) -> None:
        super().check(stack)
        self.endpoint(stack)  # every stack has an endpoint: a typo fails before the first stack runs

    def endpoint(self, stack: Stack) -> Endpoint:
        o = self.options
        for key in (stack.name, stack.label):
            if key in o.endpoints:
                e = o.endpoints[key]
                return Endpoint(e.base_url, e.model, e.api_key)
        if o.base_url and o.model:
            return Endpoint(o.base_url, o.model)
        raise ConfigError(
            f"backend 'openai': no endpoint for stack '{stack.name}' in backend.options.endpoints; "
            f"{did_you_mean(stack.name, list(o.endpoints))} (add '{stack.name}: {{base_url: ..., model: ...}}')"
        )
