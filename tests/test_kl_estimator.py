"""The sampled-tail KL estimator on hand-made distributions: the draws, the estimate, its variance,
and the fallback to the bound (no model; full-vocabulary checks are in test_fidelity_crosschecks.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qualgate.backends.rows import sample_tail, tail_seed
from qualgate.instruments.decode_path import BaselinePath, step_kl
from qualgate.instruments.fidelity import kl_sampled_tail, kl_topk_tail


def test_tail_draws_avoid_the_top_k_and_follow_the_tail_distribution() -> None:
    # P = [0.5, 0.3, 0.15, 0.05]; top-2 = {0, 1}; the tail {2, 3} is drawn 3:1
    logp = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    ids, values = sample_tail(logp, np.array([[0, 1]]), 20000, seed=7)
    assert set(ids[0].tolist()) == {2, 3}
    assert abs((ids[0] == 2).mean() - 0.75) < 0.01  # binomial SD sqrt(0.75 * 0.25 / 20000) = 0.003
    assert np.allclose(values[0], logp[0, ids[0]])
    again, _ = sample_tail(logp, np.array([[0, 1]]), 20000, seed=7)
    assert np.array_equal(ids, again), "seeded: the same golden on every machine"


def test_a_row_without_tail_draws_nothing() -> None:
    logp = np.log(np.array([[0.6, 0.4]]))
    ids, values = sample_tail(logp, np.array([[0, 1]]), 3, seed=0)
    assert ids.tolist() == [[0, 0, 0]] and np.all(values == -np.inf)


def test_the_seed_comes_from_the_tokens() -> None:
    assert tail_seed([1, 2, 3]) == tail_seed(np.array([1, 2, 3]))
    assert tail_seed([1, 2, 3]) != tail_seed([1, 2, 4])


def test_the_estimate_by_hand() -> None:
    # P top-1 = 0.5 (Q 0.4), P tail = 0.5 holding ids 2 and 3; draws: id 2 twice (P 0.3, Q 0.2), id 3
    # once (P 0.2, Q 0.4). head = 0.5 ln(0.5/0.4); tail = 0.5 x mean(ln 1.5, ln 1.5, ln 0.5)
    p_top, q_top = np.log([[0.5]]), np.log([[0.4]])
    p_draw, q_draw = np.log([[0.3, 0.3, 0.2]]), np.log([[0.2, 0.2, 0.4]])
    estimate, variance = kl_sampled_tail(p_top, q_top, np.array([0.5]), p_draw, q_draw)
    d = [math.log(1.5), math.log(1.5), math.log(0.5)]
    mean = sum(d) / 3
    assert estimate[0] == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.5 * mean, rel=1e-12)
    sample_var = sum((x - mean) ** 2 for x in d) / 2
    assert variance[0] == pytest.approx(0.25 * sample_var / 3, rel=1e-12)
    # the exact KL over the whole distribution, for the record: the estimate is unbiased, not exact
    full = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.4)
    assert abs(estimate[0] - full) < 0.2


def test_the_estimate_is_unbiased_over_many_draws() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(50))
    q = 0.7 * p + 0.3 * rng.dirichlet(np.ones(50))
    full = float((p * np.log(p / q)).sum())
    top = np.argsort(-p)[:5][None, :]
    logp, logq = np.log(p)[None, :], np.log(q)[None, :]
    estimates = []
    for seed in range(400):
        ids, values = sample_tail(logp, top, 8, seed)
        tail = np.array([1 - p[top[0]].sum()])
        est, _ = kl_sampled_tail(logp[:, top[0]], logq[:, top[0]], tail, values, logq[:, ids[0]])
        estimates.append(est[0])
    spread = np.std(estimates) / math.sqrt(len(estimates))
    assert abs(np.mean(estimates) - full) < 4 * spread
    bound = kl_topk_tail(logp[:, top[0]], np.array([1 - p[top[0]].sum()]), logq[:, top[0]])[0]
    assert bound < full, "the bucket bound stays below"


def test_step_kl_estimates_with_draws_and_bounds_without_or_with_unknowns() -> None:
    path = BaselinePath(
        [1],
        [2],
        np.array([[0]]),
        np.log([[0.5]]),
        np.array([0.5]),
        np.array([[2, 2, 3]]),
        np.log([[0.3, 0.3, 0.2]]),
    )
    gathered = np.log([[0.4, 0.2, 0.2, 0.4]])
    kl, sampled = step_kl(path, gathered)
    mean = (2 * math.log(1.5) + math.log(0.5)) / 3
    assert sampled and kl[0] == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.5 * mean)
    with_unknown = gathered.copy()
    with_unknown[0, 3] = np.nan  # an engine that did not return that id
    kl, sampled = step_kl(path, with_unknown)
    # the bound: 0.5 ln(0.5/0.4) + 0.5 ln(0.5/0.6) (Q's tail is 1 - 0.4), clipped at 0 when negative
    assert not sampled
    assert kl[0] == pytest.approx(max(0.0, 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)))


def test_baseline_paths_keep_their_draws_through_a_record() -> None:
    path = BaselinePath(
        [1, 2],
        [3],
        np.array([[0]]),
        np.array([[-0.1]]),
        np.array([0.1]),
        np.array([[5, 6]]),
        np.array([[-3.0, -np.inf]]),
    )
    back = BaselinePath.from_record(path.as_record())
    assert back.tail_ids is not None and back.tail_logprobs is not None
    assert back.tail_ids.tolist() == [[5, 6]] and back.tail_logprobs.tolist() == [[-3.0, -np.inf]]
    plain = BaselinePath([1], [2], np.array([[0]]), np.array([[-0.1]]), np.array([0.1]))
    assert BaselinePath.from_record(plain.as_record()).tail_ids is None
