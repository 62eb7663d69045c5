"""Paired comparison of one task (instruments/benchmarks/paired.py): every expected number worked out by
hand in the comments. Pure functions: no model, no lm-eval, no fixture (fast; mutation-tested)."""

from __future__ import annotations

import math

import pytest

from qualgate.errors import ConfigError
from qualgate.instruments.benchmarks.paired import (
    Sample,
    TaskComparison,
    compare_task,
    holm,
    mcnemar_exact,
    paired_difference,
)
from qualgate.stats import Estimate

Z95 = 1.959964


def _side(correct: dict[int, int], prompt: str = "q") -> dict[int, Sample]:
    return {d: Sample(d, float(c), f"{prompt}{d}", f"answer{d}:{c}") for d, c in correct.items()}


# -- paired_difference -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "bound"),
    [
        (1, 0.975),  # 1 - 0.025
        (2, 0.841886),  # 1 - sqrt(0.025) = 1 - 0.158114
        (4, 0.602365),  # 1 - 0.025^(1/4) = 1 - sqrt(0.158114) = 1 - 0.397635
    ],
)
def test_no_flips_give_the_exact_bound_on_the_flip_rate(n: int, bound: float) -> None:
    d = paired_difference(0, 0, n)
    assert (d.value, d.se) == (0.0, 0.0)
    assert d.low == pytest.approx(-bound, abs=1e-6) and d.high == pytest.approx(bound, abs=1e-6)


def test_equal_flips_both_ways_use_the_normal_interval_not_the_zero_flip_bound() -> None:
    # b = c = 2 of n = 10: D = 0; var = (4 / 10 - 0) / 10 = 0.04; SE 0.2; 0 -+ 1.959964 * 0.2
    d = paired_difference(2, 2, 10)
    assert d.value == 0.0 and d.se == pytest.approx(0.2)
    assert d.low == pytest.approx(-0.391993, abs=1e-6) and d.high == pytest.approx(0.391993, abs=1e-6)


def test_paired_difference_by_hand() -> None:
    # b = 1, c = 4, n = 10: D = 3 / 10; var = (5 / 10 - 0.09) / 10 = 0.041; SE 0.202485
    d = paired_difference(1, 4, 10)
    assert d.value == pytest.approx(0.3) and d.se == pytest.approx(0.202485, abs=1e-6)
    assert d.low == pytest.approx(0.3 - Z95 * 0.202485, abs=1e-5)
    # every document flipped the same way: var = (1 - 1) / 4 = 0, the interval is the point
    assert paired_difference(4, 0, 4) == Estimate(-1.0, 0.0, -1.0, -1.0)


# -- McNemar and Holm ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (1, 4, 12 / 32),  # P(X <= 1) + P(X >= 4) of Bin(5, 1/2) = (1 + 5 + 5 + 1) / 32
        (4, 1, 12 / 32),  # symmetric in b and c
        (7, 2, 92 / 512),  # 2 P(X <= 2) of Bin(9, 1/2) = 2 (1 + 9 + 36) / 512
        (0, 3, 2 / 8),  # 2 P(X = 0) of Bin(3, 1/2)
        (1, 0, 1.0),  # one flip cannot be significant
        (2, 2, 1.0),  # as balanced as it gets
        (0, 0, 1.0),  # nothing flipped
    ],
)
def test_mcnemar_exact_is_the_two_sided_binomial_sum(b: int, c: int, p: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p)


def test_holm_with_ties_and_the_running_maximum() -> None:
    # sorted: 0.005 (i4), 0.01 (i0), 0.03 (i2), 0.04 (i1), 0.04 (i3); m = 5
    # 5 * 0.005 = 0.025; 4 * 0.01 = 0.04; 3 * 0.03 = 0.09; 2 * 0.04 = 0.08 -> kept at 0.09; 1 * 0.04 -> 0.09
    assert holm([0.01, 0.04, 0.03, 0.04, 0.005]) == pytest.approx([0.04, 0.09, 0.09, 0.09, 0.025])


