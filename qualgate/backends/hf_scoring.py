"""The in-process engine's batched scoring: right-padded sequences in one forward pass each, or fed
through one batched KV cache (fidelity's serving schedule: a prefill, then one token per step;
benchmark requests fed in blocks).

Fed one by one, each step is a forward pass of one token, and on a small model the framework's
per-call overhead is most of its cost (measured on the bundled target: 6 ms per step, 0.8 of it in
the matrix products). Sequences fed the same way share one batched cache instead: every row takes
the same steps it would alone, so a quantized cache still sees single-token writes where serving
writes single tokens. Rows are right-padded: attention is causal, so no real position ever reads a
pad, and the positions of a row's tokens are those it would have alone.

Only for caches whose round trip is batch-invariant (`KVQuantLayer.batch_invariant`: a row's codes
read nothing of the other rows), or no quantized cache at all; others are fed one by one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from qualgate.backends.base import ScoreRequest, ScoreResult, block_spans
from qualgate.backends.rows import with_tail_sample

if TYPE_CHECKING:
    from qualgate.backends.hf import HFSession


def score_result(
    ids: list[int], logprobs: Any, top_k: int, block_size: int | None, gather: np.ndarray | None = None
) -> ScoreResult:
    """A ScoreResult from the [n-1, vocab] float32 logprobs after each of ids[:-1]; the kept values are
    widened to float64 (a full-vocabulary float64 copy would cost more than the forward pass)."""
    import torch

    # Selected on the logprobs' device; only the kept values come back to the host.
    targets = torch.tensor(ids[1:], device=logprobs.device).unsqueeze(1)
    top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    top_logprobs = top.values.double()
    gathered = None
    if gather is not None:
        index = torch.as_tensor(gather, dtype=torch.long, device=logprobs.device)
        gathered = logprobs.gather(1, index).double().cpu().numpy()
    return ScoreResult(
        token_ids=np.asarray(ids, dtype=np.int64),
        logprobs=logprobs.gather(1, targets).squeeze(1).double().cpu().numpy(),
        top_ids=top.indices.cpu().numpy(),
        top_logprobs=top_logprobs.cpu().numpy(),
        tail_mass=(1.0 - top_logprobs.exp().sum(dim=-1)).clamp(min=0.0).cpu().numpy(),
        block_size=block_size,
        gathered=gathered,
    )


def feeds(request: ScoreRequest) -> tuple[int | None, tuple[int, ...] | None]:
    """How a request is fed: in one forward pass (None, None), or through the cache in blocks or by a
    schedule. Rows fed alike may share a batch."""
    return request.block_size, request.schedule


def score_grouped(session: HFSession, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
    """Every request scored in batches of others fed alike (similar lengths together), in request
    order: whole in one forward pass, or through one batched cache."""
    for r in requests:  # a schedule that does not cover its sequence is refused before any batch runs
        block_spans(len(r.token_ids) - 1, r.block_size, r.schedule)
    results: list[ScoreResult | None] = [None] * len(requests)
    alike: dict[tuple[int | None, tuple[int, ...] | None], list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        alike[feeds(r)].append(i)
    for feed, indices in alike.items():
        cached = feed != (None, None)
        score = _score_cached if cached else _score_whole
        lengths = [len(requests[i].token_ids) - 1 for i in indices]
        for group in session.batches.batches(lengths, cached=cached):
            members = [indices[g] for g in group]
            width = max(lengths[g] for g in group)
            scored = session.batches.run([requests[i] for i in members], width, partial(score, session))
            for i, result in zip(members, scored, strict=True):
                results[i] = result
    return [r for r in results if r is not None]


def _padded(requests: Sequence[ScoreRequest]) -> tuple[list[list[int]], Any, Any, bool]:
    """The rows' token ids, and their inputs right-padded to the longest with the mask of real
    positions, filled on the host (one copy each to the model's device, not one per row); whether any
    row is padded."""
    import torch

    batch = [[int(t) for t in r.token_ids] for r in requests]
    width = max(len(ids) for ids in batch) - 1
    inputs = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        mask[row, : len(ids) - 1] = 1
    return batch, inputs, mask, any(len(ids) - 1 < width for ids in batch)


def _results(batch: list[list[int]], requests: Sequence[ScoreRequest], logits: Any) -> list[ScoreResult]:
    """Each row's ScoreResult from the batch's logits, row by row: one sequence's full-vocabulary
    log-softmax at a time, not the batch's."""
    import torch

    results = []
    for row, (ids, r) in enumerate(zip(batch, requests, strict=True)):
        logprobs = torch.log_softmax(logits[row, : len(ids) - 1].float(), dim=-1)
        result = score_result(ids, logprobs, r.top_k, r.block_size, r.gather)
        if r.tail_samples:
            result = with_tail_sample(result, logprobs.cpu().numpy(), r.tail_samples)
        results.append(replace(result, schedule=r.schedule) if r.schedule is not None else result)
    return results


def _score_cached(session: HFSession, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
    """One batch: right-padded rows fed block by block (the blocks of the longest row) through one cache."""
    import torch

    batch, inputs, mask, ragged = _padded(requests)
    spans = block_spans(inputs.shape[1], requests[0].block_size, requests[0].schedule)
    assert spans is not None, "_score_cached takes requests fed through the cache"
    cache = session.new_cache()
    parts: list[Any] = []
    with torch.no_grad():
        for start, end in spans:
            out = session.model(
                input_ids=inputs[:, start:end].to(session.device),
                # The mask covers the cached positions and the new ones: pads are never attended.
                attention_mask=mask[:, :end].to(session.device) if ragged else None,
                past_key_values=cache,
                use_cache=True,
            )
            parts.append(out.logits)
    return _results(batch, requests, torch.cat(parts, dim=1))


def _score_whole(session: HFSession, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
    """One batch: right-padded rows in one forward pass."""
    import torch

    batch, inputs, mask, ragged = _padded(requests)
    with torch.no_grad():
        # Without pads no mask is needed, and attention takes its causal fast path.
        logits = session.model(
            input_ids=inputs.to(session.device),
            attention_mask=mask.to(session.device) if ragged else None,
            use_cache=False,
        ).logits
    return _results(batch, requests, logits)


__all__ = ["feeds", "score_grouped", "score_result"]
