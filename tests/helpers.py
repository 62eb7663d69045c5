"""Small numeric helpers for tests (the real metrics live in qualgate's fidelity instrument)."""

from __future__ import annotations

import numpy as np

from qualgate import ScoreResult


def full_logprobs(result: ScoreResult, vocab_size: int) -> np.ndarray:
    """[N, V] logprobs from a result scored with top_k = vocabulary size."""
    assert result.top_k == vocab_size, "score with top_k=vocab_size to get the full distribution"
    out = np.empty((result.top_ids.shape[0], vocab_size))
    np.put_along_axis(out, result.top_ids, result.top_logprobs, axis=1)
    return out


def mean_kl(reference: ScoreResult, candidate: ScoreResult, vocab_size: int) -> float:
    p = full_logprobs(reference, vocab_size)
    q = full_logprobs(candidate, vocab_size)
    return float((np.exp(p) * (p - q)).sum(axis=1).mean())


def same_top1(reference: ScoreResult, candidate: ScoreResult) -> float:
    return float((reference.top_ids[:, 0] == candidate.top_ids[:, 0]).mean())
