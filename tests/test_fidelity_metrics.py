"""Fidelity metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qualgate import ConfigError
from qualgate.instruments.fidelity import TokenScores, compare, kl_topk_tail


def test_kl_top_k_plus_tail_by_hand() -> None:
    p_top = np.log(np.array([[0.5, 0.3]]))
    q_at_p = np.log(np.array([[0.4, 0.4]]))
    kl = kl_topk_tail(p_top, np.array([0.2]), q_at_p)
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    assert kl[0] == pytest.approx(expected, abs=1e-12)


def test_kl_tail_bucket_counts_mass_that_moved_out_of_the_top_k() -> None:
    p_top = np.log(np.array([[0.9]]))
    q_at_p = np.log(np.array([[0.5]]))
    kl = kl_topk_tail(p_top, np.array([0.1]), q_at_p)
    assert kl[0] == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))


def test_kl_is_zero_for_identical_distributions_and_without_tail() -> None:
    p_top = np.log(np.array([[0.7, 0.3], [1.0, 1e-300]]))
    assert np.allclose(kl_topk_tail(p_top, np.array([0.0, 0.0]), p_top), 0.0)


def _scores(
    logprob: list[float],
    top1: list[int],
    top_probs: list[list[float]],
    gathered: list[list[float]] | None,
    chunks: list[int],
) -> TokenScores:
    top = np.log(np.array(top_probs))
    n = len(logprob)
    return TokenScores(
        chunk=np.array(chunks, dtype=np.int32),
        target=np.arange(n, dtype=np.int64),
        logprob=np.array(logprob, dtype=np.float64),
        top_ids=np.stack([np.array(top1), np.array(top1) + 100], axis=1),
        top_logprobs=top,
        tail_mass=1 - np.exp(top).sum(axis=1),
        gathered=None if gathered is None else np.log(np.array(gathered)),
    )


def test_compare_by_hand() -> None:
    chunks = [0, 0, 1, 1]
    reference = _scores(
        [math.log(0.5), math.log(0.25), math.log(0.8), math.log(0.1)],
        [1, 2, 3, 4],
        [[0.5, 0.3], [0.6, 0.2], [0.8, 0.1], [0.96, 0.02]],
        None,
        chunks,
    )
    candidate = _scores(
        [math.log(0.4), math.log(0.25), math.log(0.8), math.log(0.2)],
        [1, 9, 3, 4],
        [[0.4, 0.4], [0.5, 0.2], [0.8, 0.1], [0.9, 0.05]],
        [[0.4, 0.4], [0.5, 0.2], [0.8, 0.1], [0.9, 0.05]],
        chunks,
    )
    summary = compare(reference, candidate).summary
    d = np.array([math.log(0.5 / 0.4), 0.0, 0.0, math.log(0.1 / 0.2)])  # nll_Q - nll_P
    assert summary["ln_ppl_ratio"]["value"] == pytest.approx(d.mean())
    chunk_means = np.array([d[:2].mean(), d[2:].mean()])
    assert summary["ln_ppl_ratio"]["se"] == pytest.approx(math.sqrt(chunk_means.var(ddof=1) / 2))
    assert summary["ppl_ratio"]["value"] == pytest.approx(math.exp(d.mean()))
    assert summary["same_top1"]["value"] == 0.75
    assert summary["same_top1"]["se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    kl = [
        0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2),
        0.6 * math.log(0.6 / 0.5) + 0.2 * math.log(0.2 / 0.2) + 0.2 * math.log(0.2 / 0.3),
        0.0,
        0.96 * math.log(0.96 / 0.9) + 0.02 * math.log(0.02 / 0.05) + 0.02 * math.log(0.02 / 0.05),
    ]
    assert summary["kl_mean"]["value"] == pytest.approx(np.mean(kl))
    assert summary["kl_percentiles"]["max"] == pytest.approx(max(kl))
    dp = np.array([0.4 - 0.5, 0.0, 0.0, 0.2 - 0.1])
    assert summary["dp_rms"] == pytest.approx(math.sqrt((dp**2).mean()))
    buckets = {b["bucket"]: b for b in summary["kl_by_confidence"]}
    assert buckets["[0.5,0.75)"]["n"] == 2 and buckets["[0.75,0.95)"]["n"] == 1 and buckets["[0.95,1]"]["n"] == 1
    assert buckets["[0.95,1]"]["kl_mean"] == pytest.approx(kl[3])
    assert summary["ppl_reference"] == pytest.approx(math.exp(-np.mean(np.log([0.5, 0.25, 0.8, 0.1]))))


def test_compare_refuses_mismatched_sides() -> None:
    a = _scores([-1.0, -1.0], [1, 2], [[0.5, 0.2], [0.5, 0.2]], None, [0, 1])
    with pytest.raises(ConfigError, match="scored with the reference"):
        compare(a, a)
    b = _scores([-1.0], [1], [[0.5, 0.2]], [[0.5, 0.2]], [0])
    with pytest.raises(ConfigError, match="different tokens"):
        compare(a, b)
