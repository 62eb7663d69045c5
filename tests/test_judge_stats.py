"""Judge statistics (instruments/judge/stats.py) on hand-worked cases: both orders of a pairwise verdict,
win / tie / loss counts and the sign of the net loss, and single-answer grades. The bootstrap's resample
indices are fixed through a stand-in generator, so its interval is hand-computable too. No endpoint, no
fixture (fast; mutation-tested)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from qualgate.instruments.judge.stats import bootstrap_mean, combine, grade_summary, pairwise_summary
from qualgate.stats import Estimate


@contextmanager
def no_numpy_warnings() -> Iterator[None]:
    """Empty inputs give NaN by design, never through numpy's "mean of empty slice" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# -- combine: order 1 shows A = baseline, B = candidate; order 2 the swap ---------------------------
@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("A", "B", ("loss", True)),  # the baseline won in both positions
        ("B", "A", ("win", True)),  # the candidate won in both positions
        ("tie", "tie", ("tie", True)),
        ("A", "A", ("tie", False)),  # always the first position: the position won, not an answer
        ("B", "B", ("tie", False)),  # always the second position
        ("A", "tie", ("tie", False)),
        ("B", "tie", ("tie", False)),
        ("tie", "A", ("tie", False)),
        ("tie", "B", ("tie", False)),
        (None, "A", ("unparsed", False)),
        ("B", None, ("unparsed", False)),
        (None, None, ("unparsed", False)),
    ],
)
def test_combine_all_orders(first: str | None, second: str | None, expected: tuple[str, bool]) -> None:
    assert combine(first, second) == expected


# -- the bootstrap, with resample indices chosen by hand ------------------------------------------
class _FixedGenerator:
    """Stands in for numpy's generator: returns the given resample indices and records the request."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = np.array(rows)
        self.calls: list[tuple[Any, ...]] = []

    def integers(self, low: int, high: int, size: tuple[int, int]) -> np.ndarray:
        self.calls.append((low, high, size))
        return self.rows


@pytest.fixture
def fixed_rng(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a generator factory; returns a function that sets the rows and lists the seeds asked for."""
    import scipy.stats  # noqa: F401  (imported now: its import draws from numpy's generator)

    seeds: list[Any] = []
    state: dict[str, _FixedGenerator] = {}

    def use(rows: list[list[int]]) -> tuple[_FixedGenerator, list[Any]]:
        state["gen"] = _FixedGenerator(rows)
        return state["gen"], seeds

    def factory(seed: Any = None) -> _FixedGenerator:
        seeds.append(seed)
        return state["gen"]

    monkeypatch.setattr(np.random, "default_rng", factory)
    return use


def test_bootstrap_interval_by_hand(fixed_rng: Any) -> None:
    gen, seeds = fixed_rng([[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 2, 3], [3, 3, 3, 3], [1, 2, 1, 2]])
    est = bootstrap_mean(np.array([1.0, 2.0, 3.0, 4.0]), resamples=5, seed=7)
    assert seeds == [7] and gen.calls == [(0, 4, (5, 4))]
    # resample means 1, 2, 2.5, 4, 2.5 -> sorted 1, 2, 2.5, 2.5, 4 (positions 0..4)
    # 2.5th percentile at 4 * 0.025 = 0.1: 1 + 0.1 (2 - 1) = 1.1; 97.5th at 3.9: 2.5 + 0.9 (4 - 2.5) = 3.85
    # SE = std (ddof 1) of the means: mean 2.4; squares 1.96, 0.16, 0.01, 0.01, 2.56 = 4.7; sqrt(4.7 / 4)
    assert est.value == 2.5  # the sample's own mean, not the resamples'
    assert est.se == pytest.approx(1.083974, abs=1e-6)
    assert est.low == pytest.approx(1.1) and est.high == pytest.approx(3.85)


