"""Prefix caching: the KV cache of a prompt's prefix is kept and a copy reused by later prompts.

Like an engine's automatic prefix caching, reuse happens in whole blocks of `block_size` tokens, and
at least the prompt's last token is always recomputed (its logits start the generation).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from qualgate.layers.base import PrefixCacheLayer, PrefixCacheParams, register_layer


@register_layer
class BlockPrefixCache(PrefixCacheLayer[PrefixCacheParams]):
    method: ClassVar[str] = "block"
    Params = PrefixCacheParams

    def name_stem(self) -> str:
        return "prefix-cache"


@dataclass
class PrefixCacheStats:
    queries: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "queries": self.queries,
            "hits": self.hits,
            "hit_rate": self.hit_rate,
            "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
        }


class PrefixStore:
    """Snapshots of KV caches keyed by the token ids they hold.

    With a croppable cache any stored prefix serves every prompt that shares whole blocks with it;
    a cache that cannot be cropped (transformers' quantized caches) only serves prompts that extend
    the whole stored prefix.
    """

    def __init__(self, block_size: int, max_entries: int, snapshot: Callable[[Any], Any]) -> None:
        self.block_size = block_size
        self.snapshot = snapshot
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self.stats = PrefixCacheStats()

    def reusable_length(self, prompt_len: int) -> int:
        """Tokens of a prompt that may come from the cache: whole blocks, never the last token."""
        return (prompt_len - 1) // self.block_size * self.block_size

    def lookup(self, prompt: list[int], croppable: bool) -> tuple[int, Any]:
        """Return (reused length, a private copy of the cache holding that many tokens) or (0, None)."""
        self.stats.queries += 1
        self.stats.prompt_tokens += len(prompt)
        limit = self.reusable_length(len(prompt))
        best_len, best_key = 0, None
        for key in self.entries:
            shared = self.match(key, prompt, limit, croppable)
            if shared > best_len:
                best_len, best_key = shared, key
        if best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        cache = self.snapshot(self.entries[best_key])
        if best_len < len(best_key):
            cache.crop(best_len - len(best_key))
        self.stats.hits += 1
        self.stats.reused_tokens += best_len
        return best_len, cache

    def match(self, key: tuple[int, ...], prompt: list[int], limit: int, croppable: bool) -> int:
        """How many leading tokens of `prompt` the entry stored under `key` may serve: whole blocks that
        equal the prompt's, token for token (a cache key over a whole block's tokens and all before it)."""
        if croppable:
            return _common_prefix(key, prompt, limit) // self.block_size * self.block_size
        return len(key) if len(key) <= limit and tuple(prompt[: len(key)]) == key else 0

    def store(self, tokens: list[int], cache: Any) -> None:
        key = tuple(tokens)
        if not key or key in self.entries:
            return
        self.entries[key] = self.snapshot(cache)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
