"""The in-process session: scoring, generation, dtypes and input checks on the bundled target."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from qualgate import ConfigError, build_stack, open_session


def test_score_matches_a_direct_forward_pass(base_session: Any, domain_ids: list[int]) -> None:
    result = base_session.score(domain_ids, top_k=16)
    with torch.no_grad():
        logits = base_session.model(input_ids=torch.tensor([domain_ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(domain_ids[1:])
    assert result.logprobs.shape == (len(domain_ids) - 1,)
    np.testing.assert_allclose(result.logprobs, expected[torch.arange(len(targets)), targets].numpy(), atol=1e-5)
    np.testing.assert_allclose(result.top_logprobs, expected.topk(16).values.numpy(), atol=1e-5)
    assert np.all(np.diff(result.top_logprobs, axis=1) <= 0), "top-k must be sorted best first"
    np.testing.assert_allclose(result.tail_mass, 1 - np.exp(result.top_logprobs).sum(axis=1), atol=1e-12)
    assert np.all((result.tail_mass >= 0) & (result.tail_mass < 1))


def test_full_vocabulary_top_k_has_no_tail(base_session: Any, domain_ids: list[int]) -> None:
    result = base_session.score(domain_ids[:64], top_k=base_session.vocab_size)
    assert result.top_k == base_session.vocab_size
    assert np.all(result.tail_mass < 1e-5)


def test_block_scoring_equals_one_pass_up_to_float_noise(base_session: Any, domain_ids: list[int]) -> None:
    one_pass = base_session.score(domain_ids, top_k=8)
    for block in (1, 7, 64):
        blocked = base_session.score(domain_ids, top_k=8, block_size=block)
        assert blocked.block_size == block
        assert np.max(np.abs(blocked.logprobs - one_pass.logprobs)) < 1e-4


def test_generation_is_greedy_and_reports_its_distributions(base_session: Any, base_generations: list[Any]) -> None:
    for gen in base_generations:
        assert len(gen.token_ids) == len(gen.top_ids) == len(gen.top_logprobs)
        assert gen.finish_reason in ("stop", "length")
        assert list(gen.top_ids[:, 0]) == gen.token_ids, "greedy: each token is the argmax of its step"
        assert gen.text == base_session.decode(gen.token_ids)
    again = base_session.generate([base_generations[0].prompt_ids], max_new_tokens=32)[0]
    assert again.token_ids == base_generations[0].token_ids


def test_generated_tokens_score_as_the_argmax(base_session: Any, base_generations: list[Any]) -> None:
    gen = base_generations[0]
    scored = base_session.score(gen.prompt_ids + gen.token_ids, top_k=1)
    assert list(scored.top_ids[len(gen.prompt_ids) - 1 :, 0]) == gen.token_ids


def test_encode_adds_exactly_one_bos(base_session: Any) -> None:
    ids = base_session.encode("Return the value.")
    assert ids[0] == base_session.bos_token_id and base_session.bos_token_id not in ids[1:]
    assert base_session.encode("Return the value.", add_bos=False) == ids[1:]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_baselines_are_close_but_not_identical(
    dtype: str, base_session: Any, domain_ids: list[int]
) -> None:
    with open_session(build_stack({"path": "bundled:target", "dtype": dtype})) as half:
        assert next(half.model.parameters()).dtype == getattr(torch, dtype)
        diff = np.abs(half.score(domain_ids, top_k=1).logprobs - base_session.score(domain_ids, top_k=1).logprobs)
    assert 0 < diff.mean() < 0.05


def test_input_errors_are_config_errors(base_session: Any) -> None:
    with pytest.raises(ConfigError, match="at least two tokens"):
        base_session.score([1])
    with pytest.raises(ConfigError, match="context"):
        base_session.score([1] * 5000)
    with pytest.raises(ConfigError, match="block_size"):
        base_session.score([1, 2, 3], block_size=0)
    with pytest.raises(ConfigError, match="empty prompt"):
        base_session.generate([[]])
