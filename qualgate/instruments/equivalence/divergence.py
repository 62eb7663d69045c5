"""Where a candidate's greedy tokens leave the reference's, and whether that is a near-tie (numerics) or a
real divergence (a bug)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qualgate.backends.base import Generation


@dataclass(frozen=True)
class Divergence:
    prompt_id: str
    run: str  # "cold" or "warm" (prefix cache), "single" otherwise
    position: int  # first differing generated position = shared-prefix length
    reference_token: int | None  # None: the reference stopped here
    candidate_token: int | None
    reference_text: str
    candidate_text: str
    margin: float | None  # reference log P(its token) - log P(candidate's token) (top1 - top2 if not in top-k)
    candidate_rank: int | None  # 1-based rank of the candidate's token in the reference's top-k, if present
    kind: str  # "near_tie" or "real"
    reference_rank: int | None = None  # 1-based rank of the reference's token in the candidate's top-k
    group: str = ""


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int | None:
    for i, (a, b) in enumerate(zip(reference, candidate, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))


def has_top(gen: Generation, positions: int, k: int) -> bool:
    """Whether `gen` carries top-k logprobs for its first `positions` tokens (endpoints that return
    no generated-token logprobs, e.g. TGI's completions, give none)."""
    return gen.top_logprobs.ndim == 2 and gen.top_logprobs.shape[0] >= positions and gen.top_logprobs.shape[1] >= k


def classify(ref: Generation, cand: Generation, position: int, eps: float, decode: Any) -> Divergence:
    """Build the explanation of one divergence at `position` (the first differing one).

    A near-tie needs all three: the candidate's token in the reference's top-k, the reference's token
    in the candidate's top-k, and the reference's top-1/top-2 margin within `eps` (the caller passes
    max(eps, the measured noise margin)). Without top-k logprobs on either side (a generation-only
    endpoint) it cannot be told apart from a bug: the divergence stays real, the conservative reading."""
    ref_token = ref.token_ids[position] if position < len(ref.token_ids) else None
    cand_token = cand.token_ids[position] if position < len(cand.token_ids) else None
    margin = rank = back_rank = None
    kind = "real"
    if ref_token is not None and cand_token is not None and has_top(ref, position + 1, 2):
        ids = ref.top_ids[position].tolist()
        lps = ref.top_logprobs[position]
        rank = ids.index(cand_token) + 1 if cand_token in ids else None
        # The reference's preference for its own token over the candidate's: the top-1/top-2 margin
        # when the candidate took the second choice, wider (and so stricter) for a lower rank.
        margin = float(lps[0] - lps[(rank or 2) - 1])
        if has_top(cand, position + 1, 2):
            cand_ids = cand.top_ids[position].tolist()
            back_rank = cand_ids.index(ref_token) + 1 if ref_token in cand_ids else None
        if rank is not None and rank > 1 and back_rank is not None and margin <= eps:
            kind = "near_tie"
    return Divergence(
        prompt_id="",
        run="",
        position=position,
        reference_token=ref_token,
        candidate_token=cand_token,
        reference_text=decode([ref_token]) if ref_token is not None else "<end>",
        candidate_text=decode([cand_token]) if cand_token is not None else "<end>",
        margin=margin,
        candidate_rank=rank,
        kind=kind,
        reference_rank=back_rank,
    )
