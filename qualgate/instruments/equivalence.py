"""Equivalence: lossless layers must reproduce the greedy tokens of the same stack without them.

A divergence is classified with the reference's own distribution at the first differing position
(METRICS.md): if the candidate chose the reference's second choice and the reference's top-2 margin
is at most eps, it is a near-tie (numerics, reported); anything else is a real divergence (a bug).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qualgate.errors import ConfigError
from qualgate.jsonl import read_prompt_rows
from qualgate.layers import LayerKind

if TYPE_CHECKING:
    from qualgate.backends.base import Generation, Session
    from qualgate.stack import Stack


class EquivalenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(48, ge=1)
    eps: float = Field(0.125, ge=0, description="top-2 margin (nats) under which a divergence is a near-tie")
    logprob_tolerance: float = Field(1e-3, ge=0, description="max |dlogprob| allowed on the shared prefix")
    top_k: int = Field(4, ge=2, description="per-step top-k kept from both sides (>= 2 to classify)")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def load_prompts(path: Path) -> list[Prompt]:
    """JSONL with an `id` and a `prompt` per line."""
    return [Prompt(str(row.get("id", f"{path.stem}-{n}")), row["prompt"]) for n, row in read_prompt_rows(path)]


@dataclass(frozen=True)
class Divergence:
    prompt_id: str
    run: str  # "cold" or "warm" (prefix cache), "single" otherwise
    position: int  # first differing generated position = shared-prefix length
    reference_token: int | None  # None: the reference stopped here
    candidate_token: int | None
    reference_text: str
    candidate_text: str
    margin: float | None  # log P(top1) - log P(top2) of the reference at `position`
    candidate_rank: int | None  # 1-based rank of the candidate's token in the reference's top-k, if present
    kind: str  # "near_tie" or "real"


@dataclass
class EquivalenceResult:
    reference: str
    candidate: str
    samples: int
    exact_matches: int
    divergences: list[Divergence]
    max_prefix_logprob_diff: float | None  # None: no pair had generated-token logprobs to compare
    logprob_tolerance: float
    eps: float
    layer_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def real_divergences(self) -> int:
        return sum(d.kind == "real" for d in self.divergences)

    @property
    def near_ties(self) -> int:
        return sum(d.kind == "near_tie" for d in self.divergences)

    @property
    def passed(self) -> bool:
        return self.real_divergences == 0 and not self.problems

    def summary(self) -> dict[str, Any]:
        positions = [d.position for d in self.divergences]
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "samples": self.samples,
            "exact_match_rate": self.exact_matches / self.samples,
            "real_divergences": self.real_divergences,
            "near_ties": self.near_ties,
            "first_divergence_positions": {
                "min": min(positions) if positions else None,
                "median": float(np.median(positions)) if positions else None,
                "max": max(positions) if positions else None,
            },
            "max_prefix_logprob_diff": self.max_prefix_logprob_diff,
            "logprob_tolerance": self.logprob_tolerance,
            "eps": self.eps,
            "layer_stats": self.layer_stats,
            "problems": self.problems,
            "passed": self.passed,
            "divergences": [asdict(d) for d in self.divergences],
        }


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int | None:
    for i, (a, b) in enumerate(zip(reference, candidate, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))


def _has_top(gen: Generation, positions: int, k: int) -> bool:
    """Whether `gen` carries top-k logprobs for its first `positions` tokens (endpoints that return
    no generated-token logprobs, e.g. TGI's completions, give none)."""
    return gen.top_logprobs.ndim == 2 and gen.top_logprobs.shape[0] >= positions and gen.top_logprobs.shape[1] >= k


def classify(ref: Generation, cand: Generation, position: int, eps: float, decode: Any) -> Divergence:
    """Build the explanation of one divergence from the reference's distribution at `position`."""
    ref_token = ref.token_ids[position] if position < len(ref.token_ids) else None
    cand_token = cand.token_ids[position] if position < len(cand.token_ids) else None
    margin = rank = None
    kind = "real"
    # A reference without top-2 logprobs there (a generation-only endpoint) cannot tell a near-tie:
    # the divergence stays real, the conservative reading.
    if ref_token is not None and cand_token is not None and _has_top(ref, position + 1, 2):
        ids = ref.top_ids[position].tolist()
        lps = ref.top_logprobs[position]
        margin = float(lps[0] - lps[1])
        rank = ids.index(cand_token) + 1 if cand_token in ids else None
        if rank == 2 and margin <= eps:
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
    )


GENERATION_KINDS: tuple[LayerKind, ...] = ("speculation", "prefix_cache")


def without_generation_layers(stack: Stack) -> Stack:
    for kind in GENERATION_KINDS:
        stack = stack.without(kind)
    return stack


def reference_stack(stack: Stack) -> Stack:
    """The same stack without its generation-time layers (speculation, prefix caching).

    These kinds do not change the teacher-forced distribution, so fidelity cannot see them; the
    reference of their equivalence check keeps every other layer (the quantizers), so that their
    effect is not blamed on speculation. A lossy method of these kinds (typical acceptance) is
    checked the same way and is expected to fail."""
    reference = without_generation_layers(stack)
    if not any(layer.kind in GENERATION_KINDS for layer in stack.layers):
        raise ConfigError(f"stack '{stack.name}' has no speculation or prefix_cache layer to check for equivalence")
    return reference


