"""The gate (qualgate/gate.py) on hand-worked findings: pass / warn / fail / inconclusive / error in both
metric directions, the exact boundaries, the inconclusive policy, n_needed (normal and zero-events
intervals) and the verdict over a stack's findings. Every expected number is worked out by hand in a
comment or by plain arithmetic. Pure functions: no model, no fixture (fast; mutation-tested)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest

from qualgate.gate import (
    METRIC_DIRECTION,
    STATUS_ORDER,
    Finding,
    GatedStatus,
    Policy,
    Status,
    judge,
    n_needed,
    verdict,
    worst_status,
)

NAN, INF = float("nan"), float("inf")
# The baseline accuracy of the zero-flip benchmark below: recovery's bound is 1 - flip bound / 0.1875.
ACC = 0.1875


def kl(value: float, low: float | None, high: float | None, **kw: Any) -> Finding:
    return Finding("fidelity", "kl_mean", value, low, high, **kw)


def rec(value: float, low: float | None, high: float | None, **kw: Any) -> Finding:
    return Finding("benchmarks.gsm8k", "recovery", value, low, high, **kw)


def check(
    finding: Finding,
    warn: float | None,
    fail: float | None,
    status: Status,
    gated: GatedStatus,
    reason: str,
    needed: int | None = None,
    policy: Policy | None = None,
) -> Finding:
    """Judge a finding that carries a stale outcome (every field judge sets differs from the expected one),
    so a branch that forgot to set a field shows; then compare every field judge sets."""
    stale = replace(
        finding,
        status="pass" if status == "error" else "error",
        gated="fail" if gated == "pass" else "pass",
        reason="stale",
        n_needed=999,
        warn=-7.0,
        fail=-8.0,
    )
    out = judge(stale, warn, fail) if policy is None else judge(stale, warn, fail, policy)
    assert (out.status, out.gated, out.reason, out.n_needed) == (status, gated, reason, needed)
    assert (out.warn, out.fail) == (warn, fail)
    # judge keeps the measurement itself
    assert (out.instrument, out.metric, out.value, out.low, out.high) == (
        finding.instrument,
        finding.metric,
        finding.value,
        finding.low,
        finding.high,
    )
    assert (out.n, out.unit, out.interval, out.cause) == (finding.n, finding.unit, finding.interval, finding.cause)
    return out


# -- direction, side, pessimistic, crosses -----------------------------------------------------------
@pytest.mark.parametrize(
    ("metric", "bigger_is_worse"),
    [
        ("kl_mean", True),
        ("ppl_ratio", True),
        ("same_top1", False),
        ("real_divergences", True),
        ("recovery", False),
        ("net_loss", True),
        ("shape_kl", True),
        ("decode_kl_mean", True),
        ("some_plugin_metric", True),  # unknown metrics: bigger is worse
    ],
)
def test_direction_of_every_metric(metric: str, bigger_is_worse: bool) -> None:
    f = Finding("x", metric, 0.5, 0.25, 0.75)
    assert f.bigger_is_worse is bigger_is_worse
    assert f.side == ("upper" if bigger_is_worse else "lower")
    assert f.pessimistic == (0.75 if bigger_is_worse else 0.25)


def test_the_direction_table_lists_eight_metrics() -> None:
    """The built-in instruments gate eight metrics; a plug-in registered earlier in this process (the
    plug-in tests do) adds its own, so only the built-ins' entries are counted."""
    from qualgate.instruments import Benchmarks, DecodePath, Equivalence, Fidelity, Judge

    builtin = {m: d for cls in (Fidelity, DecodePath, Equivalence, Benchmarks, Judge) for m, d in cls.metrics.items()}
    assert len(builtin) == 8 and all(METRIC_DIRECTION[m] is d for m, d in builtin.items())


