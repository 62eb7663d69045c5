"""The `equivalence` command: do a stack's speculation / prefix-cache layers keep greedy output?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qualgate.backends import open_session
from qualgate.cli.fidelity import parse_layer
from qualgate.golden import read_text_file
from qualgate.instruments.equivalence import (
    EquivalenceConfig,
    EquivalenceResult,
    load_prompts,
    prefix_probes,
    reference_stack,
    run_equivalence,
    speculation_probes,
)
from qualgate.models import ModelSpec
from qualgate.stack import build_stack

DEFAULT_PROBE_TEXT = "evals/domain/cpython_docs_heldout.txt"
DEFAULT_PROMPTS = ["evals/prompts/general.jsonl", "evals/prompts/shared_prefix.jsonl", "evals/prompts/repetitive.jsonl"]


def cmd_equivalence(args: argparse.Namespace) -> int:
    stack = build_stack(ModelSpec(path=args.model, dtype=args.dtype), [parse_layer(t) for t in args.layer])
    reference = reference_stack(stack)
    prompts = [p for path in (args.prompts or DEFAULT_PROMPTS) for p in load_prompts(Path(path))]
    config = EquivalenceConfig.model_validate(
        {"max_new_tokens": args.max_new_tokens, "eps": args.eps, "logprob_tolerance": args.logprob_tolerance}
    )
    with open_session(stack) as candidate, open_session(reference) as ref:
        if args.probe_text != "none":
            text_ids = ref.encode(read_text_file(args.probe_text), add_bos=False)
            prefix = stack.layer("prefix_cache")
            if prefix is not None:
                block = int(getattr(prefix.params, "block_size", 16))
                prompts += prefix_probes(text_ids, ref.bos_token_id, block)
            if stack.layer("speculation") is not None:
                prompts += speculation_probes(text_ids, ref.bos_token_id)
        result = run_equivalence(candidate, ref, prompts, config)
    print_result(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
    return 0 if result.passed else 1


def print_result(result: EquivalenceResult) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = result.summary()
    console = Console(width=120)
    verdict = "PASS" if result.passed else "FAIL"
    console.print(
        f"equivalence {verdict}: {result.candidate} against {result.reference}: "
        f"{summary['exact_match_rate']:.1%} exact over {result.samples} samples, "
        f"{result.real_divergences} real divergences, {result.near_ties} near-ties (eps {result.eps:g})"
    )
    drift = result.drift
    tol = result.tolerance
    noise = (tol.get("noise_floor") or {}).get("logprob_delta")
    if noise is not None:
        console.print(
            f"noise floor of {result.reference} in the candidate's shapes: |dlogprob| p50 {noise['p50']:.3g}, "
            f"p99.9 {noise['p99.9']:.3g}, max {noise['max']:.3g}"
        )
    console.print(f"tolerance {result.logprob_tolerance:.3g} ({tol.get('source', 'pipeline')})")
    console.print(
        f"|dlogprob| on shared prefixes: p50 {drift['p50']:.3g}, p99 {drift['p99']:.3g}, max {drift['max']:.3g}"
        if drift is not None
        else "|dlogprob| on shared prefixes: not measured (the endpoint returns no generated-token logprobs)"
    )
    for kind, stats in result.layer_stats.items():
        console.print(f"{kind}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))
    if result.coverage:
        console.print(
            f"prefix coverage: {result.coverage['crossed_differing_block']} of {result.coverage['lookups']} lookups "
            "crossed a differing token inside a reusable block"
        )
    for group, stats in result.groups.items():
        rate = f", acceptance {stats['acceptance_rate']:.3f}" if "acceptance_rate" in stats else ""
        console.print(
            f"group {group}: {stats['samples']} samples, {stats['real_divergences']} real, "
            f"{stats['near_ties']} near-ties{rate}"
        )
    for problem in result.problems:
        console.print(f"problem: {problem}")
    if result.divergences:
        table = Table("prompt", "run", "pos", "reference", "candidate", "margin", "rank", "kind")
        for d in result.divergences:
            table.add_row(
                d.prompt_id,
                d.run,
                str(d.position),
                f"{d.reference_text!r} ({d.reference_token})",
                f"{d.candidate_text!r} ({d.candidate_token})",
                "-" if d.margin is None else f"{d.margin:.3f}",
                str(d.candidate_rank or "-"),
                d.kind,
            )
        console.print(table)


def add_commands(commands: Any) -> None:
    eq = commands.add_parser("equivalence", help="greedy token identity of speculation / prefix caching")
    eq.add_argument(
        "--layer",
        action="append",
        default=[],
        help="a layer of the stack, in order: kind=speculation,method=ngram (repeatable)",
    )
    eq.add_argument("--model", default="bundled:target")
    eq.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    eq.add_argument("--prompts", action="append", default=None, help="JSONL prompt set (repeatable)")
    eq.add_argument("--max-new-tokens", type=int, default=EquivalenceConfig.model_fields["max_new_tokens"].default)
    eq.add_argument("--eps", type=float, default=0.125, help="top-2 margin (nats) of a near-tie")
    eq.add_argument(
        "--logprob-tolerance",
        type=float,
        default=None,
        help="shared-prefix |dlogprob| allowed (default: calibrated from the reference's noise floor)",
    )
    eq.add_argument(
        "--probe-text",
        default=DEFAULT_PROBE_TEXT,
        help="domain text to cut prefix-cache and speculation probes from ('none': prompt files only)",
    )
    eq.add_argument("--json", default=None, help="also write the result (with every divergence) here")
    eq.set_defaults(func=cmd_equivalence)
