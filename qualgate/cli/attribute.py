"""Where the loss comes from: `qualgate attribute` (a weight quantizer's loss per matrix or decoder
layer, and the fewest to keep at higher precision to pass) and `qualgate kv-sweep` (a KV cache's loss
split between keys and values over a grid of bit widths). Both score in process against the pipeline's
fidelity golden, write their tables and charts to a directory and log them to the pipeline's MLflow
experiment."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qualgate.errors import EXIT_GATE_FAILED, EXIT_PASS, ConfigError

if TYPE_CHECKING:
    from qualgate.config import Pipeline
    from qualgate.instruments.fidelity.instrument import GoldenData
    from qualgate.plan import PlannedStack


@dataclass(frozen=True)
class Setup:
    pipeline: Pipeline
    where: str
    data: GoldenData
    threshold: float
    planned: list[PlannedStack]


def _setup(args: argparse.Namespace) -> Setup:
    """The pipeline, its golden and the KL threshold, everything checked before a model loads."""
    from qualgate.config import load_pipeline
    from qualgate.instruments.fidelity.instrument import Fidelity, load_golden
    from qualgate.preflight import preflight

    where = args.pipeline
    pipeline = load_pipeline(Path(where))
    planned = preflight(pipeline, where).planned
    section = pipeline.config_of(Fidelity)
    if section is None:
        raise ConfigError(f"{where}: {args.command} scores against the fidelity golden; add instruments.fidelity")
    if args.chunks < 2:
        raise ConfigError(f"--chunks {args.chunks}: at least 2 chunks give an interval")
    tiers = pipeline.gate.get("kl_mean")
    threshold = args.threshold if args.threshold is not None else (tiers.warn or tiers.fail if tiers else None)
    if threshold is None:
        raise ConfigError(f"{where}: gate.kl_mean has no warn or fail tier; pass --threshold")
    return Setup(pipeline, where, load_golden(section, pipeline.model, where), threshold, planned)


def _track(args: argparse.Namespace, setup: Setup, kind: str, name: str, **logged: Any) -> None:
    from qualgate.attribution.tracking import log_analysis

    if args.no_tracking:
        return
    run_id = log_analysis(setup.pipeline, args.tracking_uri, kind, name, **logged)
    if run_id:
        print(f"logged to MLflow: run {run_id} ({kind})", file=sys.stderr)


def cmd_attribute(args: argparse.Namespace) -> int:
    from qualgate.attribution import report
    from qualgate.attribution.keep import keep_spec as keep_layer_spec
    from qualgate.attribution.sweep import GoldenSubset, attribute
    from qualgate.attribution.units import find_units
    from qualgate.backends import open_session
    from qualgate.layers import WeightQuantLayer
    from qualgate.layers.mixed import weight_layer
    from qualgate.progress import progress
    from qualgate.stack import build_stack

    setup = _setup(args)
    planned = setup.planned
    # A stack by its name (w4g64+kv-fp8-e4m3) or by the pipeline's layer keys (w4+kv).
    found = [p.stack for p in planned if args.stack in (p.stack.name, "+".join(p.layer_names))]
    if not found:
        names = ", ".join(p.stack.name for p in planned)
        raise ConfigError(f"--stack {args.stack!r}: {setup.where} has no such stack; choose one of: {names}")
    stack = found[0]
    layer = stack.layer("weight_quant")
    if not isinstance(layer, WeightQuantLayer):
        raise ConfigError(
            f"--stack {args.stack!r} has no weight_quant layer; attribution splits a weight quantizer's loss "
            "over the matrices it quantizes"
        )
    layer_spec = {"method": layer.method, **layer.params.model_dump()}
    keep_spec = keep_layer_spec(args.keep, layer_spec, f"--keep {args.keep!r}")
    keep = None if keep_spec is None else weight_layer(keep_spec, "--keep")
    golden = GoldenSubset.of(setup.data, args.chunks)
    out = Path(args.out or f"runs/{setup.pipeline.name}/attribution/{stack.name}")
    # In process on the pipeline's model: the quantizer is simulated the same way whatever engine serves it.
    with open_session(build_stack(setup.pipeline.model)) as session:
        lm_head = bool(getattr(layer.params, "include_lm_head", False))
        count = len(find_units(session.model, lm_head, args.granularity))  # type: ignore[attr-defined]
        print(
            f"attribute {stack.name}: {count} units ({args.granularity}), {len(golden.picks)} chunks", file=sys.stderr
        )
        with progress(f"attribute {stack.name}") as on_unit:
            result = attribute(session, layer, golden, setup.threshold, args.granularity, keep, on_unit)
    result = {"stack": stack.name, "layer_name": layer.name, "layer": layer_spec, **result}
    plan = result["plan"]
    if plan.get("kept"):
        plan["layer"] = report.mixed_layer(layer_spec, keep_spec, plan["kept"])
    written = report.write(out, result)
    print("\n".join(report.markdown(result)))
    print(f"\nwritten: {', '.join(str(p) for p in written)}", file=sys.stderr)
    tables = {"tables/attribution.json": report.units_table(result["units"])}
    metrics = report.headline_metrics(result)
    _track(args, setup, "attribution", f"attribute {stack.name}", tables=tables, files=written, metrics=metrics)
    return EXIT_PASS if plan["found"] and plan["verified"]["passes"] else EXIT_GATE_FAILED


def cmd_kv_sweep(args: argparse.Namespace) -> int:
    import pandas as pd

    from qualgate.attribution import kv_sweep
    from qualgate.attribution.sweep import GoldenSubset
    from qualgate.backends import open_session
    from qualgate.fsio import atomic_write_text
    from qualgate.layers import KVQuantLayer
    from qualgate.progress import progress
    from qualgate.stack import build_stack

    setup = _setup(args)
    try:
        bits = sorted({int(b) for b in args.bits.split(",")})
    except ValueError:
        raise ConfigError(f"--bits {args.bits!r}: give bit widths separated by commas, e.g. 2,3,4,8") from None
    if not bits or bits[0] < 2 or bits[-1] > 8:
        raise ConfigError(f"--bits {args.bits!r}: bit widths must be between 2 and 8")
    others = [layer for layer in setup.pipeline.built_layers(setup.where).values() if isinstance(layer, KVQuantLayer)]
    others = [layer for layer in others if not layer.engines]  # engine-only caches cannot run in process
    golden = GoldenSubset.of(setup.data, args.chunks, block_size=args.block_size)
    out = Path(args.out or f"runs/{setup.pipeline.name}/kv-sweep")
    with open_session(build_stack(setup.pipeline.model)) as session, progress("kv-sweep") as on_cell:
        result = kv_sweep.kv_sweep(session, golden, bits, args.group_size, setup.threshold, others, on_cell)
    out.mkdir(parents=True, exist_ok=True)
    import json

    atomic_write_text(out / "kv_sweep.json", json.dumps(result, indent=2) + "\n")
    kv_sweep.heat_map(result, out / "kv_heat_map.png", f"{setup.pipeline.name}: K x V bits")
    atomic_write_text(out / "kv_sweep.md", "\n".join(kv_sweep.markdown(result, "kv_heat_map.png")) + "\n")
    written = [out / "kv_sweep.json", out / "kv_sweep.md", out / "kv_heat_map.png"]
    print("\n".join(kv_sweep.markdown(result, None)))
    print(f"\nwritten: {', '.join(str(p) for p in written)}", file=sys.stderr)
    table = pd.DataFrame(
        [
            {
                "bits_k": str(c["bits_k"]),
                "bits_v": str(c["bits_v"]),
                "kl_mean": c["kl_mean"]["value"],
                "kl_high": c["kl_mean"]["high"],
                "same_top1": c["same_top1"],
                "storage_bits": c["storage_bits"],
            }
            for c in result["cells"]
        ]
    )
    metrics = {f"kv_sweep/k_only_{r['bits']}": r["k_only"] for r in result["k_vs_v"]}
    metrics.update({f"kv_sweep/v_only_{r['bits']}": r["v_only"] for r in result["k_vs_v"]})
    _track(args, setup, "kv-sweep", "kv-sweep", tables={"tables/kv_sweep.json": table}, files=written, metrics=metrics)
    return EXIT_PASS


def _common(parser: argparse.ArgumentParser, chunks: int, out: str) -> None:
    parser.add_argument("pipeline", help="the pipeline file (its model, stacks, fidelity golden and gate)")
    parser.add_argument(
        "--chunks", type=int, default=chunks, help=f"golden chunks scored per measurement (default {chunks})"
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help="the KL bound to meet (default: the pipeline's gate.kl_mean warn)"
    )
    parser.add_argument("--out", default=None, help=f"output directory (default {out})")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: as `qualgate run`)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def add_commands(commands: Any) -> None:
    attribute = commands.add_parser(
        "attribute",
        help="per-matrix (or per-layer) sensitivity of a stack's weight quantizer, and the fewest matrices "
        "to keep at higher precision to pass",
    )
    _common(attribute, 8, "runs/<pipeline>/attribution/<stack>")
    attribute.add_argument(
        "--stack",
        required=True,
        help="a stack with a weight_quant layer: its name, or its layers' keys joined by + (w4+kv)",
    )
    attribute.add_argument("--granularity", choices=("matrix", "layer"), default="matrix")
    attribute.add_argument(
        "--keep",
        default=None,
        help="the quantizer of kept units: 'full', or changes to the stack's quantizer such as bits=8 "
        "(default: bits=8 when the quantizer has bits, else full)",
    )
    attribute.set_defaults(func=cmd_attribute)
    sweep = commands.add_parser(
        "kv-sweep", help="a KV cache's loss split between keys and values over a grid of bit widths (heat map)"
    )
    _common(sweep, 4, "runs/<pipeline>/kv-sweep")
    sweep.add_argument("--bits", default="2,3,4,8", help="bit widths for keys and values (default 2,3,4,8)")
    sweep.add_argument("--group-size", type=int, default=32, help="channels per quantization group (default 32)")
    sweep.add_argument("--block-size", type=int, default=32, help="tokens fed through the cache at a time (default 32)")
    sweep.set_defaults(func=cmd_kv_sweep)
