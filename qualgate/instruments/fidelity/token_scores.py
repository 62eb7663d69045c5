"""Per-token scores of one side of a comparison (TokenScores), and the reference's handed out in order
(ReferenceRows: from memory here, streamed from a golden's file by golden_scores.GoldenRows)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np


def reference_ids(top_ids: np.ndarray, tail_ids: np.ndarray | None) -> np.ndarray:
    """The top-k ids, then the tail draws when there are any: what a candidate is asked about."""
    return top_ids if tail_ids is None else np.concatenate([top_ids, tail_ids], axis=1)


@dataclass(frozen=True)
class TokenScores:
    """Per scored token: its chunk, the actual next token and the distribution around it."""

    chunk: np.ndarray  # [N] int32
    target: np.ndarray  # [N] int64
    logprob: np.ndarray  # [N] float64: log Q(t) (or log P(t) for the reference)
    top_ids: np.ndarray  # [N, k]
    top_logprobs: np.ndarray  # [N, k]
    tail_mass: np.ndarray  # [N]
    gathered: np.ndarray | None = None  # [N, k_ref (+ s)]: this side's logprobs at the reference's ids
    block_size: int | None = None
    scoring: str = "one pass"  # how the tokens entered the KV cache (scoring_label)
    tail_ids: np.ndarray | None = None  # [N, s]: ids drawn from this side's tail (a golden's reference)
    tail_logprobs: np.ndarray | None = None  # [N, s]: their logprobs on this side

    @property
    def reference_ids(self) -> np.ndarray:
        """The ids a candidate is asked for at each position: the top-k, then the tail sample."""
        return reference_ids(self.top_ids, self.tail_ids)

    @property
    def n(self) -> int:
        return int(self.target.size)

    def select(self, rows: slice | np.ndarray) -> TokenScores:
        """These scores at some positions (a slice or a mask)."""
        arrays: dict[str, Any] = {name: getattr(self, name) for name in ARRAY_FIELDS}
        picked: dict[str, Any] = {name: None if a is None else a[rows] for name, a in arrays.items()}
        return replace(self, **picked)

    @classmethod
    def concat(cls, parts: list[TokenScores]) -> TokenScores:
        """Scores of consecutive positions joined (the first part's block size and scoring label)."""
        first = parts[0]
        arrays: dict[str, Any] = {
            name: None if getattr(first, name) is None else np.concatenate([getattr(p, name) for p in parts])
            for name in ARRAY_FIELDS
        }
        return replace(first, **arrays)


ARRAY_FIELDS = (
    "chunk",
    "target",
    "logprob",
    "top_ids",
    "top_logprobs",
    "tail_mass",
    "gathered",
    "tail_ids",
    "tail_logprobs",
)


class ReferenceRows(Protocol):
    """The reference's scores handed out in order, a chunk's positions at a time (a golden streams
    them from disk, so a text of any length passes through a fixed amount of memory)."""

    @property
    def n(self) -> int: ...

    def take(self, count: int) -> TokenScores: ...


class InMemoryRows:
    """ReferenceRows over scores already in memory."""

    def __init__(self, scores: TokenScores) -> None:
        self.scores = scores
        self.cursor = 0

    @property
    def n(self) -> int:
        return self.scores.n

    def take(self, count: int) -> TokenScores:
        rows = self.scores.select(slice(self.cursor, self.cursor + count))
        self.cursor += count
        return rows