def test_bootstrap_of_nothing_is_nan() -> None:
    with no_numpy_warnings():
        est = bootstrap_mean(np.array([]), resamples=10, seed=0)
    assert all(math.isnan(x) for x in est.as_dict().values())


def test_bootstrap_of_one_value_is_that_value() -> None:
    est = bootstrap_mean(np.array([3.0]), resamples=20, seed=0)  # every resample is [3]
    assert est == Estimate(3.0, 0.0, 3.0, 3.0)


def test_bootstrap_with_numpy_is_seeded_and_brackets_the_mean() -> None:
    values = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    first, again = bootstrap_mean(values, 500, seed=3), bootstrap_mean(values, 500, seed=3)
    assert first == again and first.value == pytest.approx(0.6)
    # every resample mean is a multiple of 1/5 in [0, 1]
    assert 0.0 <= first.low <= 0.6 <= first.high <= 1.0 and first.low < first.high
    assert round(first.low * 5, 9).is_integer() and round(first.high * 5, 9).is_integer()


# -- pairwise_summary ------------------------------------------------------------------------------
def test_pairwise_summary_counts_and_net_loss_sign(fixed_rng: Any) -> None:
    outcomes = [("loss", True), ("win", True), ("unparsed", False), ("tie", False), ("loss", True)]
    # parsed: loss, win, tie, loss -> per prompt +1, -1, 0, +1 (a loss counts against the candidate)
    gen, seeds = fixed_rng([[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2], [0, 1, 2, 3]])
    summary = pairwise_summary(outcomes, [5, -1, 2], resamples=4, seed=11)
    assert seeds == [11] and gen.calls == [(0, 4, (4, 4))]
    assert (summary.n, summary.win, summary.tie, summary.loss, summary.unparsed) == (4, 1, 1, 2, 1)
    # net loss (2 - 1) / 4 = 0.25 > 0: the candidate lost more than it won
    # resample means 1, -1, 0, 0.25 -> sorted -1, 0, 0.25, 1: 2.5th at 0.075: -1 + 0.075 = -0.925;
    # 97.5th at 2.925: 0.25 + 0.925 * 0.75 = 0.94375; SE: mean 0.0625, squares sum 2.046875, / 3 -> 0.826010
    assert summary.net_loss.as_dict() == pytest.approx(
        {"value": 0.25, "se": 0.826010, "low": -0.925, "high": 0.94375}, abs=1e-6
    )
    assert summary.consistency == 0.75  # 3 of the 4 parsed verdicts agreed across orders
    assert summary.length_delta == 2.0  # (5 - 1 + 2) / 3
    assert summary.as_dict() == {
        "n": 4,
        "win": 1,
        "tie": 1,
        "loss": 2,
        "unparsed": 1,
        "net_loss": summary.net_loss.as_dict(),
        "position_consistency": 0.75,
        "length_delta": 2.0,
    }


def test_more_wins_than_losses_is_a_negative_net_loss() -> None:
    outcomes = [("win", True), ("win", True), ("win", False), ("loss", True), ("tie", True)]
    summary = pairwise_summary(outcomes, [0], resamples=200, seed=0)
    assert summary.net_loss.value == pytest.approx(-0.4)  # (1 - 3) / 5
    assert (summary.win, summary.loss, summary.tie, summary.unparsed) == (3, 1, 1, 0)
    assert summary.consistency == pytest.approx(0.8)


def test_pairwise_summary_of_nothing_parsed() -> None:
    with no_numpy_warnings():
        summary = pairwise_summary([("unparsed", False), ("unparsed", False)], [], resamples=10, seed=0)
    assert (summary.n, summary.win, summary.tie, summary.loss, summary.unparsed) == (0, 0, 0, 0, 2)
    assert math.isnan(summary.net_loss.value) and math.isnan(summary.consistency)
    assert math.isnan(summary.length_delta)


