"""One error type per kind of failure; the CLI maps them to exit codes.

0 pass, 1 gate failed, 2 bad input or configuration, 3 infrastructure (server, tracking, disk).
"""

from __future__ import annotations


class QualgateError(Exception):
    """Base of every error qualgate raises on purpose. The message is one line meant for a user."""

    exit_code = 2


class ConfigError(QualgateError):
    """Bad input: a pipeline, layer, model path or parameter the user can fix."""

    exit_code = 2


class InfrastructureError(QualgateError):
    """Something outside the user's input failed: a server, the tracking store, the disk."""

    exit_code = 3


class MissingDependencyError(ConfigError):
    """An optional package a chosen backend or layer needs is not installed."""

    def __init__(self, package: str, purpose: str, extra: str | None = None) -> None:
        how = f"pip install 'qualgate[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{purpose} needs the '{package}' package, which is not installed: {how}")
