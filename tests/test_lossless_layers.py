"""Speculation and prefix caching: identical greedy tokens to the stack without them, with stats."""

from __future__ import annotations

from typing import Any

import pytest

from qualgate import build_stack, open_session

TARGET = {"path": "bundled:target"}
NGRAM = {"kind": "speculation", "method": "ngram", "num_speculative_tokens": 4}
DRAFT = {"kind": "speculation", "method": "draft_model", "draft": "bundled:draft", "num_speculative_tokens": 4}
PREFIX = {"kind": "prefix_cache", "method": "block", "block_size": 16}


def _generate(layers: list[dict[str, Any]], prompts: list[str], max_new_tokens: int = 32) -> tuple[list[Any], Any]:
    with open_session(build_stack(TARGET, layers)) as session:
        return session.generate(prompts, max_new_tokens=max_new_tokens), session.layer_stats()


def _ids(generations: list[Any]) -> list[list[int]]:
    return [g.token_ids for g in generations]


@pytest.mark.parametrize("layer", [NGRAM, DRAFT], ids=["ngram", "draft"])
def test_speculation_is_lossless_and_measured(
    layer: dict[str, Any], base_generations: list[Any], general_prompts: list[str]
) -> None:
    generations, stats = _generate([layer], general_prompts)
    assert _ids(generations) == _ids(base_generations)
    spec = stats["speculation"]
    assert spec["proposed_tokens"] > 0 and 0 < spec["acceptance_rate"] < 1
    assert spec["accepted_tokens"] <= spec["proposed_tokens"]
    assert spec["mean_acceptance_length"] == pytest.approx(1 + spec["accepted_tokens"] / spec["verify_steps"])


def test_self_draft_accepts_everything(base_generations: list[Any], general_prompts: list[str]) -> None:
    """Draft = target: every proposal is what the target would choose; a sanity check on the counters."""
    generations, stats = _generate([{**DRAFT, "draft": "bundled:target"}], general_prompts)
    assert _ids(generations) == _ids(base_generations)
    assert stats["speculation"]["acceptance_rate"] > 0.99


def test_ngram_speculation_accepts_on_repetitive_text() -> None:
    prompt = ">>> print(a)\n1\n>>> print(a)\n1\n>>> print(a)\n1\n>>> print(a)\n"
    generations, stats = _generate([NGRAM], [prompt])
    reference, _ = _generate([], [prompt])
    assert _ids(generations) == _ids(reference)
    assert stats["speculation"]["mean_accepted_tokens"] > 1.5


def test_a_lossy_acceptance_rule_is_caught(base_generations: list[Any], general_prompts: list[str]) -> None:
    """The comparison can fail: accepting any top-2 draft token changes the output."""
    lossy = {**NGRAM, "method": "plugin_layers:LossyTop2Ngram"}
    generations, _ = _generate([lossy], general_prompts, max_new_tokens=32)
    assert _ids(generations) != _ids(base_generations)


def test_prefix_cache_cold_and_warm_match_and_report_hits(shared_prefix_prompts: list[str]) -> None:
    reference, _ = _generate([], shared_prefix_prompts)
    cold_then_warm = shared_prefix_prompts + shared_prefix_prompts
    generations, stats = _generate([PREFIX], cold_then_warm)
    assert _ids(generations) == _ids(reference) * 2
    prefix = stats["prefix_cache"]
    # Only the first prompt of each of the two prefix families misses: every other prompt shares its
    # family's system prefix, and every warm run reuses its own cold run.
    assert prefix["queries"] == len(cold_then_warm)
    assert prefix["hits"] == len(cold_then_warm) - 2
    assert prefix["reused_tokens"] % 16 == 0 and prefix["reused_tokens"] > 0


def test_prefix_reuse_is_in_whole_blocks_and_never_the_last_token() -> None:
    with open_session(build_stack(TARGET, [PREFIX])) as session:
        base = session.encode(
            "The list type supports the following operations on sequences of items, in addition to the "
            "common sequence operations described in the sections below; each of them raises an exception "
            "when the index is out of range, as described in the reference for mutable sequence types."
        )
        assert len(base) > 33
        session.generate([base], max_new_tokens=2)
        # A prompt sharing 21 tokens (not a block multiple) with the cached one reuses 16.
        other = base[:21] + session.encode(" and sets", add_bos=False)
        session.generate([other], max_new_tokens=2)
        assert session.layer_stats()["prefix_cache"]["reused_tokens"] == 16
        # A prompt of exactly one block: its last token must be computed, so nothing is reused.
        session.generate([base[:16]], max_new_tokens=2)
        assert session.layer_stats()["prefix_cache"]["reused_tokens"] == 16


W4 = {"kind": "weight_quant", "method": "rtn", "bits": 4, "group_size": 64}
FP8_KV = {"kind": "kv_quant", "method": "fp8"}
QUANTO_KV = {"kind": "kv_quant", "method": "quanto", "bits": 4, "residual_length": 64}


def test_full_stack_is_lossless_over_a_per_value_kv_quantizer(shared_prefix_prompts: list[str]) -> None:
    """FP8 rounds each value on its own, so reuse and verification see exactly what decoding sees."""
    reference, _ = _generate([W4, FP8_KV], shared_prefix_prompts)
    stacked, stats = _generate([W4, FP8_KV, DRAFT, PREFIX], shared_prefix_prompts * 2)
    assert _ids(stacked) == _ids(reference) * 2
    assert stats["prefix_cache"]["hits"] >= len(shared_prefix_prompts)
    assert stats["speculation"]["accepted_tokens"] > 0


def test_speculation_rewinds_a_cache_that_cannot_be_cropped(shared_prefix_prompts: list[str]) -> None:
    """transformers' quantized cache cannot drop rejected tokens: it is restored from a snapshot."""
    reference, _ = _generate([W4, QUANTO_KV], shared_prefix_prompts)
    stacked, stats = _generate([W4, QUANTO_KV, DRAFT], shared_prefix_prompts)
    assert _ids(stacked) == _ids(reference)
    assert 0 < stats["speculation"]["accepted_tokens"] < stats["speculation"]["proposed_tokens"]


def test_prefix_reuse_over_a_chunk_dependent_kv_quantizer_changes_the_output(
    shared_prefix_prompts: list[str],
) -> None:
    """A real interaction, not a bug of the harness: quanto quantizes each prefill chunk as a group,
    so a prefix computed (and cached) on its own is quantized differently from the same tokens inside
    a whole prompt. Prefix caching is lossless only over a quantizer that does not depend on chunking;
    the equivalence instrument must see this."""
    reference, _ = _generate([QUANTO_KV], shared_prefix_prompts)
    stacked, stats = _generate([QUANTO_KV, PREFIX], shared_prefix_prompts)
    assert stats["prefix_cache"]["reused_tokens"] > 0
    assert _ids(stacked) != _ids(reference)
