"""The `equivalence` command: do a stack's speculation / prefix-cache layers keep greedy output?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qualgate.backends import open_session
from qualgate.cli_fidelity import parse_layer
from qualgate.instruments.equivalence import (
    EquivalenceConfig,
    EquivalenceResult,
    load_prompts,
    reference_stack,
    run_equivalence,
)
from qualgate.models import ModelSpec
from qualgate.stack import build_stack

DEFAULT_PROMPTS = ["evals/prompts/general.jsonl", "evals/prompts/shared_prefix.jsonl", "evals/prompts/repetitive.jsonl"]


def cmd_equivalence(args: argparse.Namespace) -> int:
    stack = build_stack(ModelSpec(path=args.model, dtype=args.dtype), [parse_layer(t) for t in args.layer])
    reference = reference_stack(stack)
    prompts = [p for path in (args.prompts or DEFAULT_PROMPTS) for p in load_prompts(Path(path))]
    config = EquivalenceConfig.model_validate({"max_new_tokens": args.max_new_tokens, "eps": args.eps})
    with open_session(stack) as candidate, open_session(reference) as ref:
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
    drift = result.max_prefix_logprob_diff
    console.print(
        f"max |dlogprob| on shared prefixes: {drift:.3g} (tolerance {result.logprob_tolerance:g})"
        if drift is not None
        else "max |dlogprob| on shared prefixes: not measured (the endpoint returns no generated-token logprobs)"
    )
    for kind, stats in result.layer_stats.items():
        console.print(f"{kind}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))
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
    eq.add_argument("--max-new-tokens", type=int, default=48)
    eq.add_argument("--eps", type=float, default=0.125, help="top-2 margin (nats) of a near-tie")
    eq.add_argument("--json", default=None, help="also write the result (with every divergence) here")
    eq.set_defaults(func=cmd_equivalence)
