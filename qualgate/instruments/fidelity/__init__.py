"""The fidelity instrument: perplexity on domain text and how far the candidate's distribution moved.

Two steps with one responsibility each: `iter_scores` runs a session over the chunks of a text, one
chunk's per-token arrays (TokenScores, scores.py) at a time, and `score_text` joins them; `compare` is a
pure function of two TokenScores and `compare_scored` the same fold over chunks as they are scored
(compare.py). The instrument (instrument.py) streams each stack against the golden's reference scores.
"""

from qualgate.instruments.fidelity.compare import (
    FidelityResult,
    at_least_zero,
    compare,
    compare_scored,
    kl_per_position,
    kl_sampled_tail,
    kl_topk_tail,
    perplexity,
)
from qualgate.instruments.fidelity.scores import (
    TAIL_SAMPLES,
    FidelityConfig,
    chunk_text,
    iter_scores,
    score_text,
    serving_schedule,
)
from qualgate.instruments.fidelity.token_scores import TokenScores, reference_ids

__all__ = [
    "TAIL_SAMPLES",
    "FidelityConfig",
    "FidelityResult",
    "TokenScores",
    "at_least_zero",
    "chunk_text",
    "compare",
    "compare_scored",
    "iter_scores",
    "kl_per_position",
    "kl_sampled_tail",
    "kl_topk_tail",
    "perplexity",
    "reference_ids",
    "score_text",
    "serving_schedule",
]
