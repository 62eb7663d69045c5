"""Equivalence: lossless layers must reproduce the greedy tokens of the same stack without them.

Tokens are compared up to the first difference. A divergence is a near-tie (numerics, reported) when
each side's token is in the other side's top-k and the reference's top-1/top-2 margin there is within
max(eps, the measured noise margin); anything else is a real divergence (a bug). On the shared prefix
the chosen tokens' logprobs may drift by the reference stack's own noise, measured on this machine by
scoring its sequences in the candidate's shapes (qualgate.instruments.shapes), never a constant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from qualgate.chat import prompt_source
from qualgate.instruments.equivalence.counters import aggregate_layer_stats, group_stats
from qualgate.instruments.equivalence.divergence import Divergence, classify, first_divergence, has_top
from qualgate.instruments.equivalence.probes import Prompt, prefix_coverage
from qualgate.instruments.equivalence.tolerance import (
    NOISY_REFERENCE,
    EquivalenceConfig,
    calibrate,
    measure_noise,
)
from qualgate.jsonl import prompt_id, read_prompt_rows

if TYPE_CHECKING:
    from qualgate.backends.base import Generation, Session


def load_prompts(path: Path) -> list[Prompt]:
    """JSONL with an `id` and a `prompt` per line; the file's stem is the prompts' group."""
    return [Prompt(prompt_id(path, n, row), row["prompt"], path.stem) for n, row in read_prompt_rows(path)]


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
    source = prompt_source(session, prompt.source, config.chat_template)
    [gen] = session.generate([source], max_new_tokens=config.max_new_tokens, top_k=config.top_k)
    if checkpoint is not None:
        checkpoint.save(name, _to_record(gen))
    return gen


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
            if shared and has_top(ref, shared, 1) and has_top(cand, shared, 1):
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
        groups=group_stats(prompts, cand_runs, divergences),
        coverage=coverage,
    )