def test_pessimistic_is_the_bad_end_or_the_value() -> None:
    assert kl(0.01, 0.005, 0.02).pessimistic == 0.02  # bigger is worse: high
    assert rec(0.97, 0.93, 1.01).pessimistic == 0.93  # smaller is worse: low
    assert kl(0.01, None, None).pessimistic == 0.01  # no interval: the value
    assert rec(0.97, None, None).pessimistic == 0.97
    # only the bad end matters: a missing good end does not stand in for it, a missing bad end is the value
    assert kl(0.01, None, 0.02).pessimistic == 0.02
    assert kl(0.01, 0.005, None).pessimistic == 0.01
    assert rec(0.97, 0.93, None).pessimistic == 0.93
    assert rec(0.97, None, 1.01).pessimistic == 0.97


def test_crosses_is_strict_and_none_never_crosses() -> None:
    big, small = kl(0.0, None, None), rec(1.0, None, None)
    assert big.crosses(0.011, 0.01) and not big.crosses(0.01, 0.01) and not big.crosses(0.009, 0.01)
    assert small.crosses(0.94, 0.95) and not small.crosses(0.95, 0.95) and not small.crosses(0.96, 0.95)
    assert not big.crosses(1e9, None) and not small.crosses(-1e9, None)


def test_as_dict_carries_every_field_and_the_pessimistic_end() -> None:
    d = rec(0.97, 0.93, 1.01, warn=0.95, fail=0.9, n=50, unit="documents", cause="c").as_dict()
    assert d == {
        "instrument": "benchmarks.gsm8k",
        "metric": "recovery",
        "value": 0.97,
        "low": 0.93,
        "high": 1.01,
        "warn": 0.95,
        "fail": 0.9,
        "status": "pass",
        "reason": "",
        "n": 50,
        "unit": "documents",
        "interval": "normal",
        "cause": "c",
        "n_needed": None,
        "gated": "pass",
        "pessimistic": 0.93,
    }


# -- judge: bigger is worse (kl_mean, warn 0.01, fail 0.02) ------------------------------------------
def test_kl_within_thresholds_passes() -> None:
    check(kl(0.005, 0.002, 0.008), 0.01, 0.02, "pass", "pass", "kl_mean upper bound 0.008 within thresholds")


def test_kl_point_past_warn_warns() -> None:
    # 0.012 > 0.01 and the bound 0.015 stays under fail 0.02
    check(kl(0.012, 0.009, 0.015), 0.01, 0.02, "warn", "warn", "kl_mean upper bound 0.015 crosses warn 0.01")


def test_kl_point_past_fail_fails() -> None:
    check(kl(0.025, 0.021, 0.03), 0.01, 0.02, "fail", "fail", "kl_mean upper bound 0.03 crosses fail 0.02")


def test_kl_point_past_warn_and_bound_past_fail_fails() -> None:
    # the reason shows the bound to 6 significant digits: 0.0251234567 -> 0.0251235
    check(kl(0.015, 0.01, 0.0251234567), 0.01, 0.02, "fail", "fail", "kl_mean upper bound 0.0251235 crosses fail 0.02")


def test_kl_bound_past_warn_only_is_inconclusive() -> None:
    # n_needed = 16 * ((0.012 - 0.008) / (0.01 - 0.008))^2 = 16 * 2^2 = 64
    check(
        kl(0.008, 0.004, 0.012, n=16, unit="chunks"),
        0.01,
        0.02,
        "inconclusive",
        "warn",
        "kl_mean 0.008 within thresholds, but its upper bound 0.012 crosses warn 0.01 for lack of samples "
        "(n_needed 64; have 16 chunks)",
        64,
    )


def test_kl_point_within_warn_bound_past_fail_is_inconclusive_not_fail() -> None:
    # the interval reaches past fail 0.02, but the point 0.008 is within warn: lack of samples. To pass it
    # must clear warn: 16 * ((0.024 - 0.008) / (0.01 - 0.008))^2 = 16 * 8^2 = 1024
    check(
        kl(0.008, 0.0, 0.024, n=16, unit="chunks"),
        0.01,
        0.02,
        "inconclusive",
        "warn",
        "kl_mean 0.008 within thresholds, but its upper bound 0.024 crosses warn 0.01 for lack of samples "
        "(n_needed 1024; have 16 chunks)",
        1024,
    )


