"""A stack's findings: every gated number its instruments measured, judged by the pipeline's gate.

Each instrument's summary becomes findings here (one per gated metric, with its interval, sample size
and the cause of an undefined value); `gated` applies the thresholds and the inconclusive policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from qualgate.gate import Finding
from qualgate.layers import Layer

# Why a fidelity mean or its interval can be non-finite: what the gate names when it refuses one.
_KL_CAUSE = (
    "a candidate log-probability was -inf or NaN (a token the stack cannot produce, or a numerical overflow), "
    "or fewer than 2 chunks were scored (no interval); check the stack's logits and the golden's max_chunks"
)


def stack_findings(
    gated: Callable[[Finding], Finding],
    fidelity: dict[str, Any] | None,
    equivalence: dict[str, Any] | None,
    benchmarks: dict[str, Any] | None,
    judged: dict[str, Any] | None = None,
    decode: dict[str, Any] | None = None,
    layers: tuple[Layer[Any], ...] = (),
) -> list[Finding]:
    found: list[Finding] = []

    def estimate(instrument: str, metric: str, est: dict[str, Any], n: int | None, unit: str, **kw: Any) -> Finding:
        finding = Finding(
            instrument=instrument,
            metric=metric,
            value=est["value"],
            low=est["low"],
            high=est["high"],
            n=n,
            unit=unit,
            **kw,
        )
        return gated(finding)

    if fidelity is not None:
        s = fidelity["summary"]
        chunks = s.get("n_chunks")
        found.append(estimate("fidelity", "kl_mean", s["kl_mean"], chunks, "chunks", cause=_KL_CAUSE))
        found.append(estimate("fidelity", "ppl_ratio", s["ppl_ratio"], chunks, "chunks", cause=_KL_CAUSE))
        found.append(estimate("fidelity", "same_top1", s["same_top1"], s.get("n_tokens"), "tokens"))
    if decode is not None:
        s = decode["summary"]
        prompts = s.get("prompts")
        found.append(estimate("fidelity", "decode_kl_mean", s["decode_kl_mean"], prompts, "prompts"))
        if s.get("shape") is not None:
            finding = estimate("fidelity", "shape_kl", s["shape"]["shape_kl"], prompts, "prompts")
            if finding.status != "pass":
                # Shape dependence is the KV layer's property: name it, so a lossless layer stacked
                # on it is not blamed for the noise it inherits.
                kv = next((layer.name for layer in layers if layer.kind == "kv_quant"), "the kv_quant layer")
                finding = replace(
                    finding,
                    reason=f"{finding.reason} (KV layer '{kv}': its numbers depend on the block a token is written in)",
                )
            found.append(finding)
    if equivalence is not None:
        s = equivalence["summary"]
        divergences = float(s["real_divergences"])
        counted = Finding(instrument="equivalence", metric="real_divergences", value=divergences, low=None, high=None)
        found.append(gated(counted))
        if s["problems"]:
            found.append(
                Finding(
                    instrument="equivalence",
                    metric="checks",
                    value=float(len(s["problems"])),
                    low=None,
                    high=None,
                    fail=0,
                    status="fail",
                    reason="; ".join(s["problems"]),
                    gated="fail",
                )
            )
    for task in (benchmarks or {}).get("tasks", []):
        if "recovery" in task:
            # No flips at all: the interval is the exact zero-event bound, which narrows as 1/n.
            flipped = task["flips_b"] + task["flips_c"]
            cause = (
                f"baseline accuracy is {task['accuracy_baseline']['value']:g} on {task['n']} documents, so "
                "recovery (candidate / baseline accuracy) is undefined; use a task the baseline can solve"
            )
            found.append(
                estimate(
                    f"benchmarks.{task['task']}",
                    "recovery",
                    task["recovery"],
                    task["n"],
                    "documents",
                    interval="normal" if flipped else "zero-events",
                    cause=cause,
                )
            )
    if judged is not None and "pairwise" in judged:
        pairwise = judged["pairwise"]
        cause = f"{pairwise.get('unparsed', 0)} of {pairwise['n'] + pairwise.get('unparsed', 0)} judgments unparsed"
        finding = estimate("judge", "net_loss", pairwise["net_loss"], pairwise["n"], "prompts", cause=cause)
        validity = judged.get("validity", {"valid": True, "reasons": []})
        if not validity["valid"]:
            # A biased judge's verdict is neither a pass nor a fail: say so, loudly.
            reason = "; ".join(validity["reasons"])
            found.append(replace(finding, status="warn", gated="warn", reason=f"net_loss invalid: {reason}"))
        else:
            found.append(finding)
    return found
