"""Decode-path fidelity: a lossy stack measured on greedy continuations, token by token, as it serves.

Teacher-forced fidelity on domain text sees the distribution at every position of a fixed text. A
served model instead decodes: every generated token is written to the KV cache alone and the next is
computed from it. This check follows the baseline's greedy continuation of each equivalence prompt:
the candidate is scored along it in the decode shape (prompt prefilled, then one token at a time), so
per-step KL and same-top-1 compare the same contexts; the candidate's own greedy continuation gives
where it first leaves the baseline's. For a stack with a KV-cache layer it also measures shape
dependence: the same sequences scored in other serving shapes (whole-sequence prefill, verify blocks,
prefix hits) against its own decode shape. A correct quantized cache gives the same numbers whichever
block a token is written in; a cache that quantizes per write block does not, and that moves the
numbers of every lossless layer stacked on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qualgate.instruments.fidelity import TAIL_SAMPLES, at_least_zero, kl_per_position, reference_ids
from qualgate.instruments.shapes import (
    SHAPE_TOP_K,
    decode_schedule,
    measure_shape_noise,
    prefix_schedules,
    verify_schedules,
)
from qualgate.stats import clustered_mean, proportion

if TYPE_CHECKING:
    from qualgate.backends.base import Generation, Session

# The serving shapes a KV layer is checked in when no lossless layer names its own: a verify block of
# a typical k = 4, and prefix hits at vLLM's default block of 16.
GENERIC_VERIFY_K = 4
GENERIC_PREFIX_BLOCK = 16


@dataclass(frozen=True)
class BaselinePath:
    """The baseline's greedy continuation of one prompt and its decode-shape top-k along it."""

    prompt_ids: list[int]
    token_ids: list[int]
    top_ids: np.ndarray  # [n_new, k]
    top_logprobs: np.ndarray  # [n_new, k]
    tail_mass: np.ndarray  # [n_new]
    # Draws from the baseline's tail at each step (as a golden keeps them): KL is then estimated, not
    # bounded. None on an engine that cannot see the whole vocabulary.
    tail_ids: np.ndarray | None = None  # [n_new, s]
    tail_logprobs: np.ndarray | None = None  # [n_new, s]

    @property
    def reference_ids(self) -> np.ndarray:
        return reference_ids(self.top_ids, self.tail_ids)

    def as_record(self) -> dict[str, Any]:
        record = {
            "prompt_ids": self.prompt_ids,
            "token_ids": self.token_ids,
            "top_ids": self.top_ids.tolist(),
            "top_logprobs": self.top_logprobs.tolist(),
            "tail_mass": self.tail_mass.tolist(),
        }
        if self.tail_ids is not None and self.tail_logprobs is not None:
            # -inf (a step without a tail) is not JSON: None stands for it
            record["tail_ids"] = self.tail_ids.tolist()
            record["tail_logprobs"] = [
                [None if not np.isfinite(x) else float(x) for x in row] for row in self.tail_logprobs
            ]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BaselinePath:
        tail_ids = tail_logprobs = None
        if "tail_ids" in record:
            tail_ids = np.asarray(record["tail_ids"], dtype=np.int64)
            rows = [[-np.inf if x is None else x for x in row] for row in record["tail_logprobs"]]
            tail_logprobs = np.asarray(rows, dtype=np.float64).reshape(tail_ids.shape)
        return cls(
            list(record["prompt_ids"]),
            list(record["token_ids"]),
            np.asarray(record["top_ids"], dtype=np.int64),
            np.asarray(record["top_logprobs"], dtype=np.float64),
            np.asarray(record["tail_mass"], dtype=np.float64),
            tail_ids,
            tail_logprobs,
        )


def baseline_paths(baseline: Session, generations: Sequence[Generation]) -> list[BaselinePath]:
    """Score the baseline's own greedy continuations in the decode shape, keeping the top-k."""
    paths = []
    for gen in generations:
        ids = [*gen.prompt_ids, *gen.token_ids]
        rows = slice(len(gen.prompt_ids) - 1, len(ids) - 1)
        if not gen.token_ids:
            continue
        scored = baseline.score(
            ids,
            top_k=SHAPE_TOP_K,
            schedule=decode_schedule(len(gen.prompt_ids), len(gen.token_ids)),
            tail_samples=TAIL_SAMPLES,
        )
        paths.append(
            BaselinePath(
                list(gen.prompt_ids),
                list(gen.token_ids),
                scored.top_ids[rows],
                scored.top_logprobs[rows],
                scored.tail_mass[rows],
                None if scored.tail_ids is None else scored.tail_ids[rows],
                None if scored.tail_logprobs is None else scored.tail_logprobs[rows],
            )
        )
    return paths


