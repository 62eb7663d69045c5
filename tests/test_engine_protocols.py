"""The capability probe and the OpenAI session against endpoints shaped like the engines that cannot
run here (tests/engine_shapes.py): each protocol difference is either measured exactly or refused
with a message that names it. vLLM and llama.cpp themselves run in test_engine_runs.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from engine_shapes import ShapedEngine

from qualgate.backends.hf import HFSession
from qualgate.backends.http.backend import OpenAIBackend
from qualgate.backends.http.probe import ProbeFailed
from qualgate.backends.http.session import OpenAISession
from qualgate.instruments.equivalence import EquivalenceConfig, Prompt, run_equivalence
from qualgate.models import ModelSpec
from qualgate.stack import Stack

TARGET = ModelSpec(path="bundled:target", dtype="float32")
TEXT = "def read_table(path):\n    with open(path) as handle:\n        return [line.split(',') for line in handle]"


@pytest.fixture(scope="module")
def hf() -> HFSession:
    return HFSession(Stack(model=TARGET))


@pytest.fixture
def engine(request: pytest.FixtureRequest, hf: HFSession) -> Iterator[ShapedEngine]:
    with ShapedEngine(request.param, hf) as shaped:
        yield shaped


def open_session(engine: ShapedEngine, **options: Any) -> OpenAISession:
    backend = OpenAIBackend(base_url=engine.url, model="m", retries=0, **options)
    return backend.open(Stack(model=TARGET, name=f"{engine.shape}-stack"))


@pytest.mark.parametrize("engine", ["sglang"], indirect=True)
def test_sglang_echo_with_a_scored_bos_is_measured_exactly(engine: ShapedEngine, hf: HFSession) -> None:
    """SGLang ignores prompt_logprobs and echoes BOS with a None logprob: echo mode, every text token
    scored, the numbers those of the model."""
    session = open_session(engine)
    report = session.probe
    assert report is not None and report.stack == "sglang-stack"
    assert (report.mode, report.token_id_prompts, report.top_k) == ("echo", True, 64)
    assert "prompt_logprobs ignored" in report.notes
    assert report.canary_mean_abs_diff is not None and report.canary_mean_abs_diff < 1e-5
    ids = hf.encode(TEXT)
    served, expected = session.score(ids, top_k=5), hf.score(ids, top_k=5)
    assert engine.requests[-1]["echo"] is True and isinstance(engine.requests[-1]["prompt"], str)
    assert np.allclose(served.logprobs, expected.logprobs, atol=1e-5)
    assert (served.top_ids == expected.top_ids).all()
    assert np.allclose(served.tail_mass, expected.tail_mass, atol=1e-4)
    generated = session.generate([ids], max_new_tokens=8, top_k=4)[0]
    assert generated.token_ids == hf.generate([ids], max_new_tokens=8, top_k=4)[0].token_ids
    assert isinstance(engine.requests[-1]["prompt"], list), "token-id prompts where the server takes them"


@pytest.mark.parametrize("engine", ["tgi"], indirect=True)
def test_tgi_completions_without_logprobs_are_refused_for_scoring(engine: ShapedEngine) -> None:
    with pytest.raises(ProbeFailed, match="no logprobs in the response: the server ignores `logprobs`") as caught:
        open_session(engine)
    assert engine.url in str(caught.value) and caught.value.exit_code == 3


@pytest.mark.parametrize("engine", ["tgi"], indirect=True)
def test_generation_only_endpoint_still_checks_token_identity(engine: ShapedEngine, hf: HFSession) -> None:
    """require_scoring: false lets equivalence use an endpoint without logprobs: exact identity is
    checked, the shared-prefix drift is reported as not measured rather than as 0."""
    session = open_session(engine, require_scoring=False)
    report = session.probe
    assert report is not None and report.stack == "tgi-stack"
    assert not report.token_id_prompts and report.notes and report.canary_mean_abs_diff is None
    prompts = [Prompt("a", "The function returns"), Prompt("b", TEXT)]
    result = run_equivalence(session, hf, prompts, EquivalenceConfig(max_new_tokens=6))
    assert result.exact_matches == 2 and result.passed
    assert result.max_prefix_logprob_diff is None and result.summary()["max_prefix_logprob_diff"] is None


@pytest.mark.parametrize("engine", ["ollama"], indirect=True)
def test_ollama_echo_ignored_is_caught_not_scored(engine: ShapedEngine) -> None:
    with pytest.raises(ProbeFailed, match="logprobs cover only the 1 generated tokens"):
        open_session(engine)
    assert any(r.get("echo") for r in engine.requests), "the probe asked for echo before refusing"


@pytest.mark.parametrize("engine", ["boolean"], indirect=True)
def test_server_wanting_boolean_logprobs_is_refused_with_the_reason(engine: ShapedEngine) -> None:
    with pytest.raises(ProbeFailed, match="neither prompt_logprobs nor echo with logprobs is accepted") as caught:
        open_session(engine)
    assert "valid boolean" in str(caught.value), "the server's own words reach the user"


def test_endpoint_serving_another_model_fails_the_canary() -> None:
    """Same tokenizer, other weights (the bundled draft served as if it were the target): every protocol
    check passes, the canary against the in-process target does not."""
    draft = HFSession(Stack(model=ModelSpec(path="bundled:draft", dtype="float32")))
    with ShapedEngine("sglang", draft) as shaped, pytest.raises(ProbeFailed) as caught:
        open_session(shaped)
    message = str(caught.value)
    assert "the canary's logprobs differ from the in-process baseline" in message and "> 0.02" in message
    assert "bundled:target" in message and caught.value.exit_code == 3
