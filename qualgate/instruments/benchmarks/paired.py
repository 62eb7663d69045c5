"""Paired comparison of one task's per-sample results: accuracy +- stderr,
recovery, flips b and c, McNemar's exact test, the paired difference with its interval, and Holm's
correction across tasks. Pure functions over {doc_id: sample} maps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qualgate.errors import ConfigError
from qualgate.stats import Estimate, proportion, zero_events_bound


@dataclass(frozen=True)
class Sample:
    doc_id: int
    correct: float  # the task's primary metric for this document: 0 or 1
    prompt_hash: str  # of the rendered request(s): must be identical on both sides
    response: str = ""  # what the model answered (truncated), for the flips list


@dataclass
class TaskComparison:
    task: str
    metric: str
    n: int
    accuracy_baseline: Estimate
    accuracy_candidate: Estimate
    difference: Estimate  # (c - b) / n, candidate minus baseline
    recovery: Estimate  # accuracy_candidate / accuracy_baseline
    b: int  # right under the baseline, wrong under the candidate
    c: int  # wrong under the baseline, right under the candidate
    mcnemar_p: float
    holm_p: float = float("nan")
    flips: list[dict[str, Any]] = field(default_factory=list)

    @property
    def flip_rate(self) -> float:
        return (self.b + self.c) / self.n

    def summary(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "n": self.n,
            "accuracy_baseline": self.accuracy_baseline.as_dict(),
            "accuracy_candidate": self.accuracy_candidate.as_dict(),
            "difference": self.difference.as_dict(),
            "recovery": self.recovery.as_dict(),
            "flips_b": self.b,
            "flips_c": self.c,
            "flip_rate": self.flip_rate,
            "mcnemar_p": self.mcnemar_p,
            "holm_p": self.holm_p,
        }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided binomial test of b successes in b + c trials at 1/2 (1.0 when nothing flipped)."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def paired_difference(b: int, c: int, n: int) -> Estimate:
    """D = (c - b) / n with the paired SE sqrt(((b + c) / n - D^2) / n). With no flips at all that SE
    is 0, a zero-width interval that would certify a perfect recovery from any n; then the interval is
    the exact 95% bound on the flip rate instead (1 - 0.025^(1/n), about 3.7/n, the two-sided "rule of three")."""
    d = (c - b) / n
    variance = ((b + c) / n - d * d) / n
    if b + c == 0:
        bound = zero_events_bound(n)
        return Estimate(0.0, 0.0, -bound, bound)
    return Estimate.normal(d, math.sqrt(max(variance, 0.0)))


def recovery_estimate(diff: Estimate, accuracy_baseline: float, accuracy_candidate: float) -> Estimate:
    """recovery = acc_Q / acc_P = 1 + D / acc_P; its interval from the paired difference D's, the
    baseline's accuracy held fixed. NaN (undefined) when the baseline solves nothing."""
    if accuracy_baseline > 0:
        return Estimate(
            accuracy_candidate / accuracy_baseline,
            diff.se / accuracy_baseline,
            1 + diff.low / accuracy_baseline,
            1 + diff.high / accuracy_baseline,
        )
    return Estimate(float("nan"), float("nan"), float("nan"), float("nan"))


def compare_task(task: str, metric: str, baseline: dict[int, Sample], candidate: dict[int, Sample]) -> TaskComparison:
    if set(baseline) != set(candidate):
        missing = sorted(set(baseline) ^ set(candidate))[:5]
        raise ConfigError(f"task {task}: baseline and candidate scored different documents (e.g. doc_id {missing})")
    changed = [d for d in baseline if baseline[d].prompt_hash != candidate[d].prompt_hash]
    if changed:
        raise ConfigError(
            f"task {task}: the rendered prompt of {len(changed)} documents differs between baseline and candidate "
            f"(first doc_id {sorted(changed)[0]}); both sides must see the same prompt (check chat template, "
            "few-shot seed and task version)"
        )
    for side in (baseline, candidate):
        odd = [s.correct for s in side.values() if s.correct not in (0.0, 1.0)]
        if odd:
            raise ConfigError(
                f"task {task}: metric {metric} is not 0/1 per document (got {odd[0]}); flips and McNemar need a "
                "right/wrong metric such as acc or exact_match"
            )
    ids = sorted(baseline)
    n = len(ids)
    if n < 2:
        raise ConfigError(f"task {task}: {n} documents; a paired comparison needs at least 2")
    p = [baseline[d].correct for d in ids]
    q = [candidate[d].correct for d in ids]
    b = sum(1 for x, y in zip(p, q, strict=True) if x == 1 and y == 0)
    c = sum(1 for x, y in zip(p, q, strict=True) if x == 0 and y == 1)
    acc_p, acc_q = proportion(np.asarray(p)), proportion(np.asarray(q))
    diff = paired_difference(b, c, n)
    recovery = recovery_estimate(diff, acc_p.value, acc_q.value)
    flips = [
        {
            "doc_id": d,
            "kind": "b" if baseline[d].correct == 1 else "c",
            "baseline": baseline[d].response,
            "candidate": candidate[d].response,
        }
        for d in ids
        if baseline[d].correct != candidate[d].correct
    ]
    return TaskComparison(task, metric, n, acc_p, acc_q, diff, recovery, b, c, mcnemar_exact(b, c), flips=flips)


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
