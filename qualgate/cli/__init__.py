"""The command layer: parse arguments, call the library, map errors to exit codes.

0 pass or warn, 1 the gate failed, 2 bad input or configuration, 3 infrastructure (server, tracking
store, disk), 4 internal error (a bug: the traceback is written to a log file, never to the terminal).
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from qualgate.errors import EXIT_INTERNAL, QualgateError
from qualgate.redact import cap
from qualgate.version import __version__

MESSAGE_LIMIT = 1000  # characters of an error line; echoed input inside it is capped at 200


class _Parser(argparse.ArgumentParser):
    """argparse with its usage error on one line (exit 2, like every other input mistake)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qualgate",
        description="Measure what an inference optimization stack (quantized weights, a quantized KV cache, "
        "speculative decoding, prefix caching) costs in quality against the unoptimized model, and gate it.",
        epilog="exit codes: 0 pass or warn, 1 the gate failed, 2 bad input (fix the named file or field), "
        "3 infrastructure (disk, server, tracking store), 4 internal error (traceback in a log file). "
        "Start with: qualgate run (the bundled demo), qualgate validate PIPELINE.",
    )
    parser.add_argument("--version", action="version", version=f"qualgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    from qualgate.cli import attribute, equivalence, fidelity, info, run, tracking

    info.add_commands(commands)
    run.add_commands(commands)
    fidelity.add_commands(commands)
    equivalence.add_commands(commands)
    tracking.add_commands(commands)
    attribute.add_commands(commands)
    return parser


def _quiet_libraries() -> None:
    """Keep the output parseable: libraries' import chatter and weight-loading bars go nowhere."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("torch", "torch.utils._pytree", "torchao", "transformers", "optimum", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # MLflow sets its own logger level at import from this variable (default INFO: migration chatter).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # transformers 5.x renames a forward() argument and says so on every call: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)


def _crash_log(args: argparse.Namespace, exc: BaseException) -> Path | None:
    """Write the traceback of an unexpected error under the run directory (else the temp directory)."""
    import os
    import tempfile
    import time
    import traceback

    run_dir = getattr(args, "log_dir", None) or getattr(args, "run_dir", None)
    places = ([Path(run_dir) / "logs"] if run_dir else []) + [Path(tempfile.gettempdir())]
    name = f"qualgate-internal-error-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    text = f"qualgate {__version__}\ncommand: {args.command}\n" + "".join(traceback.format_exception(exc))
    for place in places:
        try:
            place.mkdir(parents=True, exist_ok=True)
            (place / name).write_text(text, encoding="utf-8")
            return place / name
        except OSError:
            continue
    return None


def _environment_fault(exc: BaseException) -> QualgateError | None:
    """An error the machine raised (full disk, refused write, lost connection, no memory): exit 3."""
    from qualgate.errors import InfrastructureError
    from qualgate.fsio import write_failure

    if isinstance(exc, MemoryError):
        return InfrastructureError("out of memory; use a smaller model or batch, or a machine with more RAM")
    if isinstance(exc, ConnectionError | TimeoutError):
        return InfrastructureError(f"connection failed ({exc}); check the server and rerun: finished work is kept")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
        return write_failure(Path(exc.filename or "."), exc)
    return None


def _say(message: str) -> None:
    """One line on stderr, however the message was built (CI logs are read line by line)."""
    print(cap(" ".join(message.split()), MESSAGE_LIMIT), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except QualgateError as exc:
        _say(f"qualgate: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say("qualgate: interrupted")
        return 130
    except Exception as exc:
        fault = _environment_fault(exc)
        if fault is not None:
            _say(f"qualgate: error: {fault}")
            return fault.exit_code
        log = _crash_log(args, exc)
        where = f"the traceback is in {log}" if log else "no log could be written"
        _say(
            f"qualgate: internal error ({exc.__class__.__name__}: {cap(str(exc), 200)}); an unexpected failure "
            f"(a bug in qualgate or in a plug-in), not a verdict: {where}; please report it with that file"
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