def test_holm_caps_at_one() -> None:
    # sorted 0.2 (i1): 3 * 0.2 = 0.6; 0.6 (i0): 2 * 0.6 = 1.2 -> 1; 0.9 (i2): 0.9 -> running max 1
    assert holm([0.6, 0.2, 0.9]) == pytest.approx([1.0, 0.6, 1.0])
    assert holm([0.3]) == [0.3] and holm([]) == []


# -- compare_task ----------------------------------------------------------------------------------
def test_compare_task_by_hand() -> None:
    # 8 documents, inserted out of order; baseline right on 1-4 (0.5), candidate right on 1-3 (0.375)
    baseline = _side({8: 0, 4: 1, 1: 1, 2: 1, 3: 1, 5: 0, 6: 0, 7: 0})
    candidate = _side({1: 1, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0, 7: 0, 8: 0})
    r = compare_task("t", "acc", baseline, candidate)
    assert (r.task, r.metric, r.n, r.b, r.c) == ("t", "acc", 8, 1, 0)
    # accuracy SEs: sqrt(0.5 * 0.5 / 7) = 0.188982; sqrt(0.375 * 0.625 / 7) = 0.182981
    assert r.accuracy_baseline.value == 0.5 and r.accuracy_baseline.se == pytest.approx(0.188982, abs=1e-6)
    assert r.accuracy_candidate.value == 0.375 and r.accuracy_candidate.se == pytest.approx(0.182981, abs=1e-6)
    # D = -1 / 8 = -0.125; var = (1 / 8 - 0.015625) / 8 = 0.013671875; SE 0.116927; z SE = 0.229172
    assert r.difference.value == -0.125 and r.difference.se == pytest.approx(0.116927, abs=1e-6)
    assert r.difference.low == pytest.approx(-0.354172, abs=1e-6)
    assert r.difference.high == pytest.approx(0.104172, abs=1e-6)
    # recovery 0.375 / 0.5 = 0.75, SE 0.116927 / 0.5; interval 1 + D's bounds / 0.5
    assert r.recovery.value == 0.75 and r.recovery.se == pytest.approx(0.233854, abs=1e-6)
    assert r.recovery.low == pytest.approx(0.291656, abs=1e-5) and r.recovery.high == pytest.approx(1.208344, abs=1e-5)
    assert r.mcnemar_p == 1.0 and math.isnan(r.holm_p)
    assert r.flips == [{"doc_id": 4, "kind": "b", "baseline": "answer4:1", "candidate": "answer4:0"}]


def test_flip_direction_and_the_summary() -> None:
    # doc 9: right -> wrong (b); doc 3 and 5: wrong -> right (c); doc 7 right on both; doc 1 wrong on both
    baseline = _side({9: 1, 3: 0, 5: 0, 7: 1, 1: 0})
    candidate = _side({9: 0, 3: 1, 5: 1, 7: 1, 1: 0})
    r = compare_task("qg", "exact_match", baseline, candidate)
    assert (r.b, r.c) == (1, 2)
    assert [(f["doc_id"], f["kind"]) for f in r.flips] == [(3, "c"), (5, "c"), (9, "b")]
    summary = r.summary()
    assert math.isnan(summary.pop("holm_p"))
    # accuracies 2 / 5 and 3 / 5, both with SE sqrt(0.4 * 0.6 / 4) = 0.244949 (z SE = 0.480091)
    assert summary.pop("accuracy_baseline") == pytest.approx(
        {"value": 0.4, "se": 0.244949, "low": -0.080091, "high": 0.880091}, abs=1e-6
    )
    assert summary.pop("accuracy_candidate") == pytest.approx(
        {"value": 0.6, "se": 0.244949, "low": 0.119909, "high": 1.080091}, abs=1e-6
    )
    # D = (2 - 1) / 5 = 0.2; var = (3 / 5 - 0.04) / 5 = 0.112; SE 0.334664; z SE = 0.655929
    assert summary.pop("difference") == pytest.approx(
        {"value": 0.2, "se": 0.334664, "low": -0.455929, "high": 0.855929}, abs=1e-6
    )
    # recovery 0.6 / 0.4 = 1.5, SE 0.334664 / 0.4; bounds 1 + (-0.455929, 0.855929) / 0.4
    assert summary.pop("recovery") == pytest.approx(
        {"value": 1.5, "se": 0.836660, "low": -0.139824, "high": 3.139824}, abs=1e-5
    )
    # McNemar: Bin(3, 1/2), 2 P(X <= 1) = 2 * 4 / 8, capped at 1
    assert summary == {
        "task": "qg",
        "metric": "exact_match",
        "n": 5,
        "flips_b": 1,
        "flips_c": 2,
        "flip_rate": pytest.approx(0.6),
        "mcnemar_p": 1.0,
    }


