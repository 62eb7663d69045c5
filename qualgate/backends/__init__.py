"""Engine backends. Each registers by name; heavy SDKs are imported only when a backend is opened."""

from qualgate.backends.base import (
    BACKENDS,
    Backend,
    Capabilities,
    Generation,
    ScoreResult,
    Session,
    get_backend,
    open_session,
    register_backend,
)
from qualgate.backends.hf import HFBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "Capabilities",
    "Generation",
    "HFBackend",
    "ScoreResult",
    "Session",
    "get_backend",
    "open_session",
    "register_backend",
]
