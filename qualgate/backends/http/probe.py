"""The capability probe: before a served stack is measured, find out what its endpoint can do and
refuse it (exit 3, with what is wrong) when its numbers could not be trusted.

Checked on a canary text: token-id prompts with per-position prompt logprobs (vLLM), else echo with
logprobs (the legacy protocol) with one logprob per prompt token (not only the generated ones, as
llama.cpp's server returns) and a first text token that is scored; the server's tokens equal the
model tokenizer's; the largest top-k it returns; and the canary's logprobs agree with the in-process
baseline within a tolerance (a wrong model, a wrong chat template applied to completions, a server
that silently truncates).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qualgate.backends.http.client import EndpointRejected
from qualgate.backends.http.parsers import from_echo, from_vllm_prompt_logprobs, problems
from qualgate.backends.http.session import OpenAISession, ProbeReport
from qualgate.errors import InfrastructureError

CANARY = (
    "The function returns a list of the values in the table. If the key is missing, it raises an "
    "error and the caller must check the result before it writes the file."
)
CANARY_TOKENS = 48
TOP_K_TRIES = (64, 20, 5, 1)


class ProbeFailed(InfrastructureError):
    """The endpoint cannot be measured as it is configured (exit 3)."""


def probe(session: OpenAISession, require_scoring: bool = True) -> ProbeReport:
    """What the session's endpoint can do: scoring mode, top-k, prompt form. Raises ProbeFailed when
    it cannot score and scoring is required. Pure discovery: the caller configures the session."""
    report = ProbeReport(session.stack.name, str(session.endpoint))
    ids = session.encode(CANARY)[:CANARY_TOKENS]
    # The plainest request first, with retries: a server that is down is an infrastructure error,
    # not a missing capability. The shape probes after it get one attempt each.
    session.client.one({"prompt": CANARY, "max_tokens": 1, "temperature": 0.0})
    found: list[str] = []
    top_k = _top_k(session, ids, report)
    if top_k:
        report.mode, report.token_id_prompts = "token_ids", True
    else:
        report.token_id_prompts = _accepts_token_ids(session, ids)
        found = _echo_problems(session, ids, report)
        top_k = report.top_k
        report.mode = "echo"
    report.top_k = max(top_k, 1)
    if found:
        if require_scoring:
            raise ProbeFailed(f"endpoint {session.endpoint} refused by the capability probe: {'; '.join(found)}")
        report.notes.extend(found)
        report.scoring = False
    return report


def check_canary(session: OpenAISession, reference: Callable[[list[int]], np.ndarray], tolerance: float) -> None:
    """The canary scored by the configured session agrees with the in-process baseline, or ProbeFailed:
    a wrong model, a chat template applied to completions, a server that silently truncates."""
    ids = session.encode(CANARY)[:CANARY_TOKENS]
    served = session.score(ids, top_k=1).logprobs
    diff = float(np.abs(served - reference(ids)).mean())
    if session.probe is not None:
        session.probe.canary_mean_abs_diff, session.probe.canary_tolerance = diff, tolerance
    if not diff <= tolerance:
        raise ProbeFailed(
            f"endpoint {session.endpoint} refused by the capability probe: the canary's logprobs differ from "
            f"the in-process baseline by {diff:.3g} nats per token on average (> {tolerance:g}); is it serving "
            f"'{session.stack.model.path}' with the stack's layers?"
        )


def _top_k(session: OpenAISession, ids: list[int], report: ProbeReport) -> int:
    """The largest prompt-logprobs top-k a token-id request gets, 0 if the server has no such mode."""
    for k in TOP_K_TRIES:
        try:
            response = session.client.try_once(
                {"prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
            )
        except EndpointRejected as exc:
            report.notes.append(f"prompt_logprobs={k} with token ids rejected ({exc.status}: {exc})")
            continue
        entries = response["choices"][0].get("prompt_logprobs")
        if not entries:
            report.notes.append("prompt_logprobs ignored")
            return 0
        parsed = from_vllm_prompt_logprobs({**response, "prompt_token_ids": response.get("prompt_token_ids") or ids})
        if len(parsed.logprobs) != len(ids) or any(v is None for v in parsed.logprobs[1:]):
            report.notes.append(f"prompt_logprobs covered {len(parsed.logprobs)} of {len(ids)} positions")
            return 0
        return k
    return 0


def _accepts_token_ids(session: OpenAISession, ids: list[int]) -> bool:
    try:
        session.client.try_once({"prompt": ids, "max_tokens": 1, "temperature": 0.0})
    except EndpointRejected:
        return False
    return True


def _echo_problems(session: OpenAISession, ids: list[int], report: ProbeReport) -> list[str]:
    """Echo mode: what makes its prompt logprobs unusable (engine quirks)."""
    text = session.prompt_text(ids)
    expected = (
        [session.piece(t) for t in ids[1:]] if ids[0] == session.bos_token_id else [session.piece(t) for t in ids]
    )
    last: Exception | None = None
    for k in TOP_K_TRIES:
        body = {"prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": k}
        try:
            response = session.client.try_once(body)
        except EndpointRejected as exc:
            last = exc
            continue
        report.top_k = k
        parsed = from_echo(response)
        if (
            parsed.tokens
            and session.bos_token_id is not None
            and parsed.tokens[0] == session.piece(session.bos_token_id)
        ):
            # The server shows the BOS it added (vLLM): the first text token is then scored.
            parsed = type(parsed)(parsed.tokens[1:], parsed.logprobs[1:])
        return problems(parsed, expected, generated=1)
    return [f"neither prompt_logprobs nor echo with logprobs is accepted ({last})"]
