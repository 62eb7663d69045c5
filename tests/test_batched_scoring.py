"""Batched one-pass scoring: the same numbers as one sequence at a time, and out-of-memory backs off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import pipeline_file

from qualgate import build_stack
from qualgate.backends import ScoreRequest
from qualgate.backends.hf import HFSession
from qualgate.backends.hf_batch import BatchSizer, is_out_of_memory
from qualgate.cli import main
from qualgate.errors import InfrastructureError
from qualgate.instruments.fidelity import FidelityConfig, chunk_text, score_text

# Rolling windows of 96 tokens: the last window is shorter, so a batch holding it is padded.
CONFIG = FidelityConfig(mode="rolling", n_ctx=96, top_k=16, tail_samples=4, max_chunks=7)


@pytest.fixture(scope="module")
def sessions() -> dict[Any, HFSession]:
    stack = build_stack({"path": "bundled:target"})
    return {size: HFSession(stack, size) for size in (1, 3, "auto")}


def test_every_batch_size_scores_what_one_at_a_time_does(sessions: dict[Any, HFSession], domain_text: str) -> None:
    one = sessions[1]
    chunks = chunk_text(one, domain_text[:3000], CONFIG)
    chunks = [*chunks[:-1], type(chunks[-1])(chunks[-1].token_ids[:40], chunks[-1].first_scored)]
    assert len({len(c.token_ids) for c in chunks}) == 2, "one window must be shorter (padding)"
    reference = score_text(one, chunks, CONFIG)
    candidate = score_text(one, chunks, CONFIG, reference=reference)
    for size in (3, "auto"):
        ref = score_text(sessions[size], chunks, CONFIG)
        np.testing.assert_allclose(ref.logprob, reference.logprob, rtol=0, atol=1e-5)
        np.testing.assert_allclose(ref.top_logprobs, reference.top_logprobs, rtol=0, atol=1e-5)
        assert (ref.top_ids[:, 0] == reference.top_ids[:, 0]).mean() > 0.99
        assert ref.tail_ids is not None and ref.tail_ids.shape == (reference.n, 4)
        cand = score_text(sessions[size], chunks, CONFIG, reference=reference)
        assert cand.gathered is not None and candidate.gathered is not None
        np.testing.assert_allclose(cand.gathered, candidate.gathered, rtol=0, atol=1e-5)
    # score_many (benchmark requests) batches the same way, against score() one by one
    requests = [c.token_ids[: 10 + 7 * i] for i, c in enumerate(chunks)]
    batched = sessions["auto"].score_many(requests)
    for ids, result in zip(requests, batched, strict=True):
        single = one.score(ids, top_k=1)
        np.testing.assert_allclose(result.logprobs, single.logprobs, rtol=0, atol=1e-5)


def test_auto_sizes_batches_by_tokens_on_the_cpu() -> None:
    sizer = BatchSizer("auto", torch.device("cpu"), 4096, "model 'x'")
    groups = sizer.batches([512] * 5 + [64] * 40)
    assert sorted(len(g) for g in groups) == [1, 2, 2, 8, 16, 16]
    assert sorted(i for g in groups for i in g) == list(range(45))
    fixed = BatchSizer(3, torch.device("cpu"), 4096, "model 'x'")
    assert [len(g) for g in fixed.batches([512] * 7)] == [3, 3, 1]


class _OOMModel(torch.nn.Module):
    """The model, except that any batch of more than `fits` sequences runs out of memory."""

    def __init__(self, model: Any, fits: int) -> None:
        super().__init__()
        self.inner, self.fits = model, fits
        self.calls: list[int] = []

    def forward(self, input_ids: Any, **kwargs: Any) -> Any:
        self.calls.append(int(input_ids.shape[0]))
        if input_ids.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(input_ids=input_ids, **kwargs)


def test_out_of_memory_halves_the_batch_and_keeps_the_numbers(domain_text: str) -> None:
    session = HFSession(build_stack({"path": "bundled:target"}), 8)
    chunks = chunk_text(session, domain_text[:3000], CONFIG)
    expected = score_text(session, chunks, CONFIG)
    inner = session.model
    session.model = _OOMModel(inner, fits=3)
    scores = score_text(session, chunks, CONFIG)
    np.testing.assert_allclose(scores.logprob, expected.logprob, rtol=0, atol=1e-5)
    assert session.batches.cap == 3 and session.batches.backoffs == 1
    calls = session.model.calls
    assert calls == [7, 3, 3, 1]  # halved once, then batches of the size that fitted
    session.model = _OOMModel(inner, fits=0)
    with pytest.raises(InfrastructureError, match=r"model 'bundled:target': one 96-token sequence does not fit"):
        session.score_batch([ScoreRequest(chunks[0].token_ids)])
    assert InfrastructureError.exit_code == 3


def test_what_counts_as_out_of_memory() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize("value", [0, -2, "big"])
def test_a_batch_size_that_is_no_size_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: object
) -> None:
    path = pipeline_file(tmp_path, {"w8": {"kind": "weight_quant", "method": "rtn", "bits": 8}})
    data = yaml.safe_load(path.read_text())
    data["backend"] = {"name": "hf", "options": {"batch_size": value}}
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "batch_size" in err, err


def _fed(session: HFSession, chunks: list[Any], serve: bool) -> list[Any]:
    from qualgate.instruments.fidelity.scores import serving_schedule

    return [
        ScoreRequest(c.token_ids, 8, None, 0, block_size=None if serve else 32,
                     schedule=tuple(serving_schedule(c)) if serve else None)
        for c in chunks
    ]  # fmt: skip


@pytest.mark.parametrize("serve", [True, False], ids=["serving-schedule", "blocks-of-32"])
@pytest.mark.parametrize("kv", [None, "fp8"])
def test_sequences_fed_through_one_batched_cache_score_what_each_does_alone(
    domain_text: str, serve: bool, kv: str | None
) -> None:
    """Sequences fed through the cache in the same blocks share one batched cache: every row takes its
    own steps (a shorter row padded at the end), so each scores as it does alone: within float noise
    without a quantized cache. An FP8 cache turns that noise into a rare larger step: a K/V element the
    noise moves across an FP8 rounding boundary (1/16 relative) moves a logprob by up to ~0.01, as a
    CPU with other kernels would; the means and the top-1 tokens do not move."""
    layers = [{"kind": "kv_quant", "method": kv}] if kv else []
    batched = HFSession(build_stack({"path": "bundled:target"}, layers))
    assert batched.scoring_group(96, cached=True) > 1
    chunks = chunk_text(batched, domain_text[:3000], CONFIG)
    chunks = [*chunks[:4], type(chunks[4])(chunks[4].token_ids[:50], 20)]  # a shorter one: a padded row
    results = batched.score_batch(_fed(batched, chunks, serve))
    diffs = []
    for chunk, result, request in zip(chunks, results, _fed(batched, chunks, serve), strict=True):
        alone = batched.score(chunk.token_ids, 8, request.block_size, None, request.schedule)
        diffs += [np.abs(result.logprobs - alone.logprobs), np.abs(result.top_logprobs - alone.top_logprobs).ravel()]
        assert (result.top_ids[:, 0] == alone.top_ids[:, 0]).mean() > 0.98
        assert result.schedule == request.schedule and result.block_size == request.block_size
    diff = np.concatenate(diffs)
    if kv is None:
        assert diff.max() < 1e-5
    else:
        assert diff.max() < 0.05 and diff.mean() < 2e-4, (diff.max(), diff.mean())


def test_a_cache_that_is_not_batch_invariant_is_fed_one_sequence_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from qualgate.layers.kv_quant import Fp8KV

    monkeypatch.setattr(Fp8KV, "batch_invariant", False)
    session = HFSession(build_stack({"path": "bundled:target"}, [{"kind": "kv_quant", "method": "fp8"}]))
    assert session.scoring_group(96, cached=True) == 1
    calls: list[int] = []
    real = session.score
    monkeypatch.setattr(session, "score", lambda ids, *a, **k: calls.append(len(ids)) or real(ids, *a, **k))
    session.score_many([[0, 5, 6, 7], [0, 8, 9]], block_size=2)
    assert calls == [4, 3], "one score() per sequence"


def test_single_token_writes_stay_single_in_a_batched_serving_schedule(domain_text: str) -> None:
    """The planted FP8 cache broken only on single-token writes (tests/plugin_layers.py) is still seen
    when its decode steps are batched: each row still writes one token per step."""
    import plugin_layers  # noqa: F401  (registers the planted layers)

    layer = {"kind": "kv_quant", "method": "plugin_layers:DecodeSaturatingFp8"}
    broken = HFSession(build_stack({"path": "bundled:target"}, [layer]))
    correct = HFSession(build_stack({"path": "bundled:target"}, [{"kind": "kv_quant", "method": "fp8"}]))
    chunks = chunk_text(correct, domain_text[:3000], CONFIG)[:4]
    seen, right = broken.score_batch(_fed(broken, chunks, True)), correct.score_batch(_fed(correct, chunks, True))
    drift = [np.abs(b.logprobs - c.logprobs).max() for b, c in zip(seen, right, strict=True)]
    assert min(drift) > 0.01, drift