def generic_schedules(prompt_len: int, n_new: int, index: int) -> dict[str, list[int]]:
    """One of each serving shape: a whole-sequence prefill, verify blocks (fixed and seeded random
    lengths) and a prefix hit at the first block boundary. Each costs a forward pass per decoded token
    or block, so the set stays small: a KV layer that depends on shapes shows it in any of them."""
    verify = verify_schedules(prompt_len, n_new, GENERIC_VERIFY_K, seed=index)
    shapes = {"prefill": [prompt_len + n_new - 1]}
    shapes.update(
        {name: verify[name] for name in (f"verify{GENERIC_VERIFY_K + 1}@0", "verify-random0") if name in verify}
    )
    hits = prefix_schedules(prompt_len, n_new, GENERIC_PREFIX_BLOCK)
    shapes.update(dict(list(hits.items())[:1]))
    return shapes


def first_divergences(paths: Sequence[BaselinePath], generations: Sequence[Generation]) -> list[int | None]:
    out: list[int | None] = []
    for path, gen in zip(paths, generations, strict=True):
        position = next(
            (i for i, (a, b) in enumerate(zip(path.token_ids, gen.token_ids, strict=False)) if a != b), None
        )
        if position is None and len(path.token_ids) != len(gen.token_ids):
            position = min(len(path.token_ids), len(gen.token_ids))
        out.append(position)
    return out


def step_kl(path: BaselinePath, gathered: np.ndarray) -> tuple[np.ndarray, bool]:
    """KL(baseline || candidate) at each step and whether it is estimated (fidelity's estimator: the
    sampled tail when the path has draws and every id's logprob is known, else the lower bound)."""
    kl, _, variance = kl_per_position(path.top_logprobs, path.tail_mass, path.tail_logprobs, gathered)
    return kl, variance is not None


def run_decode_path(
    candidate: Session,
    paths: Sequence[BaselinePath],
    max_new_tokens: int,
    level: float = 0.95,
    on_prompt: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Per-step KL and same-top-1 along the baseline's continuations, first divergences of the
    candidate's own, and (with a KV-cache layer) shape dependence. Intervals are clustered by prompt."""
    kls: list[np.ndarray] = []
    same: list[np.ndarray] = []
    owner: list[np.ndarray] = []
    estimated = True
    for index, path in enumerate(paths):
        ids = [*path.prompt_ids, *path.token_ids]
        rows = slice(len(path.prompt_ids) - 1, len(ids) - 1)
        wanted = path.reference_ids
        gather = np.zeros((len(ids) - 1, wanted.shape[1]), dtype=np.int64)
        gather[rows] = wanted
        scored = candidate.score(
            ids, top_k=1, schedule=decode_schedule(len(path.prompt_ids), len(path.token_ids)), gather=gather
        )
        assert scored.gathered is not None
        kl, sampled = step_kl(path, scored.gathered[rows])
        estimated = estimated and sampled
        kls.append(kl)
        same.append(scored.top_ids[rows, 0] == path.top_ids[:, 0])
        owner.append(np.full(kl.size, index))
        if on_prompt is not None:
            on_prompt(index + 1, len(paths))
    kl_all, same_all, clusters = np.concatenate(kls), np.concatenate(same), np.concatenate(owner)
    generations = candidate.generate([p.prompt_ids for p in paths], max_new_tokens=max_new_tokens, top_k=2)
    positions = first_divergences(paths, generations)
    diverged = [p for p in positions if p is not None]
    by_step = [float(np.mean([k[j] for k in kls if k.size > j])) for j in range(max(k.size for k in kls))]
    summary: dict[str, Any] = {
        "prompts": len(paths),
        "steps": int(kl_all.size),
        "decode_kl_mean": at_least_zero(clustered_mean(kl_all, clusters, level)),
        "kl_estimator": "sampled-tail" if estimated else "bound",
        "decode_kl_max": float(kl_all.max()),
        "decode_kl_by_step": by_step,
        "decode_same_top1": proportion(same_all, level).as_dict(),
        "exact_match_rate": sum(p is None for p in positions) / len(positions),
        "first_divergence": {
            "diverged": len(diverged),
            "min": min(diverged) if diverged else None,
            "median": float(np.median(diverged)) if diverged else None,
        },
        "scoring": "serve: prefill prompt + decode 1",
        "shape": None,
    }
    if candidate.stack.layer("kv_quant") is not None and candidate.capabilities.block_scoring:
        noise = measure_shape_noise(candidate, [(p.prompt_ids, p.token_ids) for p in paths], generic_schedules)
        shape_kl = noise.kl[~np.isnan(noise.kl)]
        summary["shape"] = {
            **noise.summary(),
            "shape_kl": clustered_mean(shape_kl, noise.sequence[~np.isnan(noise.kl)], level).as_dict(),
        }
    return summary
