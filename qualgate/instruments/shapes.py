"""The shapes in which tokens enter a KV cache while serving, and how much a stack's numbers move with them.

A lossless layer changes how tokens are computed, not which: speculation verifies k+1 tokens in one
forward pass where plain decoding computes one; a prefix-cache hit computes the prompt's tail alone
where a miss computes the whole prompt. The same weights then run other kernels (other GEMM tilings,
other reduction orders), and a 1-ulp difference grows through the residual stream; a quantized KV
cache can amplify it by rounding to the other side, or depend on the block it is written in outright.

So the tolerance of an equivalence check is measured, not assumed: the reference stack's own greedy
sequences are scored in the shapes the candidate uses and compared with the reference's own decoding
shape (a prefill of the prompt, then one token at a time). The spread of those differences is the
noise floor of that stack on that machine; the same numbers on a KV-quantized stack are its shape
dependence, a property of the KV layer (how much its output depends on how tokens were batched).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qualgate.instruments.fidelity import kl_topk_tail
from qualgate.stats import percentiles

if TYPE_CHECKING:
    from qualgate.backends.base import Session
    from qualgate.stack import Stack

# Top-k of the decode-shape distribution kept for the shape KL (plus one tail bucket).
SHAPE_TOP_K = 64
# Seeded schedules of random verify-block lengths (1..k+1) per sequence, besides the k+1 fixed phases.
RANDOM_VERIFY_SCHEDULES = 2


def decode_schedule(prompt_len: int, n_new: int) -> list[int]:
    """The prompt in one block, then each generated token alone: how plain greedy decoding feeds them.

    Scoring prompt + generated tokens predicts the n_new generated tokens from the rows after the
    prompt's last token and after each generated token but the last (n_new - 1 inputs after the prompt)."""
    return [prompt_len] + [1] * (n_new - 1)


def _blocks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def verify_schedules(prompt_len: int, n_new: int, k: int, seed: int) -> dict[str, list[int]]:
    """Speculative verification feeds the last accepted token plus k drafts (k+1 tokens) per step; where
    the blocks start depends on acceptance, so every phase 0..k is scored, plus seeded random lengths
    1..k+1 (a partial acceptance rewinds and starts the next block early)."""
    rest = n_new - 1
    shapes: dict[str, list[int]] = {}
    for phase in range(min(k + 1, max(rest, 1))):
        lead = [phase] if phase else []
        shapes[f"verify{k + 1}@{phase}"] = [prompt_len, *lead, *_blocks(rest - phase, k + 1)]
    rng = random.Random(seed)
    for n in range(RANDOM_VERIFY_SCHEDULES):
        lengths, left = [], rest
        while left > 0:
            lengths.append(min(left, rng.randint(1, k + 1)))
            left -= lengths[-1]
        shapes[f"verify-random{n}"] = [prompt_len, *lengths]
    return {name: [b for b in blocks if b] for name, blocks in shapes.items()}


def prefix_schedules(prompt_len: int, n_new: int, block_size: int) -> dict[str, list[int]]:
    """A prefix-cache hit: the cached whole blocks were computed alone (by an earlier request), the rest
    after them. The rest is fed as one block here, not decoded token by token: that keeps the check to
    two forward passes, and the one-block rest adds prefill noise, which the "prefill" shape measures
    anyway. At the first and the last whole-block boundary of the prompt."""
    reusable = (prompt_len - 1) // block_size
    if reusable < 1:
        return {}
    rest = prompt_len + n_new - 1
    return {f"prefix-hit@{j * block_size}": [j * block_size, rest - j * block_size] for j in sorted({1, reusable})}


def candidate_schedules(candidate: Stack, prompt_len: int, n_new: int, seed: int) -> dict[str, list[int]]:
    """Every shape the candidate stack's lossless layers feed tokens in, and the whole sequence in one
    prefill (a preempted or recomputed request; what prompt-logprob endpoints compute)."""
    shapes = {"prefill": [prompt_len + n_new - 1]}
    spec = candidate.layer("speculation")
    if spec is not None:
        k = int(getattr(spec.params, "num_speculative_tokens", 4))
        shapes.update(verify_schedules(prompt_len, n_new, k, seed))
    prefix = candidate.layer("prefix_cache")
    if prefix is not None:
        shapes.update(prefix_schedules(prompt_len, n_new, int(getattr(prefix.params, "block_size", 16))))
    return shapes


