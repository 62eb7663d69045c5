"""`qualgate info`: what this installation offers."""

from __future__ import annotations

import argparse
from typing import Any

from qualgate.version import __version__


def cmd_info(args: argparse.Namespace) -> int:
    """What this installation offers: bundled models (with their card), layers, backends and instruments."""
    from rich.console import Console
    from rich.table import Table

    from qualgate.backends import BACKENDS
    from qualgate.fixtures import BUNDLED_MODELS, model_card
    from qualgate.instruments import INSTRUMENTS
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
    instruments = Table("instrument", "section", "gated metrics (bigger is worse?)", title="instruments")
    for name, instrument in INSTRUMENTS.entries():
        gated = ", ".join(f"{m} ({'yes' if worse else 'no'})" for m, worse in instrument.metrics.items())
        instruments.add_row(name, instrument.section_key(), gated or "-")
    console.print(instruments)
    return 0


def add_commands(commands: Any) -> None:
    info = commands.add_parser("info", help="list bundled models, layers, backends and instruments")
    info.add_argument("--no-color", action="store_true")
    info.set_defaults(func=cmd_info)
