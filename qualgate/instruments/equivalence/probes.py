"""Prompts built from domain text that reach the bugs lossless layers actually have.

Prefix caching: a cache reuses whole blocks of a stored prompt. Prompts that differ only in their last,
partial block (most hand-written prompt sets) never look a differing token up, so a cache whose key
covers only part of a block (the classic hash bug), or that reuses a block one token too long, passes
them. These prompt pairs put the difference inside blocks that would be reused: a one-token
substitution at the first, a middle and the last position of a block; shared prefixes of exactly k
blocks and k blocks +-1 token; long distinct suffixes spanning several blocks. The cold/warm protocol
of the check runs on top. `prefix_coverage` counts the lookups that crossed such a difference.

Speculation: acceptance decides how often verification runs and where its blocks fall. Three groups
with high (a short phrase of the text repeated), ordinary (domain passages) and low (shuffled tokens)
acceptance are reported apart; the check also reports the measured top and bottom thirds of samples
by acceptance, since how well a given draft model copies cannot be known in advance.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from qualgate.errors import ConfigError

PROBE_SEED = 20261129


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    group: str = ""  # the prompt file's stem, or the probe family
    token_ids: tuple[int, ...] | None = None  # a probe is given as tokens (its boundaries are exact)

    @property
    def source(self) -> str | list[int]:
        return list(self.token_ids) if self.token_ids is not None else self.text


def _passages(tokens: Sequence[int], length: int, count: int, stride_from: int = 0) -> list[list[int]]:
    """`count` disjoint windows of `length` tokens spread over the text."""
    if len(tokens) < length * count:
        raise ConfigError(
            f"the probe text has {len(tokens)} tokens; prefix and speculation probes need at least "
            f"{length * count}: name a longer text (equivalence.probe_text)"
        )
    stride = (len(tokens) - length) // max(count, 1)
    return [list(tokens[stride_from + i * stride : stride_from + i * stride + length]) for i in range(count)]


def _substitute(tokens: list[int], position: int, replacement_pool: Sequence[int]) -> list[int]:
    out = list(tokens)
    for candidate in replacement_pool:
        if candidate != out[position]:
            out[position] = candidate
            return out
    raise ConfigError("the probe text is too uniform to substitute a token (every token is the same)")


def prefix_probes(text_ids: Sequence[int], bos: int | None, block_size: int, bases: int = 2) -> list[Prompt]:
    """Pairs of prompts whose differences fall inside reusable blocks (see the module docstring).

    Each base prompt runs first and fills the cache; its variants follow it. Lengths avoid block
    multiples, so the last partial block is present too."""
    b = block_size
    head = [bos] if bos is not None else []
    length = 5 * b + b // 2 + 1 - len(head)  # five whole blocks and a partial one
    windows = _passages(text_ids, length + 4 * b, bases + 1)
    pool = windows[-1]  # tokens used for substitutions and foreign suffixes
    prompts: list[Prompt] = []
    for n, window in enumerate(windows[:bases]):
        base = head + window[:length]
        name = f"prefix-{n}"
        prompts.append(Prompt(f"{name}-base", "", "prefix:base", tuple(base)))
        # One-token substitutions inside block 1 (block 0 starts with BOS) and the last whole block.
        for block in (1, (len(base) - 1) // b - 1):
            for where, offset in (("first", 0), ("middle", b // 2), ("last", b - 1)):
                position = block * b + offset
                variant = _substitute(base, position, pool[position % len(pool) :])
                prompts.append(Prompt(f"{name}-sub-b{block}-{where}", "", "prefix:substitution", tuple(variant)))
        # Shared prefixes of exactly k blocks and k blocks +- 1 token, then a foreign suffix.
        k = 2
        for delta in (-1, 0, 1):
            shared = k * b + delta
            suffix = pool[n * b : n * b + len(base) - shared]
            prompts.append(Prompt(f"{name}-share-{k}b{delta:+d}", "", "prefix:boundary", tuple(base[:shared] + suffix)))
        # A long distinct suffix spanning several blocks after one shared block.
        long_suffix = window[length : length + 4 * b]
        prompts.append(Prompt(f"{name}-long-suffix", "", "prefix:long-suffix", tuple(base[:b] + long_suffix)))
    return prompts


def speculation_probes(text_ids: Sequence[int], bos: int | None, per_group: int = 3, length: int = 48) -> list[Prompt]:
    """High, ordinary and low draft acceptance (see the module docstring)."""
    head = [bos] if bos is not None else []
    windows = _passages(text_ids, length, per_group, stride_from=length // 3)
    rng = random.Random(PROBE_SEED)
    prompts: list[Prompt] = []
    for n, window in enumerate(windows):
        # A short phrase repeated: models continue the loop, and n-gram lookup finds it (the bundled
        # draft model barely copies, so a draft's high-acceptance prompts are also reported measured).
        phrase = window[: length // 3]
        repeat = head + phrase * 4 + phrase[: len(phrase) // 2]
        prompts.append(Prompt(f"spec-repeat-{n}", "", "speculation:high", tuple(repeat)))
        prompts.append(Prompt(f"spec-plain-{n}", "", "speculation:ordinary", tuple(head + window)))
        shuffled = list(window)
        rng.shuffle(shuffled)
        prompts.append(Prompt(f"spec-shuffled-{n}", "", "speculation:low", tuple(head + shuffled)))
    return prompts


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_coverage(run_order: Sequence[Sequence[int]], block_size: int) -> int:
    """Lookups that crossed a differing token inside a reusable block.

    Prompt X (in the order the candidate ran them) crossed one when an earlier prompt Y shares its
    first d tokens and differs at d, where the block holding d is whole in Y and inside X's reusable
    part (whole blocks, never the last token): a cache with a correct key reuses at most the blocks
    before d; one keyed on part of the block, or on a token too few, reuses the block with d."""
    b = block_size
    crossed = 0
    for i, prompt in enumerate(run_order):
        reusable = (len(prompt) - 1) // b * b
        for earlier in run_order[:i]:
            d = _common_prefix(prompt, earlier)
            block_end = (d // b + 1) * b
            if d < min(len(prompt), len(earlier)) and block_end <= reusable and block_end <= len(earlier):
                crossed += 1
                break
    return crossed