# -- grade_summary ---------------------------------------------------------------------------------
def test_grade_summary_by_hand(fixed_rng: Any) -> None:
    baseline = [5, None, 7, 6, 4, 8]
    candidate = [6, 9, None, 8, 1, 12]
    # pairs with both grades: (5, 6), (6, 8), (4, 1), (8, 12): deltas 1, 2, -3, 4; two unparsed
    gen, seeds = fixed_rng([[3, 3, 3, 3], [0, 1, 2, 3]])
    summary = grade_summary(baseline, candidate, resamples=2, seed=5)
    assert seeds == [5] and gen.calls == [(0, 4, (2, 4))]
    # Wilcoxon, exact: ranks of |d| are 1, 2, 3, 4 and T- = 3; subsets of {1, 2, 3, 4} summing to at most 3:
    # {}, {1}, {2}, {3}, {1, 2} -> 5 of 16; two-sided 10 / 16
    assert summary["wilcoxon_p"] == pytest.approx(10 / 16)
    assert (summary["n"], summary["unparsed"]) == (4, 2)
    assert summary["mean_baseline"] == 5.75 and summary["mean_candidate"] == 6.75  # 23 / 4, 27 / 4
    # resample means 4 and 1: interval 1 + 0.025 * 3 = 1.075 to 1 + 0.975 * 3 = 3.925; SE sqrt(4.5)
    assert summary["mean_delta"] == pytest.approx(
        {"value": 1.0, "se": math.sqrt(4.5), "low": 1.075, "high": 3.925}, abs=1e-9
    )


def test_wilcoxon_drops_zero_deltas() -> None:
    # deltas 0, 1, 2, 3, 4, 5: the zero is dropped; all five ranks positive: P(T- = 0) = 1 / 32, two-sided 2 / 32
    summary = grade_summary([3, 1, 1, 1, 1, 1], [3, 2, 3, 4, 5, 6], resamples=50, seed=0)
    assert summary["wilcoxon_p"] == pytest.approx(0.0625)
    assert summary["n"] == 6 and summary["mean_delta"]["value"] == pytest.approx(2.5)  # 15 / 6


def test_identical_grades_are_not_significant() -> None:
    summary = grade_summary([3, 4, None], [3, 4, 2], resamples=50, seed=0)
    assert summary["wilcoxon_p"] == 1.0 and (summary["n"], summary["unparsed"]) == (2, 1)
    assert summary["mean_delta"]["value"] == 0.0 and summary["mean_baseline"] == 3.5


def test_identical_grades_on_many_prompts_are_not_significant_without_asking_scipy() -> None:
    # 40 zero deltas: scipy's Wilcoxon drops every one and has no p-value left to give (NaN from its normal
    # approximation); nothing differs, so the p-value is 1 without running the test
    summary = grade_summary([7] * 40, [7] * 40, resamples=50, seed=0)
    assert summary["wilcoxon_p"] == 1.0 and summary["n"] == 40


def test_equal_nonzero_deltas_are_tested() -> None:
    # five deltas of +1: all ranks positive, P(T- = 0) = 1 / 32, two-sided 2 / 32
    summary = grade_summary([4] * 5, [5] * 5, resamples=50, seed=0)
    assert summary["wilcoxon_p"] == pytest.approx(0.0625)


def test_grades_must_pair_up() -> None:
    with pytest.raises(ValueError, match="shorter"):  # one list per prompt on each side: never truncated
        grade_summary([5, 6, 7], [5, 6], resamples=10, seed=0)


def test_no_parsed_grade_gives_nan_everywhere() -> None:
    with no_numpy_warnings():
        summary = grade_summary([None, 2], [1, None], resamples=50, seed=0)
    assert (summary["n"], summary["unparsed"]) == (0, 2)
    assert math.isnan(summary["wilcoxon_p"]) and math.isnan(summary["mean_baseline"])
    assert math.isnan(summary["mean_candidate"]) and math.isnan(summary["mean_delta"]["value"])
