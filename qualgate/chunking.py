"""How a long text is cut into model-sized pieces for teacher-forced scoring.

A Chunk is a token sequence to score plus the first row that counts: row i of a ScoreResult
predicts token_ids[i + 1], and rows [first_scored, len - 1) are the chunk's scored positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from qualgate.errors import ConfigError

ChunkingMode = Literal["llamacpp", "rolling"]


@dataclass(frozen=True)
class Chunk:
    token_ids: list[int]
    first_scored: int

    @property
    def n_scored(self) -> int:
        return len(self.token_ids) - 1 - self.first_scored

    @property
    def targets(self) -> list[int]:
        return self.token_ids[self.first_scored + 1 :]


def llamacpp_chunks(tokens: list[int], n_ctx: int, bos: int | None) -> list[Chunk]:
    """llama-perplexity: non-overlapping n_ctx chunks of the text tokenized once (with BOS); each
    chunk's first token replaced by BOS when the model has one; only the second half is scored, so
    every scored token has at least n_ctx/2 tokens of context. A trailing partial chunk is dropped."""
    if n_ctx < 4 or n_ctx % 2:
        raise ConfigError(f"n_ctx must be an even number >= 4 (got {n_ctx})")
    chunks = []
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        ids = tokens[start : start + n_ctx]
        if bos is not None:
            ids = [bos, *ids[1:]]
        chunks.append(Chunk(ids, n_ctx // 2))
    if not chunks:
        raise ConfigError(
            f"the text has {len(tokens)} tokens, fewer than one chunk of n_ctx={n_ctx}; "
            "give more text or a smaller n_ctx"
        )
    return chunks


def rolling_windows(tokens: list[int], max_length: int, prefix_token: int) -> Iterator[tuple[list[int], list[int]]]:
    """lm-eval's get_rolling_token_windows with context_len=1: (input, predicted) pairs that predict
    every token exactly once; the first window is prefixed with BOS/EOT."""
    if not tokens:
        return
    first = min(max_length, len(tokens))
    yield [prefix_token, *tokens[: first - 1]], tokens[:first]
    predicted = first
    while predicted < len(tokens):
        window = min(len(tokens) - predicted, max_length)
        end = predicted + window
        yield tokens[max(0, end - max_length - 1) : end - 1], tokens[end - window : end]
        predicted += window


def rolling_chunks(tokens: list[int], max_length: int, prefix_token: int) -> list[Chunk]:
    """lm-eval's loglikelihood_rolling: each window made disjoint (make_disjoint_window) and scored as
    (context + continuation)[-(max_length + 1):], the continuation being the last rows."""
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2 (got {max_length})")
    chunks = []
    for window_input, predicted in rolling_windows(tokens, max_length, prefix_token):
        context = window_input[: len(window_input) - (len(predicted) - 1)]
        ids = (context + predicted)[-(max_length + 1) :]
        chunks.append(Chunk(ids, len(ids) - 1 - len(predicted)))
    if not chunks:
        raise ConfigError("the text is empty after tokenization")
    return chunks
