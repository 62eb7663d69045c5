"""Equivalence: lossless layers must reproduce the greedy tokens of the same stack without them.

Tokens are compared up to the first difference. A divergence is a near-tie (numerics, reported) when
each side's token is in the other side's top-k and the reference's top-1/top-2 margin there is within
max(eps, the measured noise margin); anything else is a real divergence (a bug). On the shared prefix
the chosen tokens' logprobs may drift by the reference stack's own noise, measured on this machine by
scoring its sequences in the candidate's shapes (qualgate.instruments.shapes), never a constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qualgate.instruments.equivalence.probes import Prompt, prefix_coverage
from qualgate.instruments.shapes import ShapeNoise, candidate_schedules, measure_shape_noise
from qualgate.jsonl import prompt_id, read_prompt_rows

# The calibrated tolerance: the candidate's drift is the same kernel noise the calibration samples (every
# verify-block phase, every prefix boundary), so its worst position sits near the noise's own tail: on
# the bundled stacks the candidate's max was at most 1.2x the noise's 99.9th percentile. Four times it
# leaves room for positions the calibration did not sample and stays far below what a real bug does (a
# stale cache block or a lossy acceptance rule moves chosen-token logprobs by 0.05-1 nats). The floor
# keeps float32 stacks, whose noise is ~1e-6, from failing on differences no kernel change can avoid.
TOLERANCE_FACTOR = 4.0
TOLERANCE_FLOOR = 1e-4
# A calibrated tolerance above this is far above float noise: the summary names the cause.
NOISY_REFERENCE = 0.01

if TYPE_CHECKING:
    from qualgate.backends.base import Generation, Session
    from qualgate.stack import Stack


class EquivalenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The one default for every caller (pipelines, `qualgate equivalence`): 24 tokens reach past the
    # first near-tie of most prompts, at half the cost of 48.
    max_new_tokens: int = Field(24, ge=1)
    eps: float = Field(0.125, ge=0, description="top-2 margin (nats) under which a divergence is a near-tie")
    logprob_tolerance: float | None = Field(
        None, ge=0, description="max |dlogprob| on the shared prefix; None: calibrated from the noise floor"
    )
    tolerance_factor: float = Field(
        TOLERANCE_FACTOR, gt=0, description="calibrated tolerance = max(tolerance_floor, factor x floor p99.9)"
    )
    tolerance_floor: float = Field(TOLERANCE_FLOOR, ge=0, description="smallest calibrated tolerance (nats)")
    top_k: int = Field(4, ge=2, description="per-step top-k kept from both sides (>= 2 to classify)")


def load_prompts(path: Path) -> list[Prompt]:
    """JSONL with an `id` and a `prompt` per line; the file's stem is the prompts' group."""
    return [Prompt(prompt_id(path, n, row), row["prompt"], path.stem) for n, row in read_prompt_rows(path)]


@dataclass(frozen=True)
class Tolerance:
    """The shared-prefix logprob tolerance and where it came from."""

    value: float
    source: str  # "calibrated" or "pipeline"
    noise: dict[str, Any] | None  # the reference's noise floor (ShapeNoise.summary), when measured
    factor: float
    floor: float

    @property
    def margin(self) -> float:
        """How far the reference's top-1/top-2 margin was measured to move by noise: each of the two
        logprobs may move by the largest measured |delta logprob|, so their difference by twice it
        (without a measurement: twice the tolerance)."""
        if self.noise is None:
            return 2.0 * self.value
        return 2.0 * float(self.noise["logprob_delta"]["max"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "source": self.source,
            "factor": self.factor,
            "floor": self.floor,
            "noise_margin": self.margin,
            "noise_floor": self.noise,
        }


def calibrate(config: EquivalenceConfig, noise: ShapeNoise | None) -> Tolerance:
    """max(floor, factor x the noise floor's 99.9th percentile), or the pipeline's own value."""
    summary = noise.summary() if noise is not None and noise.logprob_delta.size else None
    if config.logprob_tolerance is not None:
        return Tolerance(config.logprob_tolerance, "pipeline", summary, config.tolerance_factor, config.tolerance_floor)
    p999 = summary["logprob_delta"]["p99.9"] if summary else 0.0
    value = max(config.tolerance_floor, config.tolerance_factor * p999)
    return Tolerance(value, "calibrated", summary, config.tolerance_factor, config.tolerance_floor)


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
    tolerance: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, float] | None = None  # p50 / p99 / max of the shared-prefix |dlogprob|
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    coverage: dict[str, Any] = field(default_factory=dict)

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
            "exact_match_rate": self.exact_matches / self.samples if self.samples else 0.0,
            "real_divergences": self.real_divergences,
            "near_ties": self.near_ties,
            "first_divergence_positions": {
                "min": min(positions) if positions else None,
                "median": float(np.median(positions)) if positions else None,
                "max": max(positions) if positions else None,
            },
            "max_prefix_logprob_diff": self.max_prefix_logprob_diff,
            "prefix_logprob_drift": self.drift,
            "logprob_tolerance": self.logprob_tolerance,
            "tolerance": self.tolerance,
            "eps": self.eps,
            "layer_stats": self.layer_stats,
            "groups": self.groups,
            "coverage": self.coverage,
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
    """Build the explanation of one divergence at `position` (the first differing one).

    A near-tie needs all three: the candidate's token in the reference's top-k, the reference's token
    in the candidate's top-k, and the reference's top-1/top-2 margin within `eps` (the caller passes
    max(eps, the measured noise margin)). Without top-k logprobs on either side (a generation-only
    endpoint) it cannot be told apart from a bug: the divergence stays real, the conservative reading."""
    ref_token = ref.token_ids[position] if position < len(ref.token_ids) else None
    cand_token = cand.token_ids[position] if position < len(cand.token_ids) else None
    margin = rank = back_rank = None
    kind = "real"
    if ref_token is not None and cand_token is not None and _has_top(ref, position + 1, 2):
        ids = ref.top_ids[position].tolist()
        lps = ref.top_logprobs[position]
        rank = ids.index(cand_token) + 1 if cand_token in ids else None
        # The reference's preference for its own token over the candidate's: the top-1/top-2 margin
        # when the candidate took the second choice, wider (and so stricter) for a lower rank.
        margin = float(lps[0] - lps[(rank or 2) - 1])
        if _has_top(cand, position + 1, 2):
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
    [gen] = session.generate([prompt.source], max_new_tokens=config.max_new_tokens, top_k=config.top_k)
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


def measure_noise(reference: Session, candidate_stack: Stack, generations: Sequence[Generation]) -> ShapeNoise | None:
    """The reference stack's own noise: its greedy sequences scored in the candidate's shapes.

    None when it cannot be measured: an endpoint whose prompt logprobs are unusable (generation-only),
    or that returns no logprobs of its generated tokens to compare a prefill with."""
    probe = getattr(reference, "probe", None)
    if probe is not None and not getattr(probe, "scoring", True):
        return None
    if not reference.capabilities.block_scoring and not all(_has_top(g, len(g.token_ids), 1) for g in generations):
        return None
    return measure_shape_noise(
        reference,
        [(list(g.prompt_ids), list(g.token_ids)) for g in generations],
        lambda prompt_len, n_new, index: candidate_schedules(candidate_stack, prompt_len, n_new, seed=index),
        recorded=[g.top_logprobs[:, 0] if _has_top(g, len(g.token_ids), 1) else np.zeros(0) for g in generations],
    )


def _group_stats(
    prompts: Sequence[Prompt], runs: Sequence[tuple[str, list[Generation]]], divergences: Sequence[Divergence]
) -> dict[str, dict[str, Any]]:
    """Samples, exact matches, divergences and speculation acceptance per prompt group."""
    groups: dict[str, dict[str, Any]] = {}
    for _run, gens in runs:
        for prompt, gen in zip(prompts, gens, strict=True):
            g = groups.setdefault(
                prompt.group or "prompts",
                {"samples": 0, "real_divergences": 0, "near_ties": 0, "proposed": 0.0, "accepted": 0.0},
            )
            g["samples"] += 1
            g["proposed"] += gen.stats.get("proposed_tokens", 0.0)
            g["accepted"] += gen.stats.get("accepted_tokens", 0.0)
    for d in divergences:
        g = groups[d.group or "prompts"]
        g["real_divergences" if d.kind == "real" else "near_ties"] += 1
    for g in groups.values():
        proposed, accepted = g.pop("proposed"), g.pop("accepted")
        if proposed:
            g["acceptance_rate"] = accepted / proposed
    groups.update(_acceptance_thirds(prompts, runs, divergences))
    return groups


def _acceptance_thirds(
    prompts: Sequence[Prompt], runs: Sequence[tuple[str, list[Generation]]], divergences: Sequence[Divergence]
) -> dict[str, dict[str, Any]]:
    """The top and bottom third of samples by measured acceptance: where verification did the most and
    the least work, whatever the prompts were built for."""
    samples = [
        (gen.stats["accepted_tokens"] / gen.stats["proposed_tokens"], prompt.id, run)
        for run, gens in runs
        for prompt, gen in zip(prompts, gens, strict=True)
        if gen.stats.get("proposed_tokens")
    ]
    if len(samples) < 3:
        return {}
    samples.sort()
    third = len(samples) // 3
    out = {}
    for name, part in (("acceptance:measured-low", samples[:third]), ("acceptance:measured-high", samples[-third:])):
        keys = {(pid, run) for _, pid, run in part}
        found = [d for d in divergences if (d.prompt_id, d.run) in keys]
        out[name] = {
            "samples": len(part),
            "real_divergences": sum(d.kind == "real" for d in found),
            "near_ties": sum(d.kind != "real" for d in found),
            "acceptance_rate": float(np.mean([rate for rate, _, _ in part])),
        }
    return out


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
    prefix_layer = candidate.stack.layer("prefix_cache")
    runs = ["cold", "warm"] if prefix_layer is not None else ["single"]
    saves = None if prefix_layer is not None else checkpoint
    ref_gens = [_generate(reference, p, config, f"reference-{i}", saves) for i, p in enumerate(prompts)]
    tolerance = calibrate(config, measure_noise(reference, candidate.stack, ref_gens))
    tolerance_summary = tolerance.as_dict()
    if tolerance.source == "calibrated" and tolerance.value > NOISY_REFERENCE:
        # Not absorbed silently: the reference's own numbers move with the shapes; the KV layer that
        # makes them move is gated on it (decode path, shape_kl), and the summary says so here.
        tolerance_summary["note"] = (
            f"the reference '{reference.stack.name}' moves its own chosen-token logprobs by up to "
            f"{tolerance.noise['logprob_delta']['max'] if tolerance.noise else 0:.3g} nats between serving shapes; "
            "that is its KV layer's shape dependence (shape_kl), not this layer's"
        )
    near_tie_margin = max(config.eps, tolerance.margin)
    divergences: list[Divergence] = []
    cand_runs: list[tuple[str, list[Generation]]] = []
    drifts: list[np.ndarray] = []
    exact = samples = 0
    for run in runs:
        cand_gens = [_generate(candidate, p, config, f"{run}-{i}", saves) for i, p in enumerate(prompts)]
        cand_runs.append((run, cand_gens))
        for prompt, ref, cand in zip(prompts, ref_gens, cand_gens, strict=True):
            samples += 1
            position = first_divergence(ref.token_ids, cand.token_ids)
            shared = len(ref.token_ids) if position is None else position
            if shared and _has_top(ref, shared, 1) and _has_top(cand, shared, 1):
                # Teacher-forced check on the shared prefix only: the chosen tokens' logprobs of both sides.
                # float64: a resumed run reads them back from JSON as float64, and its quantiles must not move.
                ref_lp = np.asarray(ref.top_logprobs[:shared, 0], dtype=np.float64)
                drifts.append(np.abs(ref_lp - np.asarray(cand.top_logprobs[:shared, 0], dtype=np.float64)))
            if position is None:
                exact += 1
                continue
            found = classify(ref, cand, position, near_tie_margin, reference.decode)
            divergences.append(
                Divergence(**{**asdict(found), "prompt_id": prompt.id, "run": run, "group": prompt.group})
            )
    cand_all = [gen for _, gens in cand_runs for gen in gens]
    # Per-generation counters when the backend reports them (they survive a resume); else the session's.
    stats = aggregate_layer_stats(cand_all) or candidate.layer_stats()
    drift = np.concatenate(drifts) if drifts else None
    drift_summary = None
    problems = []
    if drift is not None and drift.size:
        drift_summary = {
            "p50": float(np.percentile(drift, 50)),
            "p99": float(np.percentile(drift, 99)),
            "max": float(drift.max()),
            "positions": int(drift.size),
        }
        if drift_summary["max"] > tolerance.value:
            problems.append(
                f"shared-prefix logprobs differ by {drift_summary['max']:.3g} > tolerance {tolerance.value:.3g} "
                f"({tolerance.source}; p99 {drift_summary['p99']:.3g})"
            )
    coverage: dict[str, Any] = {}
    if prefix_layer is not None:
        block = int(getattr(prefix_layer.params, "block_size", 16))
        order = [list(gen.prompt_ids) for _, gens in cand_runs for gen in gens]
        crossed = prefix_coverage(order, block)
        coverage = {"block_size": block, "lookups": len(order), "crossed_differing_block": crossed}
        if crossed == 0:
            problems.append(
                "prefix caching not exercised: no lookup crossed a differing token inside a reusable block "
                "(prefix probes are cut from the domain text: keep equivalence.probes on and name a probe_text "
                "or a fidelity golden)"
            )
        prefix_stats = stats.get("prefix_cache")
        if prefix_stats is not None and prefix_stats.get("hits", 0) == 0:
            problems.append("the prefix cache never hit: prefix caching was not exercised by this prompt set")
    return EquivalenceResult(
        reference=reference.stack.name,
        candidate=candidate.stack.name,
        samples=samples,
        exact_matches=exact,
        divergences=divergences,
        max_prefix_logprob_diff=None if drift_summary is None else drift_summary["max"],
        logprob_tolerance=tolerance.value,
        eps=config.eps,
        layer_stats=stats,
        problems=problems,
        tolerance=tolerance_summary,
        drift=drift_summary,
        groups=_group_stats(prompts, cand_runs, divergences),
        coverage=coverage,
    )
