"""Paired statistics on small hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qualgate.stats import Estimate, clustered_mean, pearson, percentiles, plain_mean, proportion


def test_clustered_mean_equals_the_se_of_chunk_means_for_equal_chunks() -> None:
    values = np.array([1.0, 3.0, 2.0, 2.0, 6.0, 4.0])  # chunk means 2, 2, 5
    chunks = np.array([0, 0, 1, 1, 2, 2])
    est = clustered_mean(values, chunks)
    assert est.value == pytest.approx(3.0)
    # var of chunk means (ddof=1) = ((2-3)^2 + (2-3)^2 + (5-3)^2) / 2 = 3; SE = sqrt(3 / 3) = 1
    assert est.se == pytest.approx(1.0)
    assert est.low == pytest.approx(3.0 - 1.959964, abs=1e-6) and est.high == pytest.approx(3.0 + 1.959964, abs=1e-6)


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