def test_kl_bound_past_fail_with_only_fail_set_is_inconclusive_against_fail() -> None:
    # target fail: 16 * ((0.024 - 0.008) / (0.02 - 0.008))^2 = 16 * (4/3)^2 = 256/9 = 28.44 -> 29
    check(
        kl(0.008, 0.0, 0.024, n=16, unit="chunks"),
        None,
        0.02,
        "inconclusive",
        "warn",
        "kl_mean 0.008 within thresholds, but its upper bound 0.024 crosses fail 0.02 for lack of samples "
        "(n_needed 29; have 16 chunks)",
        29,
    )


def test_kl_value_exactly_on_the_thresholds_does_not_cross() -> None:
    # value and bound on warn: nothing crosses
    check(kl(0.01, 0.01, 0.01), 0.01, 0.02, "pass", "pass", "kl_mean upper bound 0.01 within thresholds")
    # bound on warn, value under it
    check(kl(0.005, 0.0, 0.01), 0.01, 0.02, "pass", "pass", "kl_mean upper bound 0.01 within thresholds")
    # value and bound on fail: past warn, not past fail
    check(kl(0.02, 0.02, 0.02), 0.01, 0.02, "warn", "warn", "kl_mean upper bound 0.02 crosses warn 0.01")
    # value past warn, bound exactly on fail: warn
    check(kl(0.015, 0.01, 0.02), 0.01, 0.02, "warn", "warn", "kl_mean upper bound 0.02 crosses warn 0.01")


def test_kl_value_on_warn_with_the_bound_past_it_needs_an_unreachable_sample() -> None:
    # the point sits on warn: no sample size lets the interval clear it (room 0)
    check(
        kl(0.01, 0.005, 0.015, n=16, unit="chunks"),
        0.01,
        0.02,
        "inconclusive",
        "warn",
        "kl_mean 0.01 within thresholds, but its upper bound 0.015 crosses warn 0.01 for lack of samples "
        "(no sample size clears it at this estimate; have 16 chunks)",
    )


def test_inconclusive_without_a_sample_size_or_unit() -> None:
    check(
        kl(0.008, 0.004, 0.012),
        0.01,
        0.02,
        "inconclusive",
        "warn",
        "kl_mean 0.008 within thresholds, but its upper bound 0.012 crosses warn 0.01 for lack of samples "
        "(n_needed unknown; no sample size recorded)",
    )
    check(
        kl(0.008, 0.004, 0.012, n=16),
        0.01,
        0.02,
        "inconclusive",
        "warn",
        "kl_mean 0.008 within thresholds, but its upper bound 0.012 crosses warn 0.01 for lack of samples "
        "(n_needed 64; have 16)",
        64,
    )


def test_kl_only_fail_set() -> None:
    check(kl(0.015, 0.01, 0.018), None, 0.02, "pass", "pass", "kl_mean upper bound 0.018 within thresholds")
    check(kl(0.025, 0.021, 0.03), None, 0.02, "fail", "fail", "kl_mean upper bound 0.03 crosses fail 0.02")
    check(kl(0.021, 0.02, 0.022), None, 0.02, "fail", "fail", "kl_mean upper bound 0.022 crosses fail 0.02")
    check(kl(0.02, 0.02, 0.02), None, 0.02, "pass", "pass", "kl_mean upper bound 0.02 within thresholds")


