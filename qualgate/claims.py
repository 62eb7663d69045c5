"""Published claims checked on your domain: "TurboQuant: <0.5% quality loss", "INT4 AWQ: <1% loss",
"FP8: near-lossless", written down as data and judged against what this run measured.

A claim names a stack of the run, a metric, a bound (`max:` or `min:`) and where it comes from. Its
verdict reads the metric's 95% interval, the same interval the gate uses:

- **holds**: the whole interval is within the bound (its end on the claim's bad side is inside it);
- **refuted**: the whole interval is past the bound (even its best end breaks the claim);
- **inconclusive**: the interval straddles the bound; the row says how many samples (in the metric's
  own unit: chunks, documents, prompts) would decide it if the estimate and its spread stayed as
  measured. A point estimate exactly on the bound has no such sample size.

Claims inform; they do not change the gate's verdict or the exit code (the gate's thresholds do that).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qualgate.errors import ConfigError
from qualgate.fmt import fmt, interval
from qualgate.gate import IntervalKind, n_to_reach
from qualgate.instruments.benchmarks.paired import paired_difference, recovery_estimate
from qualgate.registry import did_you_mean

ClaimVerdict = Literal["holds", "refuted", "inconclusive"]

# Benchmark metrics derived from the per-document flips, pooled over the stack's tasks (or one task):
# the absolute accuracy drop (baseline minus candidate accuracy, in accuracy points) and the relative one
# (the drop over the baseline's accuracy, 1 - recovery), both with the paired interval.
DERIVED = {
    "benchmark_accuracy_drop": "baseline minus candidate accuracy (paired, pooled over tasks)",
    "benchmark_relative_drop": "accuracy drop over baseline accuracy (1 - recovery, paired, pooled over tasks)",
    "recovery": "candidate over baseline accuracy (paired, pooled over tasks)",
}


class Claim(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stack: str = Field(description="the stack the claim is about, by its name in the run")
    metric: str = Field(description="a gated metric (kl_mean, same_top1, ppl_ratio, ...) or a benchmark_* one")
    max: float | None = Field(default=None, allow_inf_nan=False)
    min: float | None = Field(default=None, allow_inf_nan=False)
    task: str | None = Field(default=None, description="benchmark metrics: one task (default: all, pooled)")
    source: str = Field(default="", description="where the claim was published")
    statement: str = Field(default="", description="the claim in its own words")

    @model_validator(mode="after")
    def _one_bound(self) -> Claim:
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of max or min (the claimed bound)")
        return self

    @property
    def bound(self) -> float:
        return float(self.max if self.max is not None else self.min)  # type: ignore[arg-type]

    @property
    def upper(self) -> bool:
        """True for a `max:` claim (bigger is worse for it)."""
        return self.max is not None


def claim_metrics(gated: Iterable[str]) -> list[str]:
    return sorted({*gated, *DERIVED})


def check_claims(claims: Sequence[Claim], stacks: Sequence[str], gated: Iterable[str], where: str) -> None:
    """Every claim names a stack this run measures and a metric it can read (exit 2 otherwise)."""
    known = claim_metrics(gated)
    for i, claim in enumerate(claims):
        if claim.stack not in stacks:
            raise ConfigError(
                f"{where}: claims[{i}].stack '{claim.stack}' is not a stack of this run; "
                f"{did_you_mean(claim.stack, list(stacks))}"
            )
        if claim.metric not in known:
            raise ConfigError(
                f"{where}: claims[{i}].metric '{claim.metric}' is not measured; {did_you_mean(claim.metric, known)}"
            )
        if claim.task is not None and claim.metric not in DERIVED:
            raise ConfigError(
                f"{where}: claims[{i}].task is for benchmark metrics ({', '.join(DERIVED)}), "
                f"not {claim.metric}; remove it"
            )


def _pooled(section: Mapping[str, Any], metric: str, task: str | None) -> dict[str, Any] | None:
    """A derived benchmark metric from the flips of every task (or one), pooled as one paired sample."""
    tasks = [t for t in section.get("tasks", []) if "flips_b" in t and (task is None or t["task"] == task)]
    if not tasks:
        return None
    b = sum(t["flips_b"] for t in tasks)
    c = sum(t["flips_c"] for t in tasks)
    n = sum(t["n"] for t in tasks)
    base = sum(t["accuracy_baseline"]["value"] * t["n"] for t in tasks) / n
    d = paired_difference(b, c, n)  # candidate minus baseline accuracy
    kind = "normal" if b + c else "zero-events"
    if metric == "benchmark_accuracy_drop":
        value, low, high = 0.0 - d.value, -d.high, -d.low  # 0.0 - : no flips at all must not print as "-0"
    elif base == 0:
        return None  # relative to an accuracy of zero: undefined
    else:  # the pooled recovery, as each task's is computed; the relative drop is 1 - recovery
        recovery = recovery_estimate(d, base, base + d.value)
        value, low, high = recovery.value, recovery.low, recovery.high
        if metric == "benchmark_relative_drop":
            value, low, high = 1 - value, 1 - high, 1 - low
    return {"value": value, "low": low, "high": high, "n": n, "unit": "documents", "interval": kind}


def measured(stack: Mapping[str, Any], claim: Claim) -> dict[str, Any] | None:
    """The claim's metric as this run measured it on the stack: value, interval, sample, interval kind."""
    if claim.metric in DERIVED:
        section = stack.get("instruments", {}).get("benchmarks")
        return _pooled(section, claim.metric, claim.task) if section else None
    for f in stack.get("findings", []):
        if f["metric"] == claim.metric and f.get("value") is not None:
            return {key: f.get(key) for key in ("value", "low", "high", "n", "unit", "interval")}
    return None


