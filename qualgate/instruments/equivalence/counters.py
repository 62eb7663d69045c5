"""What a lossless layer's counters say over a check: acceptance and prefix-cache hits summed over the
candidate's generations, and exact-match, divergences and acceptance per prompt group (and per third of
acceptance rate, where a lossy acceptance rule shows first)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qualgate.instruments.equivalence.divergence import Divergence
from qualgate.instruments.equivalence.probes import Prompt

if TYPE_CHECKING:
    from qualgate.backends.base import Generation


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


def group_stats(
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
    groups.update(acceptance_thirds(prompts, runs, divergences))
    return groups


def acceptance_thirds(
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
