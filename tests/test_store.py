"""The run store: identity keys, atomic records, and chunk checkpoints that survive a crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qualgate.instruments.fidelity import FidelityConfig, chunk_text, score_text
from qualgate.store import RunStore, identity_key

CONFIG = FidelityConfig(max_chunks=6)


def test_identity_keys_change_with_any_part_of_the_identity() -> None:
    base = {"stack": {"model": {"files": {"model.safetensors": "a"}}, "layers": []}, "config": {"n_ctx": 512}}
    other_model = {**base, "stack": {"model": {"files": {"model.safetensors": "b"}}, "layers": []}}
    other_config = {**base, "config": {"n_ctx": 256}}
    keys = {identity_key(base), identity_key(other_model), identity_key(other_config)}
    assert len(keys) == 3 and identity_key(base) == identity_key(dict(base))


def test_records_round_trip_and_torn_records_are_redone(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.put("k", {"x": 1})
    assert store.get("k") == {"x": 1} and store.get("missing") is None
    (store.records / "torn.json").write_text('{"x": ')
    assert store.get("torn") is None


class _Crash(Exception):
    pass


def test_an_interrupted_scoring_resumes_without_redoing_chunks(
    base_session: Any, domain_text: str, tmp_path: Path
) -> None:
    chunks = chunk_text(base_session, domain_text, CONFIG)
    clean = score_text(base_session, chunks, CONFIG)
    checkpoint = RunStore(tmp_path).chunks("unit")

    def crash_after_three(done: int, total: int) -> None:
        if done == 3:
            raise _Crash

    with pytest.raises(_Crash):
        score_text(base_session, chunks, CONFIG, on_chunk=crash_after_three, checkpoint=checkpoint)
    calls: list[int] = []
    real_score = base_session.score

    def counting_score(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_score(*args, **kwargs)

    base_session.score = counting_score
    try:
        resumed = score_text(base_session, chunks, CONFIG, checkpoint=checkpoint)
    finally:
        del base_session.score
    assert len(calls) == len(chunks) - 3, "finished chunks are not scored again"
    for field in ("chunk", "target", "logprob", "top_ids", "top_logprobs", "tail_mass"):
        np.testing.assert_array_equal(getattr(resumed, field), getattr(clean, field))


def test_an_interrupted_equivalence_resumes_per_prompt(tmp_path: Path) -> None:
    from qualgate import build_stack, open_session
    from qualgate.instruments.equivalence import EquivalenceConfig, load_prompts, reference_stack, run_equivalence

    prompts = load_prompts(Path(__file__).resolve().parent.parent / "evals" / "prompts" / "general.jsonl")[:6]
    config = EquivalenceConfig(max_new_tokens=12)
    stack = build_stack({"path": "bundled:target"}, [{"kind": "speculation", "method": "draft_model"}])
    with open_session(stack) as candidate, open_session(reference_stack(stack)) as reference:
        clean = run_equivalence(candidate, reference, prompts, config).summary()
        assert clean["layer_stats"]["speculation"] == candidate.layer_stats()["speculation"], (
            "per-generation counters add up to the session's"
        )
    checkpoint = RunStore(tmp_path).generations("unit")
    with open_session(stack) as candidate, open_session(reference_stack(stack)) as reference:
        real_generate = candidate.generate
        calls: list[int] = []

        def crash_after_two(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 3:
                raise _Crash
            return real_generate(*args, **kwargs)

        candidate.generate = crash_after_two
        with pytest.raises(_Crash):
            run_equivalence(candidate, reference, prompts, config, checkpoint=checkpoint)
        calls.clear()
        candidate.generate = lambda *a, **k: (calls.append(1), real_generate(*a, **k))[1]
        resumed = run_equivalence(candidate, reference, prompts, config, checkpoint=checkpoint).summary()
    assert len(calls) == len(prompts) - 2, "finished prompts are not generated again"
    assert resumed == clean