@dataclass
class ShapeNoise:
    """Per position of the scored generations: |delta logprob| of the chosen token and KL(decode || shape),
    the worst over the shapes, and the per-shape maxima (which shape moves the numbers most)."""

    logprob_delta: np.ndarray  # [positions]
    kl: np.ndarray  # [positions]; NaN where it could not be measured
    sequence: np.ndarray  # [positions] the index of the generation each position belongs to
    by_shape: dict[str, float]  # shape -> max |delta logprob|
    shapes: list[str]

    def summary(self) -> dict[str, Any]:
        kl = self.kl[~np.isnan(self.kl)]
        return {
            "positions": int(self.logprob_delta.size),
            "shapes": self.shapes,
            "logprob_delta": _quantiles(self.logprob_delta),
            "kl": {**_quantiles(kl), "mean": float(kl.mean())} if kl.size else None,
            "max_by_shape": self.by_shape,
        }


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"p50": 0.0, "p99": 0.0, "p99.9": 0.0, "max": 0.0}
    found = percentiles(values)
    return {key: float(found[key]) for key in ("p50", "p99", "p99.9", "max")}


def measure_shape_noise(
    session: Session,
    sequences: Sequence[tuple[list[int], list[int]]],
    schedules: Any,
    recorded: Sequence[np.ndarray] | None = None,
) -> ShapeNoise:
    """Score each (prompt, generated) sequence in its decode shape and in every shape of
    `schedules(prompt_len, n_new, index)`, and compare the generated positions.

    A session that cannot choose how tokens enter its cache (an HTTP endpoint) scores the whole
    sequence once (the engine's own prefill) and is compared with `recorded`, the chosen-token
    logprobs its greedy decoding returned; KL is then not measured."""
    deltas: list[np.ndarray] = []
    kls: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    by_shape: dict[str, float] = {}
    shape_names: list[str] = []
    block_scoring = session.capabilities.block_scoring
    for index, (prompt, generated) in enumerate(sequences):
        n_new = len(generated)
        if n_new == 0:
            continue
        ids = [*prompt, *generated]
        rows = slice(len(prompt) - 1, len(ids) - 1)
        shapes: dict[str, list[int]] = schedules(len(prompt), n_new, index) if block_scoring else {"prefill": []}
        worst_delta = np.zeros(n_new)
        worst_kl = np.zeros(n_new) if block_scoring else np.full(n_new, np.nan)
        if block_scoring:
            base = session.score(ids, top_k=SHAPE_TOP_K, schedule=decode_schedule(len(prompt), n_new))
            base_lp = base.logprobs[rows]
        else:
            assert recorded is not None, "an endpoint without block scoring needs the recorded logprobs"
            base_lp = np.asarray(recorded[index][:n_new], dtype=np.float64)
        for name, schedule in shapes.items():
            if name not in shape_names:
                shape_names.append(name)
            if block_scoring:
                gather = np.asarray(base.top_ids)
                other = session.score(ids, top_k=1, schedule=schedule, gather=gather)
                assert other.gathered is not None
                kl = kl_topk_tail(base.top_logprobs[rows], base.tail_mass[rows], other.gathered[rows])
                worst_kl = np.maximum(worst_kl, np.clip(kl, 0.0, None))
            else:
                other = session.score(ids, top_k=1)
            delta = np.abs(other.logprobs[rows] - base_lp)
            worst_delta = np.maximum(worst_delta, delta)
            by_shape[name] = max(by_shape.get(name, 0.0), float(delta.max()))
        deltas.append(worst_delta)
        kls.append(worst_kl)
        owners.append(np.full(n_new, index))
    empty = np.zeros(0)
    return ShapeNoise(
        logprob_delta=np.concatenate(deltas) if deltas else empty,
        kl=np.concatenate(kls) if kls else empty,
        sequence=np.concatenate(owners) if owners else empty,
        by_shape=by_shape,
        shapes=shape_names,
    )
