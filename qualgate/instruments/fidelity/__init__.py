"""The fidelity instrument: perplexity on domain text and how far the candidate's distribution moved.

Two steps with one responsibility each: `score_text` runs a session over the chunks of a text and keeps
per-token arrays (TokenScores, scores.py); `compare` is a pure function of two TokenScores (compare.py).
The instrument (instrument.py) runs them per stack against the golden's reference scores.
"""

from qualgate.instruments.fidelity.compare import (
    FidelityResult,
    at_least_zero,
    compare,
    kl_per_position,
    kl_sampled_tail,
    kl_topk_tail,
    perplexity,
)
from qualgate.instruments.fidelity.scores import (
    TAIL_SAMPLES,
    FidelityConfig,
    TokenScores,
    chunk_text,
    reference_ids,
    score_text,
    serving_schedule,
)

__all__ = [
    "TAIL_SAMPLES",
    "FidelityConfig",
    "FidelityResult",
    "TokenScores",
    "at_least_zero",
    "chunk_text",
    "compare",
    "kl_per_position",
    "kl_sampled_tail",
    "kl_topk_tail",
    "perplexity",
    "reference_ids",
    "score_text",
    "serving_schedule",
]