class GenerationCheckpoint(Protocol):
    def load(self, name: str) -> dict[str, Any] | None: ...

    def save(self, name: str, record: dict[str, Any]) -> None: ...


def _to_record(gen: Generation) -> dict[str, Any]:
    return {
        "prompt_ids": gen.prompt_ids,
        "token_ids": gen.token_ids,
        "text": gen.text,
        "top_ids": gen.top_ids.tolist(),
        "top_logprobs": gen.top_logprobs.tolist(),
        "finish_reason": gen.finish_reason,
        "stats": gen.stats,
    }


def _from_record(record: dict[str, Any]) -> Generation:
    from qualgate.backends.base import Generation

    return Generation(
        record["prompt_ids"],
        record["token_ids"],
        record["text"],
        np.asarray(record["top_ids"], dtype=np.int64),
        np.asarray(record["top_logprobs"]),
        record["finish_reason"],
        record["stats"],
    )


def _generate(
    session: Session, prompt: Prompt, config: EquivalenceConfig, name: str, checkpoint: GenerationCheckpoint | None
) -> Generation:
    saved = checkpoint.load(name) if checkpoint is not None else None
    if saved is not None:
        return _from_record(saved)
    [gen] = session.generate([prompt.text], max_new_tokens=config.max_new_tokens, top_k=config.top_k)
    if checkpoint is not None:
        checkpoint.save(name, _to_record(gen))
    return gen


def aggregate_layer_stats(generations: list[Generation]) -> dict[str, dict[str, float]]:
    """Layer statistics from each generation's own counters, so they add up across a resumed run."""
    from qualgate.layers.prefix_cache import PrefixCacheStats
    from qualgate.layers.speculation import SpeculationStats

    totals: dict[str, float] = {}
    for gen in generations:
        for key, value in gen.stats.items():
            totals[key] = totals.get(key, 0) + value
    stats: dict[str, dict[str, float]] = {}
    if "proposed_tokens" in totals:
        stats["speculation"] = SpeculationStats(
            int(totals["verify_steps"]), int(totals["proposed_tokens"]), int(totals["accepted_tokens"])
        ).as_dict()
    if "prefix_queries" in totals:
        stats["prefix_cache"] = PrefixCacheStats(
            int(totals["prefix_queries"]),
            int(totals["prefix_hits"]),
            int(totals["prefix_prompt_tokens"]),
            int(totals["prefix_reused_tokens"]),
        ).as_dict()
    return stats


def run_equivalence(
    candidate: Session,
    reference: Session,
    prompts: list[Prompt],
    config: EquivalenceConfig,
    checkpoint: GenerationCheckpoint | None = None,
) -> EquivalenceResult:
    """Greedy generation on both sides; with a prefix cache every prompt runs cold, then warm.

    With a checkpoint, every generation is saved as it finishes and reused on a rerun. A prefix-cache
    check is not checkpointed: its warm runs depend on the cache its cold runs filled in this session.
    """
    prefix = candidate.stack.layer("prefix_cache") is not None
    runs = ["cold", "warm"] if prefix else ["single"]
    saves = None if prefix else checkpoint
    ref_gens = [_generate(reference, p, config, f"reference-{i}", saves) for i, p in enumerate(prompts)]
    divergences: list[Divergence] = []
    cand_all: list[Generation] = []
    exact = samples = 0
    max_diff: float | None = None
    for run in runs:
        cand_gens = [_generate(candidate, p, config, f"{run}-{i}", saves) for i, p in enumerate(prompts)]
        cand_all.extend(cand_gens)
        for prompt, ref, cand in zip(prompts, ref_gens, cand_gens, strict=True):
            samples += 1
            position = first_divergence(ref.token_ids, cand.token_ids)
            shared = len(ref.token_ids) if position is None else position
            if shared and _has_top(ref, shared, 1) and _has_top(cand, shared, 1):
                # Teacher-forced check on the shared prefix: the chosen tokens' logprobs of both sides.
                diff = np.abs(ref.top_logprobs[:shared, 0] - cand.top_logprobs[:shared, 0])
                max_diff = max(max_diff or 0.0, float(diff.max()))
            if position is None:
                exact += 1
                continue
            found = classify(ref, cand, position, config.eps, reference.decode)
            divergences.append(Divergence(**{**asdict(found), "prompt_id": prompt.id, "run": run}))
    # Per-generation counters when the backend reports them (they survive a resume); else the session's.
    stats = aggregate_layer_stats(cand_all) or candidate.layer_stats()
    problems = []
    if max_diff is not None and max_diff > config.logprob_tolerance:
        problems.append(f"shared-prefix logprobs differ by {max_diff:.3g} > {config.logprob_tolerance:g}")
    prefix_stats = stats.get("prefix_cache")
    if prefix_stats is not None and prefix_stats.get("hits", 0) == 0:
        problems.append("the prefix cache never hit: prefix caching was not exercised by this prompt set")
    return EquivalenceResult(
        reference=reference.stack.name,
        candidate=candidate.stack.name,
        samples=samples,
        exact_matches=exact,
        divergences=divergences,
        max_prefix_logprob_diff=max_diff,
        logprob_tolerance=config.logprob_tolerance,
        eps=config.eps,
        layer_stats=stats,
        problems=problems,
    )
