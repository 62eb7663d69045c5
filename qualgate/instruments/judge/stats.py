"""Judge statistics: pairwise in both orders (an order-dependent verdict is a tie),
win / tie / loss, net loss with a paired bootstrap interval, position consistency, length delta;
single-answer grades with Wilcoxon's signed-rank test and a bootstrap interval of the mean delta."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qualgate.stats import Estimate


def combine(first: str | None, second: str | None) -> tuple[str, bool]:
    """Outcome for the candidate from (order 1: A = baseline, B = candidate) and (order 2: swapped).
    Returns (win | tie | loss | unparsed, consistent)."""
    if first is None or second is None:
        return "unparsed", False
    to_candidate_1 = {"A": "loss", "B": "win", "tie": "tie"}[first]
    to_candidate_2 = {"A": "win", "B": "loss", "tie": "tie"}[second]
    if to_candidate_1 == to_candidate_2:
        return to_candidate_1, True
    return "tie", False  # the verdict followed the position, not the answers


def bootstrap_mean(values: np.ndarray, resamples: int, seed: int) -> Estimate:
    """Mean with a percentile bootstrap 95% interval, resampling prompts (the paired unit)."""
    if values.size == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(float(values.mean()), float(means.std(ddof=1)), float(low), float(high))


@dataclass
class PairwiseSummary:
    n: int
    win: int
    tie: int
    loss: int
    unparsed: int
    net_loss: Estimate
    consistency: float
    length_delta: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "win": self.win,
            "tie": self.tie,
            "loss": self.loss,
            "unparsed": self.unparsed,
            "net_loss": self.net_loss.as_dict(),
            "position_consistency": self.consistency,
            "length_delta": self.length_delta,
        }


def pairwise_summary(
    outcomes: list[tuple[str, bool]], length_deltas: list[int], resamples: int, seed: int
) -> PairwiseSummary:
    parsed = [(o, c) for o, c in outcomes if o != "unparsed"]
    # net loss per prompt: +1 loss, -1 win, 0 tie; its mean is (loss - win) / n
    per_prompt = np.array([{"loss": 1.0, "win": -1.0, "tie": 0.0}[o] for o, _ in parsed])
    return PairwiseSummary(
        n=len(parsed),
        win=sum(o == "win" for o, _ in parsed),
        tie=sum(o == "tie" for o, _ in parsed),
        loss=sum(o == "loss" for o, _ in parsed),
        unparsed=len(outcomes) - len(parsed),
        net_loss=bootstrap_mean(per_prompt, resamples, seed),
        consistency=float(np.mean([c for _, c in parsed])) if parsed else float("nan"),
        length_delta=float(np.mean(length_deltas)) if length_deltas else float("nan"),
    )


def grade_summary(baseline: list[int | None], candidate: list[int | None], resamples: int, seed: int) -> dict[str, Any]:
    pairs = [(b, c) for b, c in zip(baseline, candidate, strict=True) if b is not None and c is not None]
    deltas = np.array([c - b for b, c in pairs], dtype=float)
    p_value = float("nan")
    if deltas.size and np.any(deltas != 0):
        from scipy.stats import wilcoxon

        p_value = float(wilcoxon(deltas, zero_method="wilcox").pvalue)
    elif deltas.size:
        p_value = 1.0
    return {
        "n": int(deltas.size),
        "unparsed": len(baseline) - len(pairs),
        "mean_baseline": float(np.mean([b for b, _ in pairs])) if pairs else float("nan"),
        "mean_candidate": float(np.mean([c for _, c in pairs])) if pairs else float("nan"),
        "mean_delta": bootstrap_mean(deltas, resamples, seed).as_dict(),
        "wilcoxon_p": p_value,
    }
