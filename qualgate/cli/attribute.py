"""`qualgate attribute PIPELINE --stack NAME`: where a stack's weight-quantization loss comes from, and
the fewest matrices (or decoder layers) to keep at higher precision to pass."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qualgate.errors import EXIT_GATE_FAILED, EXIT_PASS, ConfigError


def _keep_spec(text: str, layer_spec: dict[str, Any]) -> dict[str, Any] | None:
    """`--keep full` (no quantization), `--keep bits=8` (the stack's quantizer with these parameters
    changed) or `--keep method=torchao,bits=8` (another quantizer)."""
    from qualgate.cli.fidelity import parse_layer

    if text.strip().lower() in ("full", "none", "fp", "full-precision"):
        return None
    changes = parse_layer(text)
    if "kind" in changes:
        raise ConfigError(f"--keep {text!r}: give a weight quantizer's parameters (method=..., bits=...), not kind")
    base = {} if "method" in changes and changes["method"] != layer_spec["method"] else dict(layer_spec)
    return {**base, **changes}


def _default_keep(layer_spec: dict[str, Any]) -> dict[str, Any] | None:
    """The stack's own quantizer at 8 bits when it has a `bits` parameter, else full precision."""
    return {**layer_spec, "bits": 8} if "bits" in layer_spec else None


def cmd_attribute(args: argparse.Namespace) -> int:
    from qualgate.attribution import report
    from qualgate.attribution.sweep import GoldenSubset, attribute, spread
    from qualgate.attribution.units import find_units
    from qualgate.backends import open_session
    from qualgate.config import load_pipeline
    from qualgate.instruments.fidelity.instrument import Fidelity, load_golden
    from qualgate.layers import WeightQuantLayer
    from qualgate.layers.mixed import weight_layer
    from qualgate.preflight import preflight
    from qualgate.progress import progress
    from qualgate.stack import build_stack

    where = args.pipeline
    pipeline = load_pipeline(Path(where))
    planned = preflight(pipeline, where).planned
    # A stack by its name (w4g64+kv-fp8-e4m3) or by the pipeline's layer keys (w4+kv).
    found = [p.stack for p in planned if args.stack in (p.stack.name, "+".join(p.layer_names))]
    if not found:
        names = ", ".join(p.stack.name for p in planned)
        raise ConfigError(f"--stack {args.stack!r}: {where} has no such stack; choose one of: {names}")
    stack = found[0]
    layer = stack.layer("weight_quant")
    if not isinstance(layer, WeightQuantLayer):
        raise ConfigError(
            f"--stack {args.stack!r} has no weight_quant layer; attribution splits a weight quantizer's loss "
            "over the matrices it quantizes"
        )
    section = pipeline.config_of(Fidelity)
    if section is None:
        raise ConfigError(f"{where}: attribution scores against the fidelity golden; add instruments.fidelity.golden")
    layer_spec = {"method": layer.method, **layer.params.model_dump()}
    keep_spec = _default_keep(layer_spec) if args.keep is None else _keep_spec(args.keep, layer_spec)
    keep = None if keep_spec is None else weight_layer(keep_spec, "--keep")
    tiers = pipeline.gate.get("kl_mean")
    threshold = args.threshold if args.threshold is not None else (tiers.warn or tiers.fail if tiers else None)
    if threshold is None:
        raise ConfigError(f"{where}: gate.kl_mean has no warn or fail tier; pass --threshold")
    data = load_golden(section, pipeline.model, where)
    if args.chunks < 2:
        raise ConfigError(f"--chunks {args.chunks}: at least 2 chunks give an interval")
    with data.reference.rows() as rows:
        reference = rows.take(data.reference.n)
    golden = GoldenSubset(data.config, data.chunks, reference, spread(len(data.chunks), args.chunks))
    out = Path(args.out or f"runs/{pipeline.name}/attribution/{stack.name}")
    # In process on the pipeline's model: the quantizer is simulated the same way whatever engine serves it.
    with open_session(build_stack(pipeline.model)) as session:
        count = len(find_units(session.model, bool(getattr(layer.params, "include_lm_head", False)), args.granularity))  # type: ignore[attr-defined]
        print(
            f"attribute {stack.name}: {count} units ({args.granularity}), {len(golden.picks)} chunks", file=sys.stderr
        )
        with progress(f"attribute {stack.name}") as on_unit:
            result = attribute(session, layer, golden, threshold, args.granularity, keep, on_unit)
    result = {"stack": stack.name, "layer_name": layer.name, "layer": layer_spec, **result}
    if result["plan"].get("kept"):
        result["plan"]["layer"] = report.mixed_layer(layer_spec, keep_spec, result["plan"]["kept"])
    written = report.write(out, result)
    print("\n".join(report.markdown(result)))
    print(f"\nwritten: {', '.join(str(p) for p in written)}", file=sys.stderr)
    plan = result["plan"]
    return EXIT_PASS if plan["found"] and plan["verified"]["passes"] else EXIT_GATE_FAILED


def add_commands(commands: Any) -> None:
    attribute = commands.add_parser(
        "attribute",
        help="per-matrix (or per-layer) sensitivity of a stack's weight quantizer, and the fewest matrices "
        "to keep at higher precision to pass",
    )
    attribute.add_argument("pipeline", help="the pipeline file (its model, stacks, fidelity golden and gate)")
    attribute.add_argument(
        "--stack",
        required=True,
        help="a stack with a weight_quant layer: its name, or its layers' keys joined by + (w4+kv)",
    )
    attribute.add_argument("--granularity", choices=("matrix", "layer"), default="matrix")
    attribute.add_argument("--chunks", type=int, default=8, help="golden chunks scored per unit (default 8)")
    attribute.add_argument(
        "--keep",
        default=None,
        help="the quantizer of kept units: 'full', or changes to the stack's quantizer such as bits=8 "
        "(default: bits=8 when the quantizer has bits, else full)",
    )
    attribute.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="KL the plan must bring the upper bound under (default: gate.kl_mean warn)",
    )
    attribute.add_argument("--out", default=None, help="output directory (default runs/<pipeline>/attribution/<stack>)")
    attribute.set_defaults(func=cmd_attribute)
