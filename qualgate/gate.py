"""The gate: findings (metric values with intervals) and a policy become pass / warn / fail.

Non-inferiority: a finding fails when the pessimistic end of its interval crosses the fail threshold,
warns when it crosses the warn threshold, passes otherwise, with two refinements a reviewer of a CI
gate expects:

- *inconclusive*: the point estimate is within every threshold and only the interval crosses one. That
  is a lack of samples, not measured degradation: the finding says so, with the sample size that would
  let the interval clear the threshold at the observed rate (`n_needed`). The pipeline's policy
  (`gate.inconclusive: pass | warn | fail`, default warn) decides what it counts as.
- *error*: a NaN or infinite value or bound cannot be compared with a threshold; a gated finding with one
  never passes. It fails, naming its cause.

Pure functions; nothing here runs a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from qualgate.stats import zero_events_bound, zero_events_n

Status = Literal["pass", "inconclusive", "warn", "fail", "error"]
Policy = Literal["pass", "warn", "fail"]
GatedStatus = Literal["pass", "warn", "fail"]
STATUS_ORDER = {"pass": 0, "warn": 1, "fail": 2}
# How an interval's half-width shrinks as the sample grows, for n_needed: "normal" intervals by
# 1/sqrt(n); "zero-events" ones (an exact bound after n trials without an event) as 1 - alpha^(1/n).
IntervalKind = Literal["normal", "zero-events"]
# metric -> bigger is worse, for every metric an instrument declares (filled as instruments register:
# qualgate.instruments.base). A metric no instrument declares is taken as bigger-is-worse.
METRIC_DIRECTION: dict[str, bool] = {}


@dataclass(frozen=True)
class Finding:
    instrument: str
    metric: str
    value: float
    low: float | None
    high: float | None
    warn: float | None = None
    fail: float | None = None
    status: Status = "pass"
    reason: str = ""
    n: int | None = None  # the sample behind the interval, in `unit`s (the clustering unit)
    unit: str = ""
    interval: IntervalKind = "normal"
    cause: str = ""  # what the instrument knows about a value that may be undefined (e.g. NaN recovery)
    n_needed: int | None = None  # inconclusive: the sample that would clear the threshold at this rate
    gated: GatedStatus = "pass"  # what the status counts as in the verdict (inconclusive: the policy)

    @property
    def bigger_is_worse(self) -> bool:
        return METRIC_DIRECTION.get(self.metric, True)

    @property
    def side(self) -> str:
        return "upper" if self.bigger_is_worse else "lower"

    @property
    def judged_as(self) -> str:
        """What the gate compares, for reasons: the interval's bad end, or the value of a count."""
        bound = self.high if self.bigger_is_worse else self.low
        return "value" if bound is None else f"{self.side} bound"

    @property
    def pessimistic(self) -> float:
        """The interval's end on the bad side; the value itself when the finding has no interval."""
        bound = self.high if self.bigger_is_worse else self.low
        return self.value if bound is None else bound

    def crosses(self, x: float, threshold: float | None) -> bool:
        if threshold is None:
            return False
        return x > threshold if self.bigger_is_worse else x < threshold

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pessimistic": self.pessimistic}


def _non_finite(finding: Finding) -> str | None:
    """Which number of the finding is NaN or infinite (None when all are finite)."""
    numbers = {"value": finding.value, finding.judged_as: finding.pessimistic}
    for name, x in numbers.items():
        if not math.isfinite(x):
            return f"{name} is {x}"
    return None


def n_to_reach(n: int | None, value: float, end: float, target: float, interval: IntervalKind) -> int | None:
    """The sample size at which the interval end `end` of an estimate `value` from `n` units would just
    reach `target`, if the estimate and its spread per unit stayed as observed. None without a sample
    size or when the estimate sits on the target (no sample size moves the end onto it)."""
    if n is None:
        return None
    width = abs(end - value)
    room = abs(target - value)
    if room == 0:
        return None
    if interval == "zero-events":
        # width = scale * (1 - alpha^(1/n)), the scale (e.g. 1 / baseline accuracy) fixed by the data
        scale = width / zero_events_bound(n)
        return zero_events_n(room / scale)
    return math.ceil(n * (width / room) ** 2 - 1e-9)


def n_needed(finding: Finding, threshold: float) -> int | None:
    """The sample size at which the finding's interval would just clear `threshold` (its pessimistic end
    reaching it)."""
    return n_to_reach(finding.n, finding.value, finding.pessimistic, threshold, finding.interval)


def judge(finding: Finding, warn: float | None, fail: float | None, inconclusive: Policy = "warn") -> Finding:
    """The finding's status against its thresholds and the pipeline's inconclusive policy."""
    f = replace(finding, warn=warn, fail=fail, n_needed=None)
    worst, metric, side = f.pessimistic, f.metric, f.judged_as
    if warn is None and fail is None:
        return replace(f, status="pass", gated="pass", reason=f"{metric} is not gated")
    broken = _non_finite(f)
    if broken is not None:
        cause = f.cause or "no cause recorded"
        return replace(
            f, status="error", gated="fail", reason=f"{metric} {broken}: {cause}; a gated value must be finite"
        )
    if f.crosses(f.value, fail) or (f.crosses(worst, fail) and f.crosses(f.value, warn)):
        # Measured past fail, or measured past warn with the interval reaching fail: non-inferiority fails.
        past = f"{side} {worst:.6g}" if f.crosses(worst, fail) else f"value {f.value:.6g}"
        return replace(f, status="fail", gated="fail", reason=f"{metric} {past} crosses fail {fail:g}")
    if f.crosses(f.value, warn):
        return replace(f, status="warn", gated="warn", reason=f"{metric} {side} {worst:.6g} crosses warn {warn:g}")
    crossed = warn if f.crosses(worst, warn) else fail if f.crosses(worst, fail) else None
    if crossed is None:
        return replace(f, status="pass", gated="pass", reason=f"{metric} {side} {worst:.6g} within thresholds")
    # The point estimate is within every threshold: the interval crosses one for lack of samples. To pass,
    # it must clear the lowest tier it crosses (warn when set).
    target = warn if warn is not None else fail
    assert target is not None
    needed = n_needed(f, target)
    if f.n is None:
        wanted, have = "n_needed unknown", "no sample size recorded"
    else:
        wanted = f"n_needed {needed}" if needed is not None else "no sample size clears it at this estimate"
        have = f"have {f.n} {f.unit}".strip()
    which = "warn" if crossed == warn else "fail"
    return replace(
        f,
        status="inconclusive",
        gated=inconclusive,
        n_needed=needed,
        reason=f"{metric} {f.value:.6g} within thresholds, but its {side} {worst:.6g} crosses {which} "
        f"{crossed:g} for lack of samples ({wanted}; {have})",
    )


def worst_status(statuses: list[str]) -> GatedStatus:
    """The worst of gated statuses (pass < warn < fail)."""
    worst = max(statuses, key=lambda s: STATUS_ORDER[s], default="pass")
    return worst  # type: ignore[return-value]


def verdict(findings: list[Finding]) -> dict[str, Any]:
    """A stack's verdict from its findings: the worst gated status, what was measured without the
    inconclusive ones, and those by name (so "WARN" for lack of samples reads apart from degradation)."""
    gated = worst_status([f.gated for f in findings])
    measured = worst_status([f.gated for f in findings if f.status != "inconclusive"])
    return {
        "verdict": gated,
        "measured": measured,
        "inconclusive": [f"{f.instrument}.{f.metric}" for f in findings if f.status == "inconclusive"],
    }