def test_kl_only_warn_set() -> None:
    check(kl(0.005, 0.0, 0.008), 0.01, None, "pass", "pass", "kl_mean upper bound 0.008 within thresholds")
    # far past warn, but there is no fail tier: warn
    check(kl(0.5, 0.4, 0.6), 0.01, None, "warn", "warn", "kl_mean upper bound 0.6 crosses warn 0.01")
    # 10 * ((0.3 - 0) / (0.2 - 0))^2 = 10 * 1.5^2 = 22.5 -> 23
    check(
        kl(0.0, 0.0, 0.3, n=10, unit="chunks"),
        0.2,
        None,
        "inconclusive",
        "warn",
        "kl_mean 0 within thresholds, but its upper bound 0.3 crosses warn 0.2 for lack of samples "
        "(n_needed 23; have 10 chunks)",
        23,
    )


def test_no_thresholds_is_not_gated() -> None:
    check(kl(5.0, 4.0, 6.0), None, None, "pass", "pass", "kl_mean is not gated")
    check(rec(0.1, 0.0, 0.2), None, None, "pass", "pass", "recovery is not gated")


# -- judge: smaller is worse (recovery warn 0.95 fail 0.9; same_top1 warn 0.9 fail 0.8) ---------------
def test_recovery_within_thresholds_passes() -> None:
    check(rec(0.99, 0.96, 1.02), 0.95, 0.9, "pass", "pass", "recovery lower bound 0.96 within thresholds")


def test_recovery_point_past_warn_warns() -> None:
    check(rec(0.93, 0.91, 0.95), 0.95, 0.9, "warn", "warn", "recovery lower bound 0.91 crosses warn 0.95")


def test_recovery_point_past_fail_fails() -> None:
    check(rec(0.85, 0.8, 0.9), 0.95, 0.9, "fail", "fail", "recovery lower bound 0.8 crosses fail 0.9")


def test_recovery_point_past_warn_and_bound_past_fail_fails() -> None:
    check(rec(0.93, 0.88, 0.98), 0.95, 0.9, "fail", "fail", "recovery lower bound 0.88 crosses fail 0.9")


def test_recovery_bound_past_warn_only_is_inconclusive() -> None:
    # 50 * ((0.97 - 0.93) / (0.97 - 0.95))^2 = 50 * 2^2 = 200
    check(
        rec(0.97, 0.93, 1.01, n=50, unit="documents"),
        0.95,
        0.9,
        "inconclusive",
        "warn",
        "recovery 0.97 within thresholds, but its lower bound 0.93 crosses warn 0.95 for lack of samples "
        "(n_needed 200; have 50 documents)",
        200,
    )


def test_recovery_point_within_warn_bound_past_fail_is_inconclusive() -> None:
    # 50 * ((0.97 - 0.85) / 0.02)^2 = 50 * 6^2 = 1800
    check(
        rec(0.97, 0.85, 1.09, n=50, unit="documents"),
        0.95,
        0.9,
        "inconclusive",
        "warn",
        "recovery 0.97 within thresholds, but its lower bound 0.85 crosses warn 0.95 for lack of samples "
        "(n_needed 1800; have 50 documents)",
        1800,
    )
    # only fail set: 50 * ((0.97 - 0.85) / (0.97 - 0.9))^2 = 50 * (12/7)^2 = 7200/49 = 146.94 -> 147
    check(
        rec(0.97, 0.85, 1.09, n=50, unit="documents"),
        None,
        0.9,
        "inconclusive",
        "warn",
        "recovery 0.97 within thresholds, but its lower bound 0.85 crosses fail 0.9 for lack of samples "
        "(n_needed 147; have 50 documents)",
        147,
    )


def test_recovery_exact_boundaries() -> None:
    check(rec(0.95, 0.95, 0.95), 0.95, 0.9, "pass", "pass", "recovery lower bound 0.95 within thresholds")
    check(rec(0.97, 0.95, 0.99), 0.95, 0.9, "pass", "pass", "recovery lower bound 0.95 within thresholds")
    check(rec(0.9, 0.9, 0.9), 0.95, 0.9, "warn", "warn", "recovery lower bound 0.9 crosses warn 0.95")
    check(rec(0.93, 0.9, 0.96), 0.95, 0.9, "warn", "warn", "recovery lower bound 0.9 crosses warn 0.95")


