"""Judge a candidate stack's answers against the baseline's on the domain prompt set."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qualgate.backends.base import Session
from qualgate.chat import prompt_source
from qualgate.instruments.judge import protocols
from qualgate.instruments.judge.client import JudgeClient
from qualgate.instruments.judge.config import JudgeConfig
from qualgate.instruments.judge.stats import combine, grade_summary, pairwise_summary
from qualgate.jsonl import prompt_id, read_prompt_rows


@dataclass(frozen=True)
class JudgePrompt:
    id: str
    prompt: str
    reference: str | None = None


def load_prompts(path: Path) -> list[JudgePrompt]:
    """JSONL: `id`, `prompt` and an optional `reference` answer per line."""
    return [
        JudgePrompt(prompt_id(path, n, row), row["prompt"], row.get("reference"))
        for n, row in read_prompt_rows(path, "judge prompts")
    ]


def answers(session: Session, prompts: list[JudgePrompt], max_tokens: int, chat: bool = False) -> list[str]:
    """Greedy answers of one stack (the judge compares text; generation goes through every layer)."""
    sources = [prompt_source(session, p.prompt, chat) for p in prompts]
    return [g.text for g in session.generate(sources, max_new_tokens=max_tokens, top_k=1)]


def nonce(*parts: str) -> str:
    """Per-request fence marker: deterministic (so judgments cache), unknowable to the answers."""
    return "QG" + hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]


def _pairwise_outcomes(
    client: JudgeClient,
    prompts: list[JudgePrompt],
    base: list[str],
    cand: list[str],
    progress: Any,
    log: list[dict[str, Any]],
    protocol: str = "pairwise",
) -> list[tuple[str, bool]]:
    requests = []
    for p, a, b in zip(prompts, base, cand, strict=True):
        marker = nonce(p.prompt, a, b)
        requests += [protocols.pairwise(p.prompt, a, b, marker), protocols.pairwise(p.prompt, b, a, marker)]
    verdicts = client.judge_all(requests, progress)
    for i, p in enumerate(prompts):
        for order, first, second in ((0, base[i], cand[i]), (1, cand[i], base[i])):
            found = verdicts[2 * i + order]
            log.append(
                {
                    "protocol": protocol,
                    "id": p.id,
                    "prompt": p.prompt,
                    "answer_a": first,
                    "answer_b": second,
                    "order": "baseline first" if order == 0 else "candidate first",
                    "verdict": found["verdict"],
                    "reply": found["reply"],
                }
            )
    return [combine(verdicts[2 * i]["verdict"], verdicts[2 * i + 1]["verdict"]) for i in range(len(prompts))]


def _grades(
    client: JudgeClient,
    prompts: list[JudgePrompt],
    texts: list[str],
    kind: str,
    progress: Any,
    log: list[dict[str, Any]],
    side: str,
) -> list[Any]:
    if kind == "single":
        requests = [protocols.single(p.prompt, t, nonce(p.prompt, t)) for p, t in zip(prompts, texts, strict=True)]
    else:
        requests = [
            protocols.reference(p.prompt, t, p.reference or "", nonce(p.prompt, t, p.reference or ""))
            for p, t in zip(prompts, texts, strict=True)
        ]
    found = client.judge_all(requests, progress)
    for p, text, r in zip(prompts, texts, found, strict=True):
        log.append(
            {"protocol": kind, "id": p.id, "prompt": p.prompt, "answer_a": text, "answer_b": None, "order": side,
             "verdict": r["verdict"], "reply": r["reply"]}
        )  # fmt: skip
    return [r["verdict"] for r in found]


def run_judge(
    config: JudgeConfig,
    client: JudgeClient,
    prompts: list[JudgePrompt],
    baseline: list[str],
    candidate: list[str],
    on_progress: Callable[[str], Callable[[int, int], None]] | None = None,
) -> dict[str, Any]:
    def bar(phase: str) -> Callable[[int, int], None] | None:
        """One progress bar per phase (a bar closes when it reaches its total)."""
        return on_progress(phase) if on_progress else None

    summary: dict[str, Any] = {"judge": {k: v for k, v in client.identity.items()}, "n_prompts": len(prompts)}
    seed = config.seed
    # Every judgment (prompt, both answers, order, verdict, the judge's reply): the MLflow table.
    log: list[dict[str, Any]] = []
    if "pairwise" in config.protocols:
        outcomes = _pairwise_outcomes(client, prompts, baseline, candidate, bar("pairwise"), log)
        deltas = [len(c) - len(b) for b, c in zip(baseline, candidate, strict=True)]
        summary["pairwise"] = pairwise_summary(outcomes, deltas, config.bootstrap, seed).as_dict()
        summary["per_prompt"] = [
            {"id": p.id, "outcome": o, "consistent": c, "baseline": b[:200], "candidate": a[:200]}
            for p, (o, c), b, a in zip(prompts, outcomes, baseline, candidate, strict=True)
        ]
    for kind in ("single", "reference"):
        if kind not in config.protocols:
            continue
        chosen = [i for i, p in enumerate(prompts) if kind == "single" or p.reference]
        if not chosen:
            continue
        subset = [prompts[i] for i in chosen]
        base = _grades(client, subset, [baseline[i] for i in chosen], kind, bar(f"{kind} baseline"), log, "baseline")
        cand = _grades(client, subset, [candidate[i] for i in chosen], kind, bar(f"{kind} candidate"), log, "candidate")
        summary[kind] = grade_summary(base, cand, config.bootstrap, seed)
    if config.control:
        control = _pairwise_outcomes(client, prompts, baseline, baseline, bar("control"), log, "control")
        result = pairwise_summary(control, [0] * len(control), config.bootstrap, seed + 1)
        net = result.net_loss
        valid = not (net.low > 0 or net.high < 0)
        summary["control"] = {
            **result.as_dict(),
            "valid": valid,
            "reason": "baseline against itself comes out even"
            if valid
            else f"baseline against itself: net loss {net.value:.3g} [{net.low:.3g}, {net.high:.3g}] excludes 0",
        }
    summary["unparseable"] = client.unparseable
    summary["validity"] = validity(config, summary)
    summary["judgments"] = log
    return summary


def validity(config: JudgeConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Whether the judge measured the answers at all. A judge that mostly follows the position turns
    every verdict into a tie and would 'pass' any stack; an uneven control or many unparseable
    verdicts likewise void the finding (reported as invalid, never as pass or fail)."""
    reasons = []
    control = summary.get("control")
    if control is not None and not control["valid"]:
        reasons.append(control["reason"])
    pairwise = summary.get("pairwise")
    if pairwise is not None:
        consistency = pairwise["position_consistency"]
        if not consistency >= config.min_consistency:  # NaN (nothing parsed) is invalid too
            reasons.append(
                f"position consistency {consistency:.2f} < {config.min_consistency:g}: the verdicts follow the order"
            )
        asked = pairwise["n"] + pairwise["unparsed"]
        if asked and pairwise["unparsed"] / asked > config.max_unparseable:
            reasons.append(f"{pairwise['unparsed']} of {asked} pairwise verdicts unparseable")
    return {"valid": not reasons, "reasons": reasons}
