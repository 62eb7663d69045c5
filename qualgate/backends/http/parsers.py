"""Reading OpenAI-compatible completion responses, as pure functions shared by the session (scores,
generations) and the capability probe (which refuses a server whose logprobs would corrupt scores).

Two response shapes carry prompt logprobs: the legacy OpenAI `echo` + `logprobs` (tokens,
token_logprobs, top_logprobs; llama.cpp servers, TGI-style proxies) and vLLM's `prompt_logprobs` (one
entry per prompt token, None first). Each is read in one place (`echo_fields`, `prompt_logprob_tables`);
every engine's quirk is tested on a recorded response (and, end to end, on endpoints shaped like each
engine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from qualgate.backends.rows import Row
from qualgate.errors import InfrastructureError


class Entry(NamedTuple):
    """One token id of a prompt_logprobs entry."""

    logprob: float
    rank: int
    decoded: str  # the server's text of the token (its id when the server gives none)


Table = dict[int, Entry]  # a position's entry by token id; None for the first position


@dataclass(frozen=True)
class PromptLogprobs:
    tokens: list[str]  # as the server tokenized the text (prompt, then any generated tokens)
    logprobs: list[float | None]  # logprob of each token given everything before it


def echo_fields(response: dict[str, Any]) -> tuple[list[str], list[float | None], list[dict[str, float] | None]]:
    """The legacy `logprobs` of the first choice: each token's text, its logprob, and the top-k by text."""
    logprobs = response["choices"][0].get("logprobs") or {}
    return (
        list(logprobs.get("tokens") or []),
        list(logprobs.get("token_logprobs") or []),
        list(logprobs.get("top_logprobs") or []),
    )


def prompt_logprob_tables(response: dict[str, Any]) -> list[Table | None]:
    """vLLM's `prompt_logprobs`: per prompt token {token_id: Entry}, holding the actual token (with its
    true rank) and the top-k; the first entry is None (nothing predicts it)."""
    return [
        None
        if entry is None
        else {
            int(key): Entry(float(value["logprob"]), int(value.get("rank") or 0), str(value.get("decoded_token", key)))
            for key, value in entry.items()
        }
        for entry in response["choices"][0].get("prompt_logprobs") or []
    ]


def from_echo(response: dict[str, Any]) -> PromptLogprobs:
    """Legacy completions with echo=True: the prompt's tokens and logprobs, then the generated ones."""
    tokens, values, _ = echo_fields(response)
    return PromptLogprobs(tokens, values)


def from_vllm_prompt_logprobs(response: dict[str, Any]) -> PromptLogprobs:
    """vLLM's `prompt_logprobs` with the prompt's token ids (`prompt_token_ids`), as tokens and logprobs."""
    tokens: list[str] = []
    values: list[float | None] = []
    for table, token_id in zip(prompt_logprob_tables(response), response.get("prompt_token_ids") or [], strict=False):
        chosen = None if table is None else table.get(int(token_id))
        tokens.append(chosen.decoded if chosen else str(token_id))
        values.append(chosen.logprob if chosen else None)
    return PromptLogprobs(tokens, values)


def rows_from_prompt_logprobs(ids: Sequence[int], response: dict[str, Any], top_k: int, endpoint: str) -> list[Row]:
    """One Row per position 1..n-1 of a token-id prompt scored with `prompt_logprobs=top_k`."""
    tables = prompt_logprob_tables(response)
    if len(tables) != len(ids):
        raise InfrastructureError(f"endpoint {endpoint} returned {len(tables)} prompt logprobs for {len(ids)} tokens")
    out = []
    for position, table in enumerate(tables[1:], start=1):
        table = table or {}
        if ids[position] not in table:
            raise InfrastructureError(f"endpoint {endpoint} gave no logprob for prompt position {position}")
        # vLLM adds the scored token with its true rank: it is in `top` only if it is in the top-k.
        top = {t: entry.logprob for t, entry in table.items() if entry.rank <= top_k}
        out.append(Row(table[ids[position]].logprob, top))
    return out


def rows_from_echo(
    ids: Sequence[int],
    response: dict[str, Any],
    pieces: Sequence[str],
    bos_token_id: int | None,
    piece_id: Callable[[str], int],
    endpoint: str,
) -> list[Row]:
    """One Row per position 1..n-1 of a text prompt scored with echo; `pieces` are the model tokenizer's
    texts of `ids`, which the server's tokens must equal (a different tokenization is refused)."""
    tokens, values, tops = echo_fields(response)
    ids = list(ids)
    # Servers differ on whether the BOS appears in the echo; align on the text tokens.
    offset = 1 if tokens and ids and ids[0] == bos_token_id and tokens[0] == pieces[0] else 0
    body = ids[1:] if ids and ids[0] == bos_token_id else ids
    if tokens[offset : offset + len(body)] != list(pieces[len(ids) - len(body) :]):
        raise InfrastructureError(
            f"endpoint {endpoint} tokenized a prompt differently from the model's tokenizer; "
            "use an endpoint that accepts token-id prompts (vLLM) or one serving the same tokenizer"
        )
    out = []
    for position in range(max(1, len(ids) - len(body)), len(ids)):
        index = offset + position - (len(ids) - len(body))
        value = values[index] if index < len(values) else None
        if value is None:
            raise InfrastructureError(f"endpoint {endpoint} returned no logprob for prompt position {position} (echo)")
        top = {piece_id(piece): float(v) for piece, v in (tops[index] or {}).items() if v is not None}
        out.append(Row(float(value), {t: v for t, v in top.items() if t >= 0}))
    return out


def generated(
    choice: dict[str, Any], top_k: int, piece_id: Callable[[str], int]
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """A generation's token ids (-1 for a piece the tokenizer does not know) and its per-step top-k."""
    logprobs = choice.get("logprobs") or {}
    token_ids = [piece_id(t) for t in logprobs.get("tokens") or []]
    tops = logprobs.get("top_logprobs") or []
    k = min([top_k, *(len(t or {}) for t in tops)]) if tops else 0
    top_ids = np.zeros((len(tops), k), dtype=np.int64)
    top_logprobs = np.zeros((len(tops), k))
    for i, entry in enumerate(tops):
        best = sorted((entry or {}).items(), key=lambda item: -item[1])[:k]
        top_ids[i] = [piece_id(piece) for piece, _ in best]
        top_logprobs[i] = [value for _, value in best]
    return token_ids, top_ids, top_logprobs


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
