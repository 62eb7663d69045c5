"""Protocol differences of OpenAI-compatible engines, on responses: one recorded from a real server
here (llama-cpp-python 0.3.36, tests/recorded/) and the others built to the shapes those engines document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qualgate.backends.http.parsers import PromptLogprobs, from_echo, from_vllm_prompt_logprobs, problems

RECORDED = Path(__file__).parent / "recorded"
PROMPT = ["The", " built", "-", "in", " function", " le", "n", "()", " returns"]


def test_llama_cpp_python_server_drops_the_first_prompt_logprob() -> None:
    """Recorded: echo=True, logprobs=2, max_tokens=1 on the bundled model (started with --logits_all)."""
    response: dict[str, Any] = json.loads((RECORDED / "llama_cpp_python_0.3.36_echo.json").read_text())
    parsed = from_echo(response)
    assert parsed.tokens[: len(PROMPT)] == PROMPT and len(parsed.tokens) == len(PROMPT) + 1
    found = problems(parsed, PROMPT, generated=1)
    assert found == [
        "the first prompt token has no logprob (the BOS-conditioned position is missing): "
        "score from the second token or send an explicit BOS"
    ]


def test_echo_that_returns_only_generated_tokens_is_refused() -> None:
    """llama.cpp's native server: logprobs for generated tokens only (loglikelihood tasks at chance)."""
    response = {"choices": [{"logprobs": {"tokens": [" the"], "token_logprobs": [-0.87]}}]}
    assert problems(from_echo(response), PROMPT, generated=1) == [
        "logprobs cover only the 1 generated tokens, not the 9-token prompt (echo ignored)"
    ]


def test_tokenizer_mismatch_is_named() -> None:
    other = PromptLogprobs(["The", " built", "-in", " function"], [None, -1.0, -2.0, -3.0])
    found = problems(other, ["The", " built", "-", "in"])
    assert any("tokenizer mismatch at position 2: server '-in', model '-'" in p for p in found)


def test_vllm_prompt_logprobs_shape() -> None:
    response = {
        "prompt_token_ids": [10, 11, 12],
        "choices": [
            {
                "prompt_logprobs": [
                    None,
                    {"11": {"logprob": -1.5, "rank": 2, "decoded_token": " b"}, "7": {"logprob": -0.2, "rank": 1}},
                    {"12": {"logprob": -0.1, "rank": 1, "decoded_token": " c"}},
                ]
            }
        ],
    }
    parsed = from_vllm_prompt_logprobs(response)
    assert parsed.logprobs == [None, -1.5, -0.1] and parsed.tokens[1:] == [" b", " c"]
    # vLLM's None first is the same missing position; a prompt that starts with BOS loses nothing.
    assert problems(parsed, ["10", " b", " c"])[0].startswith("the first prompt token has no logprob")
    assert problems(PromptLogprobs(["<s>", "x"], [0.0, -1.0]), ["<s>", "x"]) == []
