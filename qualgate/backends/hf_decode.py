"""Greedy decoding for the in-process backend, with speculative verification and prefix reuse.

qualgate runs its own loop (rather than `model.generate`) so every layer is applied where an engine
applies it and can be inspected: which tokens a draft proposed, how many the target accepted, how
many prompt tokens came from the prefix cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qualgate.layers import Proposer, SpeculationLayer
from qualgate.layers.prefix_cache import PrefixStore
from qualgate.layers.speculation import SpeculationStats

Forward = Callable[[list[int], Any], Any]  # (token ids, cache) -> logprobs [len, vocab] float64 tensor


@dataclass
class DecodeResult:
    token_ids: list[int]
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    finish_reason: str
    stats: dict[str, float]  # this generation's own layer counters (additive across generations)


class GreedyDecoder:
    def __init__(
        self,
        forward: Forward,
        new_cache: Callable[[], Any],
        croppable: Callable[[Any], bool],
        snapshot: Callable[[Any], Any],
        speculation: SpeculationLayer[Any] | None = None,
        proposer: Proposer | None = None,
        prefix_store: PrefixStore | None = None,
    ) -> None:
        self.forward = forward
        self.new_cache = new_cache
        self.croppable = croppable
        self.snapshot = snapshot
        self.speculation = speculation
        self.proposer = proposer
        self.prefix_store = prefix_store
        self.spec_stats = SpeculationStats()

    def prefill(self, prompt: list[int]) -> tuple[Any, Any, int]:
        """Fill a cache with the prompt; return (cache, logprobs of the token after it, tokens reused)."""
        store = self.prefix_store
        if store is None:
            cache = self.new_cache()
            return cache, self.forward(prompt, cache)[-1], 0
        cache_probe = self.new_cache()
        reused, cache = store.lookup(prompt, self.croppable(cache_probe))
        hit = reused
        if cache is None:
            cache = cache_probe
        boundary = store.reusable_length(len(prompt))
        if boundary > reused:
            # Compute up to the last whole block separately, so it can be stored for later prompts.
            self.forward(prompt[reused:boundary], cache)
            store.store(prompt[:boundary], cache)
            reused = boundary
        return cache, self.forward(prompt[reused:], cache)[-1], hit

    def generate(self, prompt: list[int], max_new_tokens: int, top_k: int, eos: int | None) -> DecodeResult:
        import torch

        before = SpeculationStats(**vars(self.spec_stats))
        cache, logprobs, reused = self.prefill(prompt)
        context = list(prompt)
        out: list[int] = []
        rows: list[Any] = []  # the distribution each output token was chosen from
        finish = "length"
        while len(out) < max_new_tokens:
            token = int(logprobs.argmax())
            out.append(token)
            rows.append(logprobs)
            context.append(token)
            if token == eos:
                finish = "stop"
                break
            budget = max_new_tokens - len(out)
            if budget == 0:
                break
            draft: list[int] = []
            if self.proposer is not None and self.speculation is not None:
                k = min(self.speculation.num_speculative_tokens, budget)
                draft = self.proposer.propose(context, k)[:k]
            if not draft:
                logprobs = self.forward([token], cache)[-1]
                continue
            snapshot = None if self.croppable(cache) else self.snapshot(cache)
            verify = self.forward([token, *draft], cache)  # verify[i] follows token + draft[:i]
            assert self.speculation is not None
            accepted = self.speculation.accept(draft, verify[: len(draft)])
            self.spec_stats.verify_steps += 1
            self.spec_stats.proposed_tokens += len(draft)
            self.spec_stats.accepted_tokens += accepted
            for i in range(accepted):
                out.append(draft[i])
                rows.append(verify[i])
                context.append(draft[i])
                if draft[i] == eos:
                    finish = "stop"
                    break
            if finish == "stop":
                break
            rejected = len(draft) - accepted
            if rejected and snapshot is None:
                cache.crop(-rejected)
                logprobs = verify[accepted]
            elif rejected:
                # A quantized cache cannot drop tokens: rewind to before verification and re-feed.
                cache = snapshot
                logprobs = self.forward([token, *draft[:accepted]], cache)[-1]
            else:
                logprobs = verify[accepted]
        if rows:
            stacked = torch.stack(rows)
            k = min(top_k, stacked.shape[-1])
            top = stacked.topk(k, dim=-1)
            top_ids, top_lps = top.indices.cpu().numpy(), top.values.cpu().numpy()
        else:
            top_ids, top_lps = np.zeros((0, top_k), dtype=np.int64), np.zeros((0, top_k))
        stats: dict[str, float] = {}
        if self.proposer is not None:
            stats.update(self.spec_stats.minus(before).counters())
        if self.prefix_store is not None:
            stats.update(
                {
                    "prefix_queries": 1,
                    "prefix_hits": int(reused > 0),
                    "prefix_prompt_tokens": len(prompt),
                    "prefix_reused_tokens": reused,
                }
            )
        return DecodeResult(out, top_ids, top_lps, finish, stats)
