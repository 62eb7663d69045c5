"""How many sequences the in-process engine scores in one forward pass, and what happens when a batch
does not fit.

`batch_size: N` caps a batch at N sequences. `auto` sizes a batch from the tokens it holds: on a GPU
from the free memory and the bytes a scored token needs (its logits, their float32 copy and the
log-softmax: three full-vocabulary rows), on the CPU from a fixed token budget, since a few hundred
tokens already make the matrix products as large as the cores can use and more only adds memory
traffic (measured in docs/performance.md). Whatever the setting, an out-of-memory error halves the
batch and retries it, and later batches keep the smaller size, as lm-eval's auto batch size does; a
single sequence that does not fit is an infrastructure error naming the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

from qualgate.errors import InfrastructureError

if TYPE_CHECKING:
    import torch

BatchSetting = Literal["auto"] | int
T = TypeVar("T")
R = TypeVar("R")

# CPU: tokens per forward pass. Measured on the bundled target (2 cores): 64-token requests score
# 1.7x faster in batches of 16 than one by one, 512-token windows 1.07x faster in pairs, and every
# batch beyond ~1-2k tokens is slower again.
CPU_BATCH_TOKENS = 1024
# GPU: the share of free memory a batch's logits may take (activations, the allocator's slack and the
# model's own workspace take the rest), and the most sequences auto puts in one batch (lm-eval's cap).
GPU_MEMORY_SHARE = 0.5
MAX_AUTO_BATCH = 64
# CPU, sequences fed through the KV cache (hf_scoring.py): a step feeds one token per row, so rows, not
# tokens, amortize each call; the bound is the batch's logits (kept until the last block), at most this
# many bytes (the bundled target's 512-token chunks: 30 rows).
CPU_CACHED_LOGIT_BYTES = 512 << 20


def is_out_of_memory(exc: BaseException) -> bool:
    """Out of memory on any device: CUDA's own error type, MPS's and the CPU allocator's RuntimeErrors."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


class BatchSizer:
    """The batch size of one session: the setting, narrowed by every out-of-memory error seen."""

    def __init__(self, setting: BatchSetting, device: torch.device, vocab_size: int, where: str) -> None:
        self.setting = setting
        self.device = device
        self.vocab_size = vocab_size
        self.where = where  # names the model in the error when even one sequence does not fit
        self.cap: int | None = None  # the largest batch known to fit after an out-of-memory error
        self.backoffs = 0

    def _limit(self, width: int, cached: bool = False) -> int:
        """Sequences of `width` tokens one batch may hold before any out-of-memory error (`cached`: fed
        through the KV cache in blocks rather than in one forward pass)."""
        if self.setting != "auto":
            return int(self.setting)
        per_sequence = 3 * 4 * self.vocab_size * max(width, 1)
        if self.device.type == "cuda":
            import torch

            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, min(MAX_AUTO_BATCH, int(free * GPU_MEMORY_SHARE) // per_sequence))
        if cached:
            return max(1, min(MAX_AUTO_BATCH, CPU_CACHED_LOGIT_BYTES // per_sequence))
        return max(1, min(MAX_AUTO_BATCH, CPU_BATCH_TOKENS // max(width, 1)))

    def batches(self, lengths: Sequence[int], cached: bool = False) -> list[list[int]]:
        """Indices of `lengths` grouped into batches of similar length (shortest first): a batch grows
        while its padded size (count x its longest, the last) stays within the limit."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups: list[list[int]] = []
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and end - start + 1 <= self.group(lengths[order[end]], cached):
                end += 1
            groups.append(order[start:end])
            start = end
        return groups

    def group(self, width: int, cached: bool = False) -> int:
        """Sequences of `width` tokens in one batch now (after any out-of-memory backoff)."""
        limit = self._limit(width, cached)
        return min(limit, self.cap) if self.cap is not None else limit

    def run(self, items: Sequence[T], width: int, score: Callable[[Sequence[T]], list[R]]) -> list[R]:
        """`score` over `items` in one batch, halving it on out-of-memory until it fits."""
        results: list[R] = []
        pending = list(items)
        size = len(pending)
        while pending:
            part = pending[:size]
            try:
                results.extend(score(part))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self._release()
                if size == 1:
                    raise InfrastructureError(
                        f"{self.where}: one {width}-token sequence does not fit in {self.device} memory; "
                        "score shorter chunks (n_ctx), load a smaller dtype, or spread the model with device_map: auto"
                    ) from None
                size = max(1, size // 2)
                self.cap = size if self.cap is None else min(self.cap, size)
                self.backoffs += 1
                continue
            pending = pending[size:]
        return results

    def _release(self) -> None:
        """Give the failed batch's memory back before the retry."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()
