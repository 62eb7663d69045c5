"""qualgate: quality evaluation and regression gating for LLM inference optimization stacks."""

from qualgate.backends import Backend, Generation, ScoreResult, Session, get_backend, open_session
from qualgate.errors import ConfigError, InfrastructureError, QualgateError
from qualgate.layers import Layer, build_layer, register_layer
from qualgate.models import ModelSpec
from qualgate.stack import Stack, build_stack

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "ConfigError",
    "Generation",
    "InfrastructureError",
    "Layer",
    "ModelSpec",
    "QualgateError",
    "ScoreResult",
    "Session",
    "Stack",
    "__version__",
    "build_layer",
    "build_stack",
    "get_backend",
    "open_session",
    "register_layer",
]