def judge_claim(claim: Claim, found: Mapping[str, Any] | None) -> dict[str, Any]:
    """A claim's row: what it says, what was measured, and holds / refuted / inconclusive."""
    row: dict[str, Any] = {
        "stack": claim.stack,
        "metric": claim.metric,
        **({"task": claim.task} if claim.task else {}),
        "bound": {"max" if claim.upper else "min": claim.bound},
        "source": claim.source,
        "statement": claim.statement,
    }
    if found is None:
        return {
            **row,
            "verdict": "inconclusive",
            "n_needed": None,
            "reason": f"{claim.metric} was not measured on {claim.stack} (enable its instrument)",
        }
    value = float(found["value"])
    low = value if found.get("low") is None else float(found["low"])
    high = value if found.get("high") is None else float(found["high"])
    if any(not math.isfinite(x) for x in (value, low, high)):
        return {
            **row,
            "measured": dict(found),
            "verdict": "inconclusive",
            "n_needed": None,
            "reason": f"{claim.metric} is not finite on {claim.stack}",
        }
    worst, best = (high, low) if claim.upper else (low, high)
    sign = "<=" if claim.upper else ">="

    def within(x: float) -> bool:
        return x <= claim.bound if claim.upper else x >= claim.bound

    row["measured"] = dict(found)
    shown = interval({"value": value, "low": low, "high": high})
    if within(worst):
        return {
            **row,
            "verdict": "holds",
            "n_needed": None,
            "reason": f"{claim.metric} {shown} is {sign} {claim.bound:g}",
        }
    if not within(best):
        return {
            **row,
            "verdict": "refuted",
            "n_needed": None,
            "reason": f"{claim.metric} {shown} is past {claim.bound:g}",
        }
    # The interval straddles the bound: to hold, its bad end must come inside; to refute, its good end out.
    end = worst if within(value) else best
    n = found.get("n")
    kind: IntervalKind = "zero-events" if found.get("interval") == "zero-events" else "normal"
    needed = n_to_reach(int(n) if n else None, value, end, claim.bound, kind)
    have = f"{found.get('n')} {found.get('unit') or ''}".strip()
    reason = f"{claim.metric} {shown} straddles {claim.bound:g} (have {have}; n needed to decide: {fmt(needed)})"
    return {**row, "verdict": "inconclusive", "n_needed": needed, "reason": reason}


def judge_claims(claims: Sequence[Claim], stacks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    by_name = {s["name"]: s for s in stacks}
    return [judge_claim(c, measured(by_name[c.stack], c)) for c in claims]


def summary_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "### Claims checked on this domain",
        "",
        "| claim | source | stack | measured [95%] | verdict | n needed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ((side, bound),) = row["bound"].items()
        task = f" ({row['task']})" if row.get("task") else ""
        what = f"{row['metric']}{task} {'<=' if side == 'max' else '>='} {fmt(bound)}"
        if row.get("statement"):
            what = f"{row['statement']}: {what}"
        found = row.get("measured")
        cell = interval(found) if found else "not measured"
        lines.append(
            f"| {what} | {row.get('source') or '-'} | `{row['stack']}` | {cell} | **{row['verdict']}** | "
            f"{fmt(row.get('n_needed'))} |"
        )
    return lines


VERDICT_CODE = {"holds": 1, "inconclusive": 0, "refuted": -1}


def mlflow_metrics(rows: Sequence[Mapping[str, Any]]) -> Iterator[tuple[str, float | None]]:
    """Per claim (numbered in file order): its verdict (1 holds, 0 inconclusive, -1 refuted), the
    measured value and interval, and the sample that would decide an inconclusive one."""
    for i, row in enumerate(rows):
        prefix = f"claims/{i}_{row['metric']}"
        yield f"{prefix}/verdict", VERDICT_CODE[row["verdict"]]
        found = row.get("measured") or {}
        for part in ("value", "low", "high"):
            yield f"{prefix}/{part}", found.get(part)
        if row.get("n_needed") is not None:
            yield f"{prefix}/n_needed", row["n_needed"]
