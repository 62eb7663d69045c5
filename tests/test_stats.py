"""Paired statistics on small hand-computed cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from qualgate.stats import (
    Estimate,
    clustered_mean,
    pearson,
    percentiles,
    plain_mean,
    proportion,
    z_value,
    zero_events_bound,
    zero_events_n,
)


def test_clustered_mean_equals_the_se_of_chunk_means_for_equal_chunks() -> None:
    values = np.array([1.0, 3.0, 2.0, 2.0, 6.0, 4.0])  # chunk means 2, 2, 5
    chunks = np.array([0, 0, 1, 1, 2, 2])
    est = clustered_mean(values, chunks)
    assert est.value == pytest.approx(3.0)
    # var of chunk means (ddof=1) = ((2-3)^2 + (2-3)^2 + (5-3)^2) / 2 = 3; SE = sqrt(3 / 3) = 1
    assert est.se == pytest.approx(1.0)
    # Student's t with C - 1 = 2 degrees of freedom: t(0.975, 2) = 4.302653 (table)
    assert est.low == pytest.approx(3.0 - 4.302653, abs=1e-6) and est.high == pytest.approx(3.0 + 4.302653, abs=1e-6)


def test_clustered_se_is_wider_than_the_iid_one_when_chunks_are_correlated() -> None:
    rng = np.random.default_rng(0)
    chunk_effect = np.repeat(rng.normal(size=20), 50)
    values = chunk_effect + 0.1 * rng.normal(size=1000)
    chunks = np.repeat(np.arange(20), 50)
    assert clustered_mean(values, chunks).se > 3 * plain_mean(values).se


def test_clustered_mean_with_unequal_chunks_is_the_cluster_robust_formula() -> None:
    values = np.array([1.0, 2.0, 3.0, 10.0])
    chunks = np.array([0, 0, 0, 1])
    mean = 4.0
    sums, sizes = np.array([6.0, 10.0]), np.array([3, 1])
    expected = math.sqrt(2 / 1 * ((sums - sizes * mean) ** 2).sum() / 16)
    assert clustered_mean(values, chunks).se == pytest.approx(expected)


def test_one_chunk_has_no_interval() -> None:
    assert math.isnan(clustered_mean(np.array([1.0, 2.0]), np.array([0, 0])).se)


def test_plain_mean_and_proportion() -> None:
    est = plain_mean(np.array([1.0, 2.0, 3.0, 4.0]))
    assert est.se == pytest.approx(math.sqrt(1.25 / 3))
    top1 = proportion(np.array([True, True, True, False]))
    assert top1.value == 0.75 and top1.se == pytest.approx(math.sqrt(0.75 * 0.25 / 3))


def test_map_transforms_the_interval() -> None:
    est = Estimate.normal(0.1, 0.05).map(np.exp)
    assert est.value == pytest.approx(math.exp(0.1)) and est.low == pytest.approx(math.exp(0.1 - 1.959964 * 0.05))


def test_percentiles_and_correlation() -> None:
    values = np.arange(101, dtype=float)
    p = percentiles(values)
    assert p["p50"] == 50 and p["p99"] == 99 and p["min"] == 0 and p["max"] == 100
    assert pearson(values, 2 * values + 1) == pytest.approx(1.0)
    assert math.isnan(pearson(values, np.ones(101)))


# -- every number below is worked out by hand in the comments ---------------------------------------
Z90 = 1.6448536269514722  # the 95th percentile of the standard normal (table value)


def test_z_values_are_the_normal_quantiles() -> None:
    # two-sided level L -> the (1 + L) / 2 quantile: table values
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert z_value(0.90) == pytest.approx(Z90, abs=1e-9)
    assert z_value(0.99) == pytest.approx(2.575829, abs=1e-6)
    assert z_value(0.5) == pytest.approx(0.674490, abs=1e-6)


def test_normal_interval_at_95_and_at_another_level() -> None:
    est = Estimate.normal(1.0, 0.5)
    # 1 -+ 1.959964 * 0.5 = 1 -+ 0.979982
    assert (est.value, est.se) == (1.0, 0.5)
    assert est.low == pytest.approx(0.020018, abs=1e-6) and est.high == pytest.approx(1.979982, abs=1e-6)
    at90 = Estimate.normal(1.0, 0.5, level=0.90)
    # 1 -+ 1.644854 * 0.5 = 1 -+ 0.822427
    assert at90.low == pytest.approx(0.177573, abs=1e-6) and at90.high == pytest.approx(1.822427, abs=1e-6)


def test_the_95_interval_uses_the_constant_exactly() -> None:
    # Z95 to full precision, so recorded intervals reproduce bit for bit (the quantile function's own
    # result differs in the last place)
    assert Estimate.normal(0.0, 1.0) == Estimate(0.0, 1.0, -1.959963984540054, 1.959963984540054)


@pytest.mark.parametrize(
    ("df", "level", "t"),
    [
        # Student's t quantiles t(0.5 + level / 2, df), table values
        (1, 0.95, 12.706205),
        (2, 0.95, 4.302653),
        (15, 0.95, 2.131450),
        (1, 0.90, 6.313752),
        (15, 0.90, 1.753050),
    ],
)
def test_student_interval_by_hand(df: int, level: float, t: float) -> None:
    est = Estimate.student(2.0, 0.5, df, level)
    assert (est.value, est.se) == (2.0, 0.5)
    assert est.low == pytest.approx(2.0 - 0.5 * t, abs=1e-6) and est.high == pytest.approx(2.0 + 0.5 * t, abs=1e-6)
    if level == 0.95:
        assert Estimate.student(2.0, 0.5, df) == est, "95% by default"


def test_map_and_as_dict() -> None:
    est = Estimate(1.0, 0.2, 0.5, 2.0).map(np.log)
    # log 1 = 0, log 0.5 = -0.693147, log 2 = 0.693147; a mapped estimate has no standard error
    assert est.value == 0.0 and math.isnan(est.se)
    assert est.low == pytest.approx(-0.693147, abs=1e-6) and est.high == pytest.approx(0.693147, abs=1e-6)
    assert Estimate(1.0, 0.2, 0.5, 2.0).as_dict() == {"value": 1.0, "se": 0.2, "low": 0.5, "high": 2.0}


def test_clustered_mean_with_three_unequal_chunks_by_hand() -> None:
    # labels need not be sorted or integers: chunk "b" = {2, 4, 6}, "a" = {12}, "c" = {3, 3}
    values = np.array([2.0, 4.0, 6.0, 12.0, 3.0, 3.0])
    chunks = np.array(["b", "b", "b", "a", "c", "c"])
    # N = 6, mean 30 / 6 = 5; residual sums (sum - size * mean): b 12 - 15 = -3, a 12 - 5 = 7, c 6 - 10 = -4
    # var = C / (C - 1) * (9 + 49 + 16) / N^2 = 3 / 2 * 74 / 36 = 3.083333; SE = 1.755942
    est = clustered_mean(values, chunks, level=0.90)
    assert est.value == pytest.approx(5.0) and est.se == pytest.approx(1.755942, abs=1e-6)
    # at 90% with C - 1 = 2 degrees of freedom: 5 -+ t(0.95, 2) * SE = 5 -+ 2.919986 * 1.755942 = 5 -+ 5.127326
    assert est.low == pytest.approx(-0.127326, abs=1e-5) and est.high == pytest.approx(10.127326, abs=1e-5)


def test_clustered_mean_of_one_chunk_or_one_value_has_a_mean_but_no_interval() -> None:
    for values, chunks in (([1.0, 2.0, 6.0], [4, 4, 4]), ([7.0], [0])):
        est = clustered_mean(np.array(values), np.array(chunks))
        assert est.value == pytest.approx(sum(values) / len(values))
        assert math.isnan(est.se) and math.isnan(est.low) and math.isnan(est.high)
    with pytest.raises(ValueError, match=r"^no values to average$"):
        clustered_mean(np.array([]), np.array([]))


def test_plain_mean_by_hand() -> None:
    # [1, 3]: mean 2, population variance 1, SE sqrt(1 / (2 - 1)) = 1
    est = plain_mean(np.array([1.0, 3.0]))
    assert (est.value, est.se) == (2.0, 1.0)
    assert est.low == pytest.approx(2 - 1.959964, abs=1e-6) and est.high == pytest.approx(2 + 1.959964, abs=1e-6)
    assert plain_mean(np.array([1.0, 3.0]), level=0.90).low == pytest.approx(2 - Z90)


def test_proportion_by_hand() -> None:
    # truthy values count: [3, 0, 0, 1] -> 2 of 4; SE sqrt(0.5 * 0.5 / 3) = 0.288675
    est = proportion(np.array([3, 0, 0, 1]))
    assert est.value == 0.5 and est.se == pytest.approx(0.288675, abs=1e-6)
    # at 90%: 0.5 - 1.644854 * 0.288675 = 0.5 - 0.474828
    assert proportion(np.array([3, 0, 0, 1]), level=0.90).low == pytest.approx(0.025172, abs=1e-6)


def test_two_values_have_a_standard_error() -> None:
    # [True, False]: p 0.5, SE sqrt(0.25 / 1) = 0.5
    assert proportion(np.array([True, False])).se == pytest.approx(0.5)


def test_float32_values_are_averaged_in_float64() -> None:
    # in float32, 1e8 + 1 rounds back to 1e8 (the spacing there is 8): the mean would come out 1 / 4
    values = np.array([1e8, 1.0, -1e8, 1.0], dtype=np.float32)
    assert clustered_mean(values, np.array([0, 0, 1, 1])).value == 0.5  # (1e8 + 1 - 1e8 + 1) / 4
    assert plain_mean(values).value == 0.5
    # the median of 1 and 1e8 is 50000000.5, which float32 cannot hold
    assert percentiles(np.array([1.0, 1e8], dtype=np.float32), which=(50.0,))["p50"] == 50000000.5


def test_one_value_has_no_standard_error_and_no_numpy_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by N - 1 = 0 behind the NaN
        mean = plain_mean(np.array([4.0]))
        share = proportion(np.array([True]))
    assert mean.value == 4.0 and math.isnan(mean.se) and math.isnan(mean.low)
    assert share.value == 1.0 and math.isnan(share.se) and math.isnan(share.high)


def test_percentiles_interpolate_linearly_by_hand() -> None:
    # [1..5]: percentile q sits at index 4 q / 100: q 10 -> 0.4 -> 1.4; q 25 -> 1 -> 2; q 99.9 -> 3.996 -> 4.996
    p = percentiles(np.array([5.0, 1.0, 4.0, 2.0, 3.0]), which=(10.0, 25.0, 50.0, 99.9))
    assert p == pytest.approx({"p10": 1.4, "p25": 2.0, "p50": 3.0, "p99.9": 4.996, "min": 1.0, "max": 5.0})


def test_default_percentiles_include_both_tails() -> None:
    p = percentiles(np.arange(1001, dtype=float))  # index = value; q sits at 1000 q / 100 = 10 q
    expected_q = (0.1, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)
    assert list(p) == [f"p{q:g}" for q in expected_q] + ["min", "max"]
    assert p == pytest.approx({**{f"p{q:g}": 10.0 * q for q in expected_q}, "min": 0.0, "max": 1000.0})


def test_pearson_by_hand() -> None:
    # x = [1, 2, 3], y = [1, 3, 2]: deviations (-1, 0, 1) and (-1, 1, 0): r = 1 / sqrt(2 * 2) = 0.5
    assert pearson(np.array([1, 2, 3]), np.array([1, 3, 2])) == pytest.approx(0.5)
    assert pearson(np.array([1, 2, 3]), np.array([3, 1, 2])) == pytest.approx(-0.5)  # (1, -1, 0): -1 / 2
    # standard deviations of exactly 1 are not special: x = [1, 3], y = [2, 6]: r = 1
    assert pearson(np.array([1.0, 3.0]), np.array([2.0, 6.0])) == pytest.approx(1.0)
    assert pearson(np.array([2.0, 6.0]), np.array([1.0, 3.0])) == pytest.approx(1.0)


def test_pearson_of_a_constant_is_nan_without_a_numpy_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not corrcoef's division by a zero deviation
        assert math.isnan(pearson(np.ones(3), np.array([1.0, 3.0, 2.0])))
        assert math.isnan(pearson(np.array([1.0, 3.0, 2.0]), np.full(3, 4.0)))


@pytest.mark.parametrize(
    ("n", "bound"),
    [
        (1, 0.975),  # 1 - 0.025
        (2, 0.841886),  # 1 - sqrt(0.025) = 1 - 0.158114
        (4, 0.602365),  # 1 - 0.025^(1/4) = 1 - sqrt(0.158114) = 1 - 0.397635
        (100, 0.036217),  # 1 - exp(ln 0.025 / 100) = 1 - exp(-0.0368888) = 1 - 0.963783
    ],
)
def test_zero_events_bound_by_hand(n: int, bound: float) -> None:
    assert zero_events_bound(n) == pytest.approx(bound, abs=1e-6)


def test_zero_events_bound_at_another_alpha() -> None:
    assert zero_events_bound(2, alpha=0.25) == 0.5  # 1 - sqrt(0.25)
    assert zero_events_bound(3, alpha=0.125) == pytest.approx(0.5)  # 1 - cbrt(1 / 8)


@pytest.mark.parametrize(
    ("bound", "n"),
    [
        # ln 0.025 / ln(1 - bound), rounded up: ln 0.025 = -3.688879
        (0.5, 6),  # -3.688879 / -0.693147 = 5.32: n = 5 bounds at 0.5218, n = 6 at 0.4593
        (0.1, 36),  # -3.688879 / -0.105361 = 35.01: n = 35 bounds at 0.10003, just above
        (0.975, 1),  # exactly 1: one trial
        (1.0, 1),  # nothing to bound
        (1.5, 1),
    ],
)
def test_zero_events_n_by_hand(bound: float, n: int) -> None:
    assert zero_events_n(bound) == n


def test_zero_events_n_is_exact_on_the_bound_itself() -> None:
    # the bound of n = 9, 1 - 0.025^(1/9) = 0.336230, inverts to 9.000000000000004 in floating point:
    # still 9 trials, not 10
    assert zero_events_n(1 - 0.025 ** (1 / 9)) == 9
    assert zero_events_n(0.5, alpha=0.25) == 2  # ln 0.25 / ln 0.5 = 2
    assert zero_events_n(0.5, alpha=0.2) == 3  # ln 0.2 / ln 0.5 = 2.32
