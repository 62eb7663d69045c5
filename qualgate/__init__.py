"""qualgate: quality evaluation and regression gating for LLM inference optimization stacks."""

from qualgate.backends import Backend, Generation, ScoreResult, Session, get_backend, open_session
from qualgate.errors import ConfigError, InfrastructureError, QualgateError
from qualgate.gate import Finding
from qualgate.instruments import Instrument, register_instrument
from qualgate.layers import Layer, build_layer, register_layer
from qualgate.models import ModelSpec
from qualgate.run.context import RunContext
from qualgate.stack import Stack, build_stack
from qualgate.version import __version__

__all__ = [
    "Backend",
    "ConfigError",
    "Finding",
    "Generation",
    "InfrastructureError",
    "Instrument",
    "Layer",
    "ModelSpec",
    "QualgateError",
    "RunContext",
    "ScoreResult",
    "Session",
    "Stack",
    "__version__",
    "build_layer",
    "build_stack",
    "get_backend",
    "open_session",
    "register_instrument",
    "register_layer",
]
