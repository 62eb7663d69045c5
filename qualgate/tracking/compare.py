"""Regression against the last deploy: this run's stacks beside the latest passing run of the same
pipeline in MLflow. Each side is an interval from its own run; a metric is flagged only when the two
intervals do not overlap (both runs score the same golden text, so this is conservative, not paired).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qualgate.tracking.mlflow_log import Tracker

# The headline estimates of every stack, compared run against run.
COMPARED = ("kl_mean", "ppl_ratio", "ln_ppl_ratio", "same_top1", "real_divergences")


@dataclass
class Change:
    stack: str
    metric: str
    now: float
    now_low: float | None
    now_high: float | None
    then: float
    then_low: float | None
    then_high: float | None

    @property
    def delta(self) -> float:
        return self.now - self.then

    @property
    def significant(self) -> bool:
        if None in (self.now_low, self.now_high, self.then_low, self.then_high):
            return self.now != self.then  # counts (real divergences) have no interval
        assert self.now_low is not None and self.now_high is not None
        assert self.then_low is not None and self.then_high is not None
        return self.now_low > self.then_high or self.now_high < self.then_low

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "delta": self.delta, "significant": self.significant}


def previous_passing_run(tracker: Tracker, experiment_id: str, pipeline: str, before_ms: int) -> Any | None:
    """The latest complete, non-failing run of `pipeline` that started before `before_ms`."""
    runs = tracker.runs(
        experiment_id,
        f"tags.`qualgate.pipeline` = '{pipeline}' and tags.`qualgate.kind` = 'run' "
        f"and tags.`qualgate.complete` = 'true' and tags.`qualgate.verdict` != 'fail' "
        f"and attributes.start_time < {before_ms} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def stack_metrics(tracker: Tracker, experiment_id: str, parent_id: str) -> dict[str, dict[str, float]]:
    children = tracker.runs(experiment_id, f"tags.`mlflow.parentRunId` = '{parent_id}'")
    # A control is built to be broken: how broken it reads from night to night is no change of the stacks.
    return {
        run.data.tags.get("qualgate.stack", run.info.run_name): dict(run.data.metrics)
        for run in children
        if "qualgate.control" not in run.data.tags
    }


def _estimate(metrics: dict[str, float], prefix: str, name: str) -> tuple[float, float | None, float | None] | None:
    key = f"{prefix}/{name}"
    if key not in metrics:
        return None
    return metrics[key], metrics.get(f"{key}_low"), metrics.get(f"{key}_high")


def changes(now: dict[str, dict[str, float]], then: dict[str, dict[str, float]]) -> list[Change]:
    found = []
    for stack in sorted(set(now) & set(then)):
        for metric in COMPARED:
            prefix = "equivalence" if metric == "real_divergences" else "fidelity"
            a, b = _estimate(now[stack], prefix, metric), _estimate(then[stack], prefix, metric)
            if a is not None and b is not None:
                found.append(Change(stack, metric, *a, *b))
    return found
