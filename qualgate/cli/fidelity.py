"""Commands of the fidelity instrument: golden record / verify / noise-floor, and `fidelity`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from qualgate import golden, golden_record, noise_floor
from qualgate.backends import open_session
from qualgate.errors import ConfigError
from qualgate.instruments.fidelity import (
    TAIL_SAMPLES,
    FidelityConfig,
    FidelityResult,
    compare_scored,
    iter_scores,
)
from qualgate.models import ModelSpec
from qualgate.progress import progress
from qualgate.stack import build_stack
from qualgate.validation import validate

DEFAULT_TEXT = "evals/domain/cpython_docs_heldout.txt"


def parse_layer(text: str) -> dict[str, Any]:
    """`kind=weight_quant,method=rtn,bits=4` (values parsed as YAML scalars) or a JSON object."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--layer {text!r} is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"--layer {text!r} must be a JSON object")
        return value
    layer: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key:
            raise ConfigError(f"--layer {text!r}: '{part}' is not key=value (e.g. kind=weight_quant,method=rtn,bits=4)")
        layer[key.strip()] = yaml.safe_load(raw)
    return layer


def cmd_record(args: argparse.Namespace) -> int:
    config = FidelityConfig.model_validate(
        {
            "mode": args.mode,
            "n_ctx": args.n_ctx,
            "top_k": args.top_k,
            "max_chunks": args.max_chunks,
            "tail_samples": args.tail_samples,
        }
    )
    text = golden.read_text_file(args.text)
    spec = validate(
        ModelSpec,
        {"path": args.model, "dtype": args.dtype, "device": args.device, "device_map": args.device_map},
        "golden record",
    )
    stack = build_stack(spec)
    stack.model.torch_device()  # a device this machine does not have: exit 2 before the model loads
    with open_session(stack) as session, progress("golden record") as on_chunk:
        manifest = golden_record.record(session, text, config, Path(args.out), text_source=args.text, on_chunk=on_chunk)
    print(
        f"recorded {args.out}: {manifest.n_tokens} tokens in {manifest.n_chunks} chunks, "
        f"ppl {manifest.ppl:.4f}, {manifest.bytes_per_token:.1f} bytes/token "
        f"({manifest.tail_sample_bytes_per_token:.1f} of them the tail sample)"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    golden_dir = Path(args.golden)
    manifest = golden.read_manifest(golden_dir)
    with open_session(build_stack(manifest.baseline_model())) as session:
        report = golden.verify(
            golden_dir,
            session,
            golden.domain_text(golden_dir, manifest, args.text),
            manifest.fidelity_config(),
            sample_chunks=args.sample_chunks,
            tolerance=args.tolerance,
        )
    print(json.dumps(report, indent=2))
    if report["drifted"]:
        print(
            f"qualgate: golden {golden_dir} drifted: max |dlogprob| {report['max_abs_logprob_diff']:.3g} > "
            f"{args.tolerance:g}; re-record it",
            file=sys.stderr,
        )
        return 1
    return 0


def _compare_with_golden(
    golden_dir: Path,
    text: str,
    candidate: ModelSpec,
    layers: list[dict[str, Any]],
    config: FidelityConfig,
    label: str,
) -> FidelityResult:
    manifest = golden.read_manifest(golden_dir)
    chunks, reference = golden.open_reference(golden_dir, manifest.baseline_model(), text, config)
    with (
        open_session(build_stack(candidate, layers)) as session,
        progress(label) as on_chunk,
        reference.rows() as rows,
    ):
        return compare_scored(iter_scores(session, chunks, config, rows, on_chunk))


def cmd_noise_floor(args: argparse.Namespace) -> int:
    golden_dir = Path(args.golden)
    manifest = golden.read_manifest(golden_dir)
    if args.block_size is None and args.dtype is None:
        raise ConfigError("noise-floor needs another way to run the baseline: --block-size N and/or --dtype D")
    model = manifest.baseline_model(args.dtype)
    config = manifest.fidelity_config(block_size=args.block_size)
    text = golden.domain_text(golden_dir, manifest, args.text)
    result = _compare_with_golden(golden_dir, text, model, [], config, "noise floor")
    variant = {"block_size": args.block_size, "dtype": model.dtype}
    path = noise_floor.save(golden_dir, variant, result.summary)
    print_summary(result.summary, f"noise floor ({variant})")
    print(f"recorded in {path}")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    golden_dir = Path(args.golden)
    manifest = golden.read_manifest(golden_dir)
    config = manifest.fidelity_config(block_size=args.block_size)
    model = manifest.baseline_model()
    layers = [parse_layer(text) for text in args.layer]
    text = golden.domain_text(golden_dir, manifest, args.text)
    result = _compare_with_golden(golden_dir, text, model, layers, config, "fidelity")
    print_summary(result.summary, build_stack(model, layers).name)
    if args.json:
        Path(args.json).write_text(json.dumps(result.summary, indent=2) + "\n", encoding="utf-8")
    if args.per_token:
        write_per_token(result, Path(args.per_token))
    return 0


def write_per_token(result: FidelityResult, path: Path) -> None:
    """One CSV row per scored token, for drill-down (which tokens moved, and where)."""
    import csv

    columns = list(result.per_token)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows(zip(*(result.per_token[c].tolist() for c in columns), strict=True))


def print_summary(summary: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", "95% interval", title=f"fidelity: {title}")
    ratio, kl, top1 = summary["ppl_ratio"], summary["kl_mean"], summary["same_top1"]
    table.add_row(
        "PPL (reference -> candidate)", f"{summary['ppl_reference']:.4f} -> {summary['ppl_candidate']:.4f}", ""
    )
    table.add_row("PPL ratio", f"{ratio['value']:.5f}", f"[{ratio['low']:.5f}, {ratio['high']:.5f}]")
    estimator = summary.get("kl_estimator", {}).get("kind", "bound")
    table.add_row(f"mean KL(P||Q) ({estimator})", f"{kl['value']:.4g}", f"[{kl['low']:.4g}, {kl['high']:.4g}]")
    if estimator != "bound":
        bound = summary["kl_bound"]
        table.add_row("  lower bound (top-k + tail bucket)", f"{bound['value']:.4g}", "")
    table.add_row(
        "KL p99 / max", f"{summary['kl_percentiles']['p99']:.4g} / {summary['kl_percentiles']['max']:.4g}", ""
    )
    table.add_row("same top-1", f"{top1['value']:.2%}", f"[{top1['low']:.2%}, {top1['high']:.2%}]")
    table.add_row("RMS dp", f"{summary['dp_rms']:.5f}", "")
    table.add_row("NLL correlation", f"{summary['nll_correlation']:.5f}", "")
    table.add_row(
        "tokens / top-k / block",
        f"{summary['n_tokens']} / {summary['top_k']} / {summary['block_size']['candidate']}",
        "",
    )
    Console(width=100).print(table)


def add_commands(commands: Any) -> None:
    gold = commands.add_parser("golden", help="record, verify or measure the noise floor of a golden baseline")
    sub = gold.add_subparsers(dest="golden_command", required=True)
    rec = sub.add_parser("record", help="score the baseline on domain text and store it")
    rec.add_argument("--out", required=True, help="golden directory to write (e.g. golden/my-model)")
    rec.add_argument("--model", default="bundled:target")
    rec.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    rec.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    rec.add_argument(
        "--device-map", default=None, choices=["auto"], help="auto: spread a model too large for one GPU over all"
    )
    rec.add_argument(
        "--text",
        default=DEFAULT_TEXT,
        help="a UTF-8 file, or a dataset in the local datasets cache: dataset:NAME:CONFIG:SPLIT:FIELD "
        "(e.g. dataset:wikitext:wikitext-2-raw-v1:test:text)",
    )
    rec.add_argument("--mode", default="llamacpp", choices=["llamacpp", "rolling"])
    rec.add_argument("--n-ctx", type=int, default=512)
    rec.add_argument("--top-k", type=int, default=64)
    rec.add_argument("--max-chunks", type=int, default=None)
    rec.add_argument(
        "--tail-samples",
        type=int,
        default=TAIL_SAMPLES,
        help="ids per token drawn from the baseline's distribution outside its top-k, for an unbiased KL "
        f"estimate (default {TAIL_SAMPLES}; 0 keeps only the top-k + tail-bucket lower bound)",
    )
    rec.set_defaults(func=cmd_record)
    ver = sub.add_parser("verify", help="re-score a sample of the golden chunks and report drift")
    ver.add_argument("golden")
    ver.add_argument("--text", default=None, help="the domain text (default: the path in the manifest)")
    ver.add_argument("--sample-chunks", type=int, default=4)
    ver.add_argument("--tolerance", type=float, default=1e-4, help="max |dlogprob| before it counts as drift")
    ver.set_defaults(func=cmd_verify)
    floor = sub.add_parser("noise-floor", help="the baseline against its golden, run another way")
    floor.add_argument("golden")
    floor.add_argument("--text", default=None)
    floor.add_argument("--block-size", type=int, default=None)
    floor.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    floor.set_defaults(func=cmd_noise_floor)
    fid = commands.add_parser("fidelity", help="compare a stack with a golden baseline (PPL ratio, KL, top-1)")
    fid.add_argument("golden")
    fid.add_argument(
        "--layer",
        action="append",
        default=[],
        help="a layer, in order: kind=weight_quant,method=rtn,bits=4 (repeatable)",
    )
    fid.add_argument("--text", default=None)
    fid.add_argument("--block-size", type=int, default=None)
    fid.add_argument("--json", default=None, help="also write the summary to this file")
    fid.add_argument("--per-token", default=None, help="also write one CSV row per scored token to this file")
    fid.set_defaults(func=cmd_fidelity)
