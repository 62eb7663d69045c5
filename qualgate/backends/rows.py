"""Scores from what an engine returns per position: the scored token's logprob and its top-k.

An engine over HTTP returns only its own top-k, so the logprob of a reference top-k id the engine
did not return is unknown: `gathered` holds NaN there, and the KL merges such ids into
the tail bucket on both sides (merging outcomes keeps the KL a lower bound; fidelity reports the
merged mass). Nothing unknown is ever filled with a guess.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from qualgate.backends.base import ScoreResult


@dataclass(frozen=True)
class Row:
    logprob: float  # of the token that actually follows
    top: dict[int, float]  # the engine's top-k at this position, id -> logprob


def score_from_rows(
    token_ids: Sequence[int], rows: Sequence[Row], top_k: int, gather: np.ndarray | None = None
) -> ScoreResult:
    """`top_k` columns; a row with fewer known entries is padded with -inf (probability 0)."""
    ids = np.asarray(list(token_ids), dtype=np.int64)
    n = len(rows)
    k = max(1, top_k)
    top_ids = np.zeros((n, k), dtype=np.int64)
    top_logprobs = np.full((n, k), -np.inf)
    for i, row in enumerate(rows):
        best = sorted(row.top.items(), key=lambda item: -item[1])[:k]
        top_ids[i, : len(best)] = [token for token, _ in best]
        top_logprobs[i, : len(best)] = [value for _, value in best]
    gathered = None
    if gather is not None:
        gathered = np.full(gather.shape, np.nan)
        for i, row in enumerate(rows):
            known = {**row.top, int(ids[i + 1]): row.logprob}
            gathered[i] = [known.get(int(token), np.nan) for token in gather[i]]
    return ScoreResult(
        token_ids=ids,
        logprobs=np.asarray([row.logprob for row in rows], dtype=np.float64),
        top_ids=top_ids,
        top_logprobs=top_logprobs,
        tail_mass=np.clip(1.0 - np.exp(top_logprobs).sum(axis=1), 0.0, None),
        block_size=None,
        gathered=gathered,
    )


def score_from_logprobs(
    token_ids: Sequence[int], logprobs: np.ndarray, top_k: int, gather: np.ndarray | None = None
) -> ScoreResult:
    """From full-vocabulary logprobs [n-1, vocab] (an in-process engine): exact, nothing merged."""
    ids = np.asarray(list(token_ids), dtype=np.int64)
    k = min(top_k, logprobs.shape[1])
    top = np.argpartition(-logprobs, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logprobs, top, axis=1), axis=1, kind="stable")
    top_ids = np.take_along_axis(top, order, axis=1)
    top_logprobs = np.take_along_axis(logprobs, top_ids, axis=1).astype(np.float64)
    rows = np.arange(len(ids) - 1)
    return ScoreResult(
        token_ids=ids,
        logprobs=logprobs[rows, ids[1:]].astype(np.float64),
        top_ids=top_ids,
        top_logprobs=top_logprobs,
        tail_mass=np.clip(1.0 - np.exp(top_logprobs).sum(axis=1), 0.0, None),
        block_size=None,
        gathered=None if gather is None else np.take_along_axis(logprobs, gather, axis=1).astype(np.float64),
    )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (engines hand back float32 logits)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return np.asarray(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))


def tail_seed(token_ids: Sequence[int] | np.ndarray) -> int:
    """A seed from the scored tokens: the same text draws the same tail sample on every machine and in
    any chunk order (a golden re-recorded from the same model and text is the same file)."""
    blob = np.asarray(list(token_ids), dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.sha256(b"qualgate-tail" + blob).digest()[:8], "little")


def sample_tail(logprobs: np.ndarray, top_ids: np.ndarray, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`samples` ids per row drawn with replacement from the row's distribution restricted to the ids
    outside `top_ids` (P(x) / P(tail)), and their logprobs.

    With them, the tail term of KL(P||Q), sum over the tail of P(x) log(P(x)/Q(x)), has the unbiased
    estimate P(tail) * mean(log P(x_j) - log Q(x_j)). Inverse-CDF draws from numpy's generator keep
    the sample independent of the engine's own sampler. A row with no tail (the top-k is the whole
    vocabulary, or its mass underflows) gets id 0 with logprob -inf: its tail weight is 0."""
    n, vocab = logprobs.shape
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, samples), dtype=np.int64)
    values = np.full((n, samples), -np.inf)
    uniform = rng.random((n, samples))
    for i in range(n):
        p = np.exp(logprobs[i].astype(np.float64))
        p[top_ids[i]] = 0.0
        cdf = np.cumsum(p)
        total = cdf[-1]
        if not total > 0:
            continue
        # side="right": the first id whose cumulative mass exceeds the draw; zero-mass ids never match
        picked = np.minimum(np.searchsorted(cdf, uniform[i] * total, side="right"), vocab - 1)
        ids[i] = picked
        values[i] = logprobs[i, picked]
    return ids, values


def with_tail_sample(result: ScoreResult, logprobs: np.ndarray, samples: int) -> ScoreResult:
    """The result with `samples` tail draws per row from the full-vocabulary logprobs [n-1, vocab]."""
    if samples <= 0:
        return result
    ids, values = sample_tail(logprobs, result.top_ids, samples, tail_seed(result.token_ids))
    return replace(result, tail_ids=ids, tail_logprobs=values)
