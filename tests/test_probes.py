"""Probe prompts cut from domain text, their coverage count, and the tolerance calibration, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from qualgate import ConfigError
from qualgate.instruments.equivalence import (
    EquivalenceConfig,
    Prompt,
    calibrate,
    classify,
    prefix_coverage,
    prefix_probes,
    speculation_probes,
)
from qualgate.instruments.shapes import (
    ShapeNoise,
    decode_schedule,
    prefix_schedules,
    verify_schedules,
)

TEXT = list(range(1000, 1600))  # distinct token ids: every substitution is visible
BOS = 1


def test_schedules_cover_every_input_once() -> None:
    assert decode_schedule(7, 5) == [7, 1, 1, 1, 1]
    shapes = verify_schedules(7, 11, k=4, seed=0)
    assert shapes["verify5@0"] == [7, 5, 5]
    assert shapes["verify5@3"] == [7, 3, 5, 2]
    assert set(shapes) >= {f"verify5@{p}" for p in range(5)} | {"verify-random0", "verify-random1"}
    assert all(sum(s) == 7 + 10 and all(b >= 1 for b in s) for s in shapes.values())
    assert verify_schedules(7, 11, 4, seed=3) == verify_schedules(7, 11, 4, seed=3), "seeded"
    hits = prefix_schedules(40, 3, 16)
    assert hits == {"prefix-hit@16": [16, 26], "prefix-hit@32": [32, 10]}
    assert set(prefix_schedules(90, 3, 16)) == {"prefix-hit@16", "prefix-hit@80"}, "first and last boundary"
    assert prefix_schedules(16, 3, 16) == {}, "a prompt of one block reuses nothing (its last token is recomputed)"


def test_prefix_probes_put_differences_inside_reusable_blocks() -> None:
    b = 16
    prompts = prefix_probes(TEXT, BOS, b)
    groups = {p.group for p in prompts}
    assert groups == {"prefix:base", "prefix:substitution", "prefix:boundary", "prefix:long-suffix"}
    base = next(p for p in prompts if p.id == "prefix-0-base")
    assert base.token_ids is not None and base.token_ids[0] == BOS and len(base.token_ids) % b, "a partial block"
    for where, offset in (("first", 0), ("middle", 8), ("last", 15)):
        sub = next(p for p in prompts if p.id == f"prefix-0-sub-b1-{where}")
        assert sub.token_ids is not None
        diff = [i for i, (x, y) in enumerate(zip(base.token_ids, sub.token_ids, strict=True)) if x != y]
        assert diff == [b + offset], (where, diff)
    for delta in (-1, 0, 1):
        share = next(p for p in prompts if p.id == f"prefix-0-share-2b{delta:+d}")
        assert share.token_ids is not None
        assert share.token_ids[: 2 * b + delta] == base.token_ids[: 2 * b + delta]
        assert share.token_ids[2 * b + delta] != base.token_ids[2 * b + delta]
    long = next(p for p in prompts if p.id == "prefix-0-long-suffix")
    assert long.token_ids is not None and len(long.token_ids) - b >= 3 * b


def test_prefix_coverage_by_hand() -> None:
    b = 4
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    same_tail = [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]  # differs in the last, partial block: never reused
    inside = [1, 2, 3, 4, 5, 99, 7, 8, 9, 10]  # differs inside block 1, which is reusable
    assert prefix_coverage([a, same_tail], b) == 0
    assert prefix_coverage([a, inside], b) == 1
    assert prefix_coverage([a, a], b) == 0, "an identical prompt crosses nothing"
    assert prefix_coverage([inside, a, same_tail], b) == 2
    short = [1, 2, 3, 4, 5, 99]  # reusable part is one block (the last token is always recomputed)
    assert prefix_coverage([a, short], b) == 0
    probes = prefix_probes(TEXT, BOS, 16)
    order = [list(p.token_ids or ()) for p in probes]
    assert prefix_coverage(order, 16) >= 12, "every substitution and boundary probe crosses a block"


def test_speculation_probes_have_three_acceptance_groups() -> None:
    prompts = speculation_probes(TEXT, BOS)
    assert [p.group for p in prompts[:3]] == ["speculation:high", "speculation:ordinary", "speculation:low"]
    high = prompts[0].token_ids
    assert high is not None and high[1:17] == high[17:33] == high[33:49] == high[49:65], "a phrase repeats"
    low, plain = prompts[2].token_ids, prompts[1].token_ids
    assert low is not None and plain is not None and sorted(low) == sorted(plain) and low != plain


def test_probes_refuse_a_short_text() -> None:
    with pytest.raises(ConfigError, match="probe text has 50 tokens"):
        prefix_probes(list(range(50)), BOS, 16)


def _noise(deltas: list[float]) -> ShapeNoise:
    values = np.asarray(deltas)
    return ShapeNoise(values, np.zeros_like(values), np.zeros_like(values), {"prefill": max(deltas)}, ["prefill"])


def test_calibrated_tolerance_by_hand() -> None:
    config = EquivalenceConfig()
    deltas = [0.0] * 999 + [2e-3]  # p99.9 interpolates: 0.999 * 0 ... between the last two values
    noise = _noise(deltas)
    p999 = float(np.percentile(np.asarray(deltas), 99.9))
    tol = calibrate(config, noise)
    assert tol.source == "calibrated" and tol.value == pytest.approx(max(1e-4, 4 * p999))
    assert tol.margin == pytest.approx(2 * 2e-3), "twice the largest measured noise"
    quiet = calibrate(config, _noise([1e-7] * 100))
    assert quiet.value == 1e-4, "float32 noise sits under the absolute floor"
    fixed = calibrate(EquivalenceConfig(logprob_tolerance=0.05), noise)
    assert fixed.source == "pipeline" and fixed.value == 0.05
    assert fixed.noise is not None and fixed.noise["logprob_delta"]["max"] == 2e-3, "the floor is still reported"


def _gen(tokens: list[int], top_ids: list[list[int]], top_lps: list[list[float]]) -> object:
    from qualgate import Generation

    return Generation([0], tokens, "", np.array(top_ids), np.array(top_lps), "length")


def test_near_tie_needs_both_tokens_in_each_others_top_k() -> None:
    ref = _gen([5], [[5, 7, 9]], [[-0.60, -0.70, -3.0]])
    both = _gen([7], [[7, 5, 9]], [[-0.6, -0.65, -3.0]])
    assert classify(ref, both, 0, 0.125, str).kind == "near_tie"  # type: ignore[arg-type]
    third = classify(ref, _gen([9], [[9, 7, 5]], [[-0.6, -0.65, -0.7]]), 0, 0.125, str)  # type: ignore[arg-type]
    assert third.kind == "real" and third.margin == pytest.approx(2.4), (
        "the margin is the reference's own choice against the candidate's (rank 3: 2.4 nats)"
    )
    not_back = _gen([7], [[7, 8, 9]], [[-0.6, -0.65, -3.0]])
    found = classify(ref, not_back, 0, 0.125, str)  # type: ignore[arg-type]
    assert found.kind == "real" and found.reference_rank is None, (
        "the reference's token is not in the candidate's top-k"
    )
    wide = classify(ref, both, 0, 0.05, str)  # type: ignore[arg-type]
    assert wide.kind == "real", "margin 0.1 above the (noise-widened) eps 0.05"


def test_prompt_source_is_tokens_for_probes() -> None:
    assert Prompt("a", "text").source == "text"
    assert Prompt("a", "", "g", (1, 2)).source == [1, 2]