def test_recovery_only_fail_and_only_warn() -> None:
    check(rec(0.85, 0.8, 0.9), None, 0.9, "fail", "fail", "recovery lower bound 0.8 crosses fail 0.9")
    check(rec(0.92, 0.91, 0.93), None, 0.9, "pass", "pass", "recovery lower bound 0.91 within thresholds")
    check(rec(0.5, 0.4, 0.6), 0.95, None, "warn", "warn", "recovery lower bound 0.4 crosses warn 0.95")


def test_same_top1_each_outcome() -> None:
    def top1(value: float, low: float, high: float, **kw: Any) -> Finding:
        return Finding("fidelity", "same_top1", value, low, high, **kw)

    check(top1(0.95, 0.92, 0.98), 0.9, 0.8, "pass", "pass", "same_top1 lower bound 0.92 within thresholds")
    check(top1(0.88, 0.85, 0.91), 0.9, 0.8, "warn", "warn", "same_top1 lower bound 0.85 crosses warn 0.9")
    check(top1(0.75, 0.7, 0.8), 0.9, 0.8, "fail", "fail", "same_top1 lower bound 0.7 crosses fail 0.8")
    check(top1(0.85, 0.78, 0.92), 0.9, 0.8, "fail", "fail", "same_top1 lower bound 0.78 crosses fail 0.8")
    # 1000 * ((0.92 - 0.88) / (0.92 - 0.9))^2 = 1000 * 2^2 = 4000
    check(
        top1(0.92, 0.88, 0.96, n=1000, unit="tokens"),
        0.9,
        0.8,
        "inconclusive",
        "warn",
        "same_top1 0.92 within thresholds, but its lower bound 0.88 crosses warn 0.9 for lack of samples "
        "(n_needed 4000; have 1000 tokens)",
        4000,
    )


def test_judge_resets_a_stale_n_needed_and_sets_the_thresholds() -> None:
    out = judge(kl(0.005, 0.002, 0.008, n_needed=12), 0.01, 0.02)
    assert (out.n_needed, out.warn, out.fail) == (None, 0.01, 0.02)


# -- the inconclusive policy ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["pass", "warn", "fail"])
def test_policy_decides_what_an_inconclusive_finding_counts_as(policy: Policy) -> None:
    out = judge(kl(0.008, 0.004, 0.012, n=16, unit="chunks"), 0.01, 0.02, policy)
    assert (out.status, out.gated, out.n_needed) == ("inconclusive", policy, 64)


def test_the_default_policy_is_warn() -> None:
    assert judge(kl(0.008, 0.004, 0.012), 0.01, 0.02).gated == "warn"
    assert judge(rec(0.97, 0.93, 1.01), 0.95, 0.9).gated == "warn"


@pytest.mark.parametrize("policy", ["pass", "warn", "fail"])
def test_policy_leaves_measured_outcomes_alone(policy: Policy) -> None:
    failed = judge(kl(0.025, 0.021, 0.03), 0.01, 0.02, policy)
    assert (failed.status, failed.gated) == ("fail", "fail")
    assert judge(kl(0.012, 0.009, 0.015), 0.01, 0.02, policy).gated == "warn"
    assert judge(kl(0.005, 0.002, 0.008), 0.01, 0.02, policy).gated == "pass"
    assert judge(kl(NAN, None, None), 0.01, 0.02, policy).gated == "fail"


# -- n_needed ------------------------------------------------------------------------------------------
def test_n_needed_normal_interval() -> None:
    # 16 * (0.004 / 0.002)^2 = 64
    assert n_needed(kl(0.008, 0.004, 0.012, n=16), 0.01) == 64
    # against fail: 16 * (0.004 / 0.012)^2 = 16 / 9 = 1.78 -> 2
    assert n_needed(kl(0.008, 0.004, 0.012, n=16), 0.02) == 2
    # smaller is worse: 50 * (0.04 / 0.02)^2 = 200
    assert n_needed(rec(0.97, 0.93, 1.01, n=50), 0.95) == 200


