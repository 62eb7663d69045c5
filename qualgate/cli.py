"""The command layer: parse arguments, call the library, map errors to exit codes.

0 pass, 1 gate failed, 2 bad input or configuration, 3 infrastructure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qualgate import __version__
from qualgate.errors import QualgateError


def _info(args: argparse.Namespace) -> int:
    """What this installation offers: bundled models (with their card), backends and layers."""
    from rich.console import Console
    from rich.table import Table

    from qualgate.backends import BACKENDS
    from qualgate.fixtures import BUNDLED_MODELS, model_card
    from qualgate.layers import LAYER_KINDS, LAYERS

    console = Console(no_color=args.no_color)
    console.print(f"qualgate {__version__}")
    card = model_card()
    models = Table("bundled model", "parameters", "held-out ppl", title="fixture models (qualgate/fixtures)")
    for name in BUNDLED_MODELS:
        entry = card["models"][name]
        models.add_row(f"bundled:{name}", f"{entry['parameters']:,}", f"{entry['heldout_ppl']:.2f}")
    models.add_row("unigram (reference)", "-", f"{card['unigram_heldout_ppl']:.1f}")
    console.print(models)
    layers = Table("kind", "method", "lossless", "parameters (defaults)", title="layers")
    for kind in LAYER_KINDS:
        for method in LAYERS[kind].names():
            cls = LAYERS[kind].get(method)
            defaults = ", ".join(f"{k}={v.default!r}" for k, v in cls.Params.model_fields.items())
            layers.add_row(kind, method, "yes" if cls.lossless else "no", defaults)
    console.print(layers)
    console.print("backends: " + ", ".join(BACKENDS.names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qualgate", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"qualgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="list bundled models, backends and layers")
    info.add_argument("--no-color", action="store_true")
    info.set_defaults(func=_info)
    from qualgate import cli_equivalence, cli_fidelity, cli_run, cli_tracking

    cli_run.add_commands(commands)
    cli_fidelity.add_commands(commands)
    cli_equivalence.add_commands(commands)
    cli_tracking.add_commands(commands)
    return parser


def _quiet_libraries() -> None:
    """Keep the output parseable: libraries' import chatter and weight-loading bars go nowhere."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("torch", "torch.utils._pytree", "torchao", "transformers", "optimum", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # MLflow sets its own logger level at import from this variable (default INFO: migration chatter).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except QualgateError as exc:
        print(f"qualgate: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qualgate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
