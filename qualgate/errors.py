"""One error type per kind of failure; the CLI maps them to exit codes.

0 pass (or warn), 1 the gate failed, 2 bad input or configuration, 3 infrastructure (a server, the
tracking store, the disk), 4 an internal error (a bug in qualgate: the traceback goes to a log file).
"""

from __future__ import annotations

EXIT_PASS = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INFRASTRUCTURE = 3
EXIT_INTERNAL = 4


class QualgateError(Exception):
    """Base of every error qualgate raises on purpose. The message is one line meant for a user."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(QualgateError):
    """Bad input: a pipeline, layer, model path or parameter the user can fix."""

    exit_code = EXIT_BAD_INPUT


class InfrastructureError(QualgateError):
    """Something outside the user's input failed: a server, the tracking store, the disk."""

    exit_code = EXIT_INFRASTRUCTURE


class MissingDependencyError(ConfigError):
    """An optional package a chosen backend or layer needs is not installed."""

    def __init__(self, package: str, purpose: str, extra: str | None = None) -> None:
        how = f"pip install 'qualgate[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{purpose} needs the '{package}' package, which is not installed: {how}")
