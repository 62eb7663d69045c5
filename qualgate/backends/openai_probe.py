"""Reading prompt logprobs from OpenAI-compatible completion responses, and the checks that refuse a
server whose logprobs would silently corrupt scores.

Two response shapes exist: the legacy OpenAI `echo` + `logprobs` (tokens, token_logprobs,
top_logprobs; llama.cpp servers, TGI-style proxies) and vLLM's `prompt_logprobs` (one entry per
prompt token, None first). The checks are pure functions over a parsed response, so each engine's
quirk is tested on a recorded response (and, end to end, on endpoints shaped like each engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptLogprobs:
    tokens: list[str]  # as the server tokenized the text (prompt, then any generated tokens)
    logprobs: list[float | None]  # logprob of each token given everything before it


def from_echo(response: dict[str, Any]) -> PromptLogprobs:
    """Legacy completions with echo=True: the prompt's tokens and logprobs, then the generated ones."""
    logprobs = response["choices"][0].get("logprobs") or {}
    return PromptLogprobs(list(logprobs.get("tokens") or []), list(logprobs.get("token_logprobs") or []))


def from_vllm_prompt_logprobs(response: dict[str, Any]) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt token a {token_id: {logprob, rank, decoded_token}} map
    holding the actual token (and the top-k); the first entry is None (nothing predicts it)."""
    tokens: list[str] = []
    values: list[float | None] = []
    for entry, token_id in zip(
        response["choices"][0]["prompt_logprobs"], response.get("prompt_token_ids") or [], strict=False
    ):
        if entry is None:
            tokens.append(str(token_id))
            values.append(None)
            continue
        chosen = entry.get(str(token_id)) or entry.get(token_id)
        tokens.append(str(chosen.get("decoded_token", token_id)) if chosen else str(token_id))
        values.append(float(chosen["logprob"]) if chosen else None)
    return PromptLogprobs(tokens, values)


def problems(parsed: PromptLogprobs, expected_tokens: list[str], generated: int = 0) -> list[str]:
    """What makes these logprobs unusable for scoring `expected_tokens` (the model tokenizer's view of
    the prompt text, without BOS); empty when they can be trusted position by position."""
    found = []
    n = len(expected_tokens)
    if not parsed.tokens and n > 0:
        return ["no logprobs in the response: the server ignores `logprobs` on completions (generation only)"]
    if len(parsed.tokens) == generated and n > 0:
        return [f"logprobs cover only the {generated} generated tokens, not the {n}-token prompt (echo ignored)"]
    if len(parsed.tokens) != n + generated or len(parsed.logprobs) != len(parsed.tokens):
        found.append(f"{len(parsed.tokens)} logprob positions for a {n}-token prompt plus {generated} generated")
    mismatch = next((i for i, (a, b) in enumerate(zip(parsed.tokens, expected_tokens, strict=False)) if a != b), None)
    if mismatch is not None:
        found.append(
            f"tokenizer mismatch at position {mismatch}: server {parsed.tokens[mismatch]!r}, "
            f"model {expected_tokens[mismatch]!r}"
        )
    prompt = parsed.logprobs[:n]
    if prompt and prompt[0] is None:
        found.append(
            "the first prompt token has no logprob (the BOS-conditioned position is missing): "
            "score from the second token or send an explicit BOS"
        )
    missing = [i for i, v in enumerate(prompt[1:], start=1) if v is None]
    if missing:
        found.append(f"{len(missing)} prompt positions without a logprob (first at {missing[0]})")
    return found
