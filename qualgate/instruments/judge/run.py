"""Judge a candidate stack's answers against the baseline's on the domain prompt set."""

from __future__ import annotations

import hashlib
import random
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


IDENTICAL_REPLY = "(identical answers: a tie by definition, the judge was not asked)"


def pairwise_outcomes(
    client: JudgeClient,
    prompts: list[JudgePrompt],
    base: list[str],
    cand: list[str],
    progress: Any,
    log: list[dict[str, Any]],
    protocol: str = "pairwise",
) -> list[tuple[str, bool]]:
    """Each prompt's outcome for the candidate, asked in both orders. Identical answers are a tie
    without asking: both orders would be one and the same request, so the judge's reply could only
    ever combine to a tie, and a lossless stack would otherwise cost a judgment per prompt."""
    asked = [i for i in range(len(prompts)) if base[i] != cand[i]]
    completion = not client.config.chat_template  # the stacks continued the prompt's text (protocols.shown)
    requests = []
    for i in asked:
        p, a, b = prompts[i], base[i], cand[i]
        marker = nonce(p.prompt, a, b)
        requests += [
            protocols.pairwise(p.prompt, a, b, marker, client.config.max_answer_chars, completion),
            protocols.pairwise(p.prompt, b, a, marker, client.config.max_answer_chars, completion),
        ]
    found = client.judge_all(requests, progress)
    same = {"verdict": "tie", "reply": IDENTICAL_REPLY}
    verdicts: list[dict[str, Any]] = [same] * (2 * len(prompts))
    for n, i in enumerate(asked):
        verdicts[2 * i], verdicts[2 * i + 1] = found[2 * n], found[2 * n + 1]
    for i, p in enumerate(prompts):
        for order, first, second in ((0, base[i], cand[i]), (1, cand[i], base[i])):
            record = verdicts[2 * i + order]
            log.append(
                {
                    "protocol": protocol,
                    "id": p.id,
                    "prompt": p.prompt,
                    "answer_a": first,
                    "answer_b": second,
                    "order": "baseline first" if order == 0 else "candidate first",
                    "verdict": record["verdict"],
                    "reply": record["reply"],
                }
            )
    return [combine(verdicts[2 * i]["verdict"], verdicts[2 * i + 1]["verdict"]) for i in range(len(prompts))]


def scrambled(text: str, seed: str) -> str:
    """The answer's words in a seeded random order: the same words and length, no sense."""
    words = text.split()
    random.Random(f"qualgate-control:{seed}").shuffle(words)
    return " ".join(words)


def _grades(
    client: JudgeClient,
    prompts: list[JudgePrompt],
    texts: list[str],
    kind: str,
    progress: Any,
    log: list[dict[str, Any]],
    side: str,
) -> list[Any]:
    limit, completion = client.config.max_answer_chars, not client.config.chat_template
    if kind == "single":
        requests = [
            protocols.single(p.prompt, t, nonce(p.prompt, t), limit, completion)
            for p, t in zip(prompts, texts, strict=True)
        ]
    else:
        requests = [
            protocols.reference(
                p.prompt, t, p.reference or "", nonce(p.prompt, t, p.reference or ""), limit, completion
            )
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
        outcomes = pairwise_outcomes(client, prompts, baseline, candidate, bar("pairwise"), log)
        deltas = [len(c) - len(b) for b, c in zip(baseline, candidate, strict=True)]
        summary["pairwise"] = pairwise_summary(outcomes, deltas, config.bootstrap, seed).as_dict()
        summary["pairwise"]["identical"] = sum(b == c for b, c in zip(baseline, candidate, strict=True))
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
        # The baseline against its own answers with the words scrambled: a judge that cannot prefer the
        # answer over its own word salad is not measuring the answers (a judge following the position
        # ties them all), so its finding is void.
        salad = [scrambled(b, p.id) for p, b in zip(prompts, baseline, strict=True)]
        control = pairwise_outcomes(client, prompts, baseline, salad, bar("control"), log, "control")
        result = pairwise_summary(control, [0] * len(control), config.bootstrap, seed + 1)
        net = result.net_loss
        valid = net.low > 0
        summary["control"] = {
            **result.as_dict(),
            "valid": valid,
            "reason": "the baseline beats its own words scrambled"
            if valid
            else f"the baseline against its own words scrambled: net loss {net.value:.3g} [{net.low:.3g}, "
            f"{net.high:.3g}] does not exclude 0: the judge does not see the damage",
        }
    summary["unparseable"] = client.unparseable
    summary["validity"] = validity(config, summary)
    summary["judgments"] = log
    return summary


def validity(config: JudgeConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Whether the judge measured the answers at all. A judge that mostly follows the position turns
    every verdict into a tie and would 'pass' any stack; a control it is blind to or many unparseable
    verdicts likewise void the finding (reported as invalid, never as pass or fail)."""
    reasons = []
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
    control = summary.get("control")
    if control is not None and not control["valid"]:
        reasons.append(control["reason"])
    return {"valid": not reasons, "reasons": reasons}
