"""Engine backends. Each registers by name; heavy SDKs are imported only when a backend is opened."""

from qualgate.backends.base import (
    BACKENDS,
    Backend,
    Capabilities,
    Generation,
    ScoreRequest,
    ScoreResult,
    Session,
    get_backend,
    open_session,
    register_backend,
)
from qualgate.backends.hf import HFBackend
from qualgate.backends.http.backend import OpenAIBackend
from qualgate.backends.http.vllm import VLLMBackend
from qualgate.backends.llamacpp import LlamaCppBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "Capabilities",
    "Generation",
    "HFBackend",
    "LlamaCppBackend",
    "OpenAIBackend",
    "ScoreRequest",
    "ScoreResult",
    "Session",
    "VLLMBackend",
    "get_backend",
    "open_session",
    "register_backend",
]