def test_flip_rate() -> None:
    est = Estimate(0.0, 0.0, 0.0, 0.0)
    comparison = TaskComparison("t", "acc", 20, est, est, est, est, b=3, c=2, mcnemar_p=1.0)
    assert comparison.flip_rate == 0.25  # (3 + 2) / 20


def test_a_baseline_that_is_never_right_has_no_recovery() -> None:
    r = compare_task("t", "acc", _side({0: 0, 1: 0, 2: 0}), _side({0: 0, 1: 1, 2: 0}))
    assert (r.b, r.c) == (0, 1) and r.accuracy_candidate.value == pytest.approx(1 / 3)
    assert all(math.isnan(x) for x in r.recovery.as_dict().values())


def test_documents_must_match() -> None:
    baseline = _side({i: 1 for i in range(10)})
    candidate = _side({i: 1 for i in range(3)})  # 3..9 missing: the first five named
    with pytest.raises(ConfigError, match=r"^task t: baseline and candidate scored different documents \(e\.g\. "):
        compare_task("t", "acc", baseline, candidate)
    with pytest.raises(ConfigError, match=r"doc_id \[3, 4, 5, 6, 7\]\)$"):
        compare_task("t", "acc", baseline, candidate)
    extra = _side({0: 1, 1: 1, 2: 1, 42: 0})
    with pytest.raises(ConfigError, match=r"doc_id \[42\]\)$"):
        compare_task("t", "acc", _side({0: 1, 1: 1, 2: 1}), extra)


def test_prompts_must_match() -> None:
    baseline = _side({0: 1, 1: 0, 2: 1, 3: 1})
    candidate = {**_side({0: 1, 1: 0, 2: 1, 3: 1}), 3: Sample(3, 1.0, "other3"), 2: Sample(2, 1.0, "other2")}
    message = (
        "task t: the rendered prompt of 2 documents differs between baseline and candidate (first doc_id 2); "
        "both sides must see the same prompt (check chat template, few-shot seed and task version)"
    )
    with pytest.raises(ConfigError) as caught:
        compare_task("t", "acc", baseline, candidate)
    assert str(caught.value) == message


@pytest.mark.parametrize("side", ["baseline", "candidate"])
def test_the_metric_must_be_right_or_wrong(side: str) -> None:
    good = _side({0: 1, 1: 0, 2: 1})
    odd = {**good, 1: Sample(1, 0.5, "q1")}
    baseline, candidate = (odd, good) if side == "baseline" else (good, odd)
    with pytest.raises(ConfigError) as caught:
        compare_task("t", "bleu", baseline, candidate)
    assert str(caught.value) == (
        "task t: metric bleu is not 0/1 per document (got 0.5); flips and McNemar need a right/wrong metric such "
        "as acc or exact_match"
    )


@pytest.mark.parametrize("n", [0, 1])
def test_a_comparison_needs_two_documents(n: int) -> None:
    side = _side({i: 1 for i in range(n)})
    with pytest.raises(ConfigError, match=rf"^task t: {n} documents; a paired comparison needs at least 2$"):
        compare_task("t", "acc", side, side)
    two = _side({0: 1, 1: 0})
    assert compare_task("t", "acc", two, two).n == 2