def test_n_needed_rounds_up() -> None:
    # 10 * (0.3 / 0.2)^2 = 22.5 -> 23
    assert n_needed(kl(0.0, 0.0, 0.3, n=10), 0.2) == 23
    # 7 * (0.3 / 0.1)^2 = 63 exactly (up to rounding of the floats): not 64
    assert n_needed(kl(0.1, 0.0, 0.4, n=7), 0.2) == 63
    # 3 * (0.05 / 0.1)^2 = 0.75 -> 1
    assert n_needed(kl(0.0, 0.0, 0.05, n=3), 0.1) == 1


def test_n_needed_zero_events_interval() -> None:
    # The demo: 192 documents, no flips, baseline accuracy 0.1875: low = 1 - (1 - 0.025^(1/192)) / 0.1875
    # = 1 - 0.0190296 / 0.1875 = 0.898509. The flip bound must shrink to (1 - 0.9) * 0.1875 = 0.01875:
    # n = ln(0.025) / ln(1 - 0.01875) = -3.688879 / -0.018928 = 194.89 -> 195.
    low = 1 - (1 - 0.025 ** (1 / 192)) / ACC
    assert low == pytest.approx(0.898509, abs=1e-6)
    f = rec(1.0, low, 2 - low, n=192, unit="documents", interval="zero-events")
    assert n_needed(f, 0.9) == 195
    # against fail 0.8: (1 - 0.8) * 0.1875 = 0.0375; ln(0.025) / ln(0.9625) = -3.688879 / -0.038221 = 96.5 -> 97
    assert n_needed(f, 0.8) == 97
    # the same interval read as "normal" would need 192 * (0.101491 / 0.1)^2 = 197.8 -> 198
    assert n_needed(replace(f, interval="normal"), 0.9) == 198


def test_n_needed_zero_events_is_exact_around_the_threshold() -> None:
    # at 195 documents the bound clears 0.9, at 194 it does not
    # 1 - (1 - 0.025^(1/195)) / 0.1875 = 1 - 0.0187395 / 0.1875 = 0.900056
    # 1 - (1 - 0.025^(1/194)) / 0.1875 = 1 - 0.0188353 / 0.1875 = 0.899545
    def zero_flips(n: int) -> Finding:
        width = (1 - 0.025 ** (1 / n)) / ACC
        return rec(1.0, 1 - width, 1 + width, n=n, unit="documents", interval="zero-events")

    assert judge(zero_flips(195), 0.9, 0.8).status == "pass"
    out = judge(zero_flips(194), 0.9, 0.8)
    assert (out.status, out.n_needed) == ("inconclusive", 195)


def test_n_needed_without_a_sample_or_room_is_none() -> None:
    assert n_needed(kl(0.008, 0.004, 0.012), 0.01) is None
    assert n_needed(kl(0.01, 0.005, 0.015, n=16), 0.01) is None
    assert n_needed(rec(0.95, 0.9, 1.0, n=50), 0.95) is None
    assert n_needed(rec(1.0, 0.9, 1.0, n=192, interval="zero-events"), 1.0) is None


# -- non-finite values ---------------------------------------------------------------------------------
CAUSE = "baseline accuracy is 0 on 40 documents, so recovery (candidate / baseline accuracy) is undefined"


