"""The gate: findings (metric values with intervals) and a policy become pass / warn / fail.

Non-inferiority: a finding fails when the pessimistic end of its interval crosses the fail threshold,
warns when it crosses the warn threshold, passes otherwise. Pure functions; nothing here runs a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

STATUS_ORDER = {"pass": 0, "warn": 1, "fail": 2}
# metric -> (instrument, bigger is worse)
METRIC_DIRECTION: dict[str, bool] = {
    "kl_mean": True,
    "ppl_ratio": True,
    "same_top1": False,
    "real_divergences": True,
    "recovery": False,
    "net_loss": True,
    "shape_kl": True,
    "decode_kl_mean": True,
}


@dataclass(frozen=True)
class Finding:
    instrument: str
    metric: str
    value: float
    low: float | None
    high: float | None
    warn: float | None = None
    fail: float | None = None
    status: str = "pass"
    reason: str = ""

    @property
    def pessimistic(self) -> float:
        bigger_is_worse = METRIC_DIRECTION.get(self.metric, True)
        bound = self.high if bigger_is_worse else self.low
        return self.value if bound is None or bound != bound else bound  # NaN interval: use the value

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pessimistic": self.pessimistic}


def judge(finding: Finding, warn: float | None, fail: float | None) -> Finding:
    bigger_is_worse = METRIC_DIRECTION.get(finding.metric, True)
    worst = finding.pessimistic
    side = "upper" if bigger_is_worse else "lower"

    def crosses(threshold: float) -> bool:
        return worst > threshold if bigger_is_worse else worst < threshold

    status, reason = "pass", f"{finding.metric} {side} bound {worst:.6g} within thresholds"
    if warn is not None and crosses(warn):
        status, reason = "warn", f"{finding.metric} {side} bound {worst:.6g} crosses warn {warn:g}"
    if fail is not None and crosses(fail):
        status, reason = "fail", f"{finding.metric} {side} bound {worst:.6g} crosses fail {fail:g}"
    return Finding(
        finding.instrument, finding.metric, finding.value, finding.low, finding.high, warn, fail, status, reason
    )


def worst_status(statuses: list[str]) -> str:
    return max(statuses, key=lambda s: STATUS_ORDER[s], default="pass")
