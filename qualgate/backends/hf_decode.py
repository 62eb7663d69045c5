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

Forward = Callable[[list[int], Any], Any]  # (token ids, cache) -> logprobs [len, vocab] float64 tensor


@dataclass
class SpeculationStats:
    verify_steps: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0

    def as_dict(self) -> dict[str, float]:
        rate = self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0
        per_step = self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0
        return {
            "verify_steps": self.verify_steps,
            "proposed_tokens": self.proposed_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": rate,
            "mean_accepted_tokens": per_step,
            # vLLM's "mean acceptance length" counts the bonus token every verification yields.
            "mean_acceptance_length": 1.0 + per_step if self.verify_steps else 0.0,
        }


@dataclass
class DecodeResult:
    token_ids: list[int]
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    finish_reason: str


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

    def prefill(self, prompt: list[int]) -> tuple[Any, Any]:
        """Fill a cache with the prompt; return (cache, logprobs of the token after it)."""
        store = self.prefix_store
        if store is None:
            cache = self.new_cache()
            return cache, self.forward(prompt, cache)[-1]
        cache_probe = self.new_cache()
        reused, cache = store.lookup(prompt, self.croppable(cache_probe))
        if cache is None:
            cache = cache_probe
        boundary = store.reusable_length(len(prompt))
        if boundary > reused:
            # Compute up to the last whole block separately, so it can be stored for later prompts.
            self.forward(prompt[reused:boundary], cache)
            store.store(prompt[:boundary], cache)
            reused = boundary
        return cache, self.forward(prompt[reused:], cache)[-1]

    def generate(self, prompt: list[int], max_new_tokens: int, top_k: int, eos: int | None) -> DecodeResult:
        import torch

        cache, logprobs = self.prefill(prompt)
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
            top_ids, top_lps = top.indices.numpy(), top.values.numpy()
        else:
            top_ids, top_lps = np.zeros((0, top_k), dtype=np.int64), np.zeros((0, top_k))
        return DecodeResult(out, top_ids, top_lps, finish)