@pytest.mark.parametrize(
    ("finding", "broken"),
    [
        (kl(NAN, 0.001, 0.002, cause="c1"), "kl_mean value is nan: c1"),
        (kl(0.005, 0.001, NAN, cause="c2"), "kl_mean upper bound is nan: c2"),
        (kl(0.005, 0.001, INF, cause="c3"), "kl_mean upper bound is inf: c3"),
        (kl(NAN, NAN, NAN, cause="c4"), "kl_mean value is nan: c4"),  # the value is named first
        (kl(INF, None, None, cause="c5"), "kl_mean value is inf: c5"),
        (rec(-INF, None, None, cause=CAUSE), f"recovery value is -inf: {CAUSE}"),
        (rec(NAN, NAN, NAN, cause=CAUSE), f"recovery value is nan: {CAUSE}"),
        (rec(0.99, -INF, 1.0, cause=CAUSE), f"recovery lower bound is -inf: {CAUSE}"),
        (kl(0.005, 0.001, INF), "kl_mean upper bound is inf: no cause recorded"),
    ],
)
def test_a_non_finite_gated_finding_is_an_error_that_fails(finding: Finding, broken: str) -> None:
    reason = f"{broken}; a gated value must be finite"
    warn, fail = (0.01, 0.02) if finding.bigger_is_worse else (0.95, 0.9)
    check(finding, warn, None, "error", "fail", reason)
    check(finding, None, fail, "error", "fail", reason)
    check(finding, warn, fail, "error", "fail", reason, policy="pass")


def test_a_non_finite_finding_without_thresholds_is_not_gated() -> None:
    check(kl(NAN, NAN, NAN, cause="c"), None, None, "pass", "pass", "kl_mean is not gated")
    check(rec(-INF, None, None), None, None, "pass", "pass", "recovery is not gated")


# -- a benchmark without a single flip -----------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 10, 50, 192, 194, 195, 500, 2000])
def test_zero_flips_are_never_measured_degradation(n: int) -> None:
    # value 1.0 is within every threshold; only the exact zero-event bound (1 - 0.025^(1/n)) / 0.1875 can
    # cross, which is a lack of documents (inconclusive) until it clears 0.9 at n >= 195
    width = (1 - 0.025 ** (1 / n)) / ACC
    out = judge(rec(1.0, 1 - width, 1 + width, n=n, unit="documents", interval="zero-events"), 0.9, 0.8)
    assert out.status == ("pass" if n >= 195 else "inconclusive")
    assert verdict([out])["measured"] == "pass"


def test_zero_flips_on_2000_documents_pass() -> None:
    # (1 - 0.025^(1/2000)) / 0.1875 = 0.00184274 / 0.1875 = 0.0098280: low 0.990172 > 0.9
    width = (1 - 0.025 ** (1 / 2000)) / ACC
    check(
        rec(1.0, 1 - width, 1 + width, n=2000, unit="documents", interval="zero-events"),
        0.9,
        0.8,
        "pass",
        "pass",
        "recovery lower bound 0.990172 within thresholds",
    )


# -- verdict and worst_status --------------------------------------------------------------------------
def _outcome(status: Status, gated: GatedStatus, instrument: str = "fidelity", metric: str = "kl_mean") -> Finding:
    return Finding(instrument, metric, 0.0, None, None, status=status, gated=gated)


@pytest.mark.parametrize(
    ("statuses", "worst"),
    [
        ([], "pass"),
        (["pass"], "pass"),
        (["pass", "warn"], "warn"),
        (["warn", "pass"], "warn"),
        (["warn", "fail"], "fail"),
        (["fail", "warn"], "fail"),
        (["pass", "fail"], "fail"),
        (["fail", "pass"], "fail"),
        (["pass", "warn", "pass"], "warn"),
        (["warn", "fail", "pass", "warn"], "fail"),
    ],
)
def test_worst_status(statuses: list[str], worst: str) -> None:
    assert worst_status(statuses) == worst


def test_status_order() -> None:
    assert STATUS_ORDER == {"pass": 0, "warn": 1, "fail": 2}


def test_verdict_of_no_findings_passes() -> None:
    assert verdict([]) == {"verdict": "pass", "measured": "pass", "inconclusive": []}


def test_verdict_of_passing_findings() -> None:
    assert verdict([_outcome("pass", "pass"), _outcome("pass", "pass", "fidelity", "same_top1")]) == {
        "verdict": "pass",
        "measured": "pass",
        "inconclusive": [],
    }


def test_verdict_separates_the_inconclusive_from_the_measured() -> None:
    findings = [
        _outcome("pass", "pass"),
        _outcome("inconclusive", "warn", "benchmarks.gsm8k", "recovery"),
        _outcome("pass", "pass", "fidelity", "same_top1"),
    ]
    assert verdict(findings) == {"verdict": "warn", "measured": "pass", "inconclusive": ["benchmarks.gsm8k.recovery"]}


def test_verdict_under_policy_fail_and_pass() -> None:
    findings = [_outcome("warn", "warn"), _outcome("inconclusive", "fail", "judge", "net_loss")]
    assert verdict(findings) == {"verdict": "fail", "measured": "warn", "inconclusive": ["judge.net_loss"]}
    findings = [_outcome("inconclusive", "pass", "judge", "net_loss"), _outcome("inconclusive", "pass")]
    assert verdict(findings) == {
        "verdict": "pass",
        "measured": "pass",
        "inconclusive": ["judge.net_loss", "fidelity.kl_mean"],
    }


def test_verdict_counts_a_measured_fail_and_an_error() -> None:
    findings = [_outcome("inconclusive", "warn", "benchmarks.arc", "recovery"), _outcome("fail", "fail")]
    assert verdict(findings) == {"verdict": "fail", "measured": "fail", "inconclusive": ["benchmarks.arc.recovery"]}
    findings = [_outcome("pass", "pass"), _outcome("error", "fail", "benchmarks.arc", "recovery")]
    assert verdict(findings) == {"verdict": "fail", "measured": "fail", "inconclusive": []}


def test_verdict_from_judged_findings() -> None:
    # end to end through judge: a passing KL, an inconclusive recovery (policy fail), a warning top-1
    findings = [
        judge(kl(0.005, 0.002, 0.008), 0.01, 0.02, "fail"),
        judge(rec(0.97, 0.93, 1.01, n=50, unit="documents"), 0.95, 0.9, "fail"),
        judge(Finding("fidelity", "same_top1", 0.88, 0.85, 0.91), 0.9, 0.8, "fail"),
    ]
    assert verdict(findings) == {"verdict": "fail", "measured": "warn", "inconclusive": ["benchmarks.gsm8k.recovery"]}
    assert math.isclose(findings[1].pessimistic, 0.93)


def test_a_value_past_fail_outside_its_own_interval_names_fail_and_the_value() -> None:
    # value 0.025 past fail 0.02, upper bound 0.015 is not: the value itself crossed (no warn set)
    check(kl(0.025, 0.01, 0.015), None, 0.02, "fail", "fail", "kl_mean value 0.025 crosses fail 0.02")
    check(kl(0.025, 0.01, 0.015), 0.01, 0.02, "fail", "fail", "kl_mean value 0.025 crosses fail 0.02")


def test_tiers_in_the_wrong_order_are_refused_by_the_pipeline(tmp_path: Any) -> None:
    from qualgate.config import load_pipeline
    from qualgate.errors import ConfigError

    for metric, warn, fail, word in (("kl_mean", 0.05, 0.01, "below"), ("same_top1", 0.90, 0.95, "above")):
        path = tmp_path / f"{metric}.yaml"
        path.write_text(f"version: 1\nname: x\ngate:\n  {metric}: {{warn: {warn}, fail: {fail}}}\n")
        with pytest.raises(ConfigError, match=f"gate.{metric}: warn {warn:g} must be {word} fail {fail:g}"):
            load_pipeline(path)
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nname: x\ngate:\n  inconclusive: maybe\n")
    with pytest.raises(ConfigError, match=r"gate\.inconclusive must be pass, warn or fail"):
        load_pipeline(path)


def test_a_count_without_interval_is_judged_on_its_value_and_says_so() -> None:
    divergences = Finding("equivalence", "real_divergences", 3.0, None, None)
    check(divergences, None, 0, "fail", "fail", "real_divergences value 3 crosses fail 0")
    check(replace(divergences, value=0.0), None, 0, "pass", "pass", "real_divergences value 0 within thresholds")
