"""Fidelity: perplexity on domain text and how far the candidate's distribution moved.

Two steps with one responsibility each: `score_text` runs a session over the chunks of a text and
keeps per-token arrays (TokenScores); `compare` is a pure function of two TokenScores.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qualgate.chunking import Chunk, ChunkingMode, llamacpp_chunks, rolling_chunks
from qualgate.errors import ConfigError
from qualgate.stats import Estimate, clustered_mean, pearson, percentiles, plain_mean, proportion

if TYPE_CHECKING:
    from qualgate.backends.base import Session

CONFIDENCE_BUCKETS = (0.0, 0.25, 0.5, 0.75, 0.95, 1.0)
TAIL_RESOLUTION = 1e-6
# Tail draws per scored token in a golden. On the bundled target (top-64 leaves 22% of KL in the tail)
# 16 draws keep the full-vocabulary KL inside the interval for RTN 2/4/8-bit and FP8 KV, for
# about 12 bytes per token compressed (tests/test_fidelity_crosschecks.py, docs/metrics.md).
TAIL_SAMPLES = 16


class FidelityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: ChunkingMode = "llamacpp"
    n_ctx: int = Field(512, ge=4, description="llamacpp chunk length, or the rolling window (max_length)")
    top_k: int = Field(64, ge=1, description="reference top-k kept for KL (plus one tail bucket)")
    tail_samples: int = Field(
        TAIL_SAMPLES,
        ge=0,
        description="ids per position the golden draws from the reference's distribution outside its top-k: "
        "KL's tail term is estimated from them (0: KL is the top-k + tail-bucket lower bound)",
    )
    block_size: int | None = Field(None, ge=1, description="tokens fed through the KV cache at a time")
    kv_scoring: Literal["serve", "blocks"] = Field(
        "serve",
        description="how a stack that quantizes the KV cache is scored: 'serve' prefills each chunk's context "
        "as one block and decodes the scored part one token at a time, as an engine does; 'blocks' feeds "
        "blocks of kv_block_size",
    )
    kv_block_size: int = Field(32, ge=1, description="block size for KV-quantized stacks with kv_scoring: blocks")
    max_chunks: int | None = Field(None, ge=1, description="score only the first N chunks")

    def block_size_for(self, session: Session) -> int | None:
        if self.block_size is None and session.stack.layer("kv_quant") is not None and self.kv_scoring == "blocks":
            return self.kv_block_size
        return self.block_size

    def serves(self, session: Session) -> bool:
        """Whether this session is scored in the serving pattern (prefill, then single-token decodes)."""
        return self.block_size is None and self.kv_scoring == "serve" and session.stack.layer("kv_quant") is not None


def serving_schedule(chunk: Chunk) -> list[int]:
    """The chunk's unscored context as one prefill block, then every scored position decoded alone.

    A quantized KV cache sees each token written the way it is while serving: a prompt in one block,
    every generated token on its own. A cache whose single-token writes are broken is only caught
    this way (its prefill is correct)."""
    n_inputs = len(chunk.token_ids) - 1
    prefill = [chunk.first_scored] if chunk.first_scored else []
    return prefill + [1] * (n_inputs - chunk.first_scored)


def scoring_label(block_size: int | None, serve: bool, prefill: int | None = None) -> str:
    """How tokens entered the cache, for the report."""
    if serve:
        return f"serve: prefill {prefill} + decode 1" if prefill else "serve: decode 1"
    return "one pass" if block_size is None else f"blocks of {block_size}"


class ChunkCheckpoint(Protocol):
    def load(self, index: int) -> dict[str, np.ndarray] | None: ...

    def save(self, index: int, part: dict[str, np.ndarray]) -> None: ...


def reference_ids(top_ids: np.ndarray, tail_ids: np.ndarray | None) -> np.ndarray:
    """The top-k ids, then the tail draws when there are any: what a candidate is asked about."""
    return top_ids if tail_ids is None else np.concatenate([top_ids, tail_ids], axis=1)


@dataclass(frozen=True)
class TokenScores:
    """Per scored token: its chunk, the actual next token and the distribution around it."""

    chunk: np.ndarray  # [N] int32
    target: np.ndarray  # [N] int64
    logprob: np.ndarray  # [N] float64: log Q(t) (or log P(t) for the reference)
    top_ids: np.ndarray  # [N, k]
    top_logprobs: np.ndarray  # [N, k]
    tail_mass: np.ndarray  # [N]
    gathered: np.ndarray | None = None  # [N, k_ref (+ s)]: this side's logprobs at the reference's ids
    block_size: int | None = None
    scoring: str = "one pass"  # how the tokens entered the KV cache (scoring_label)
    tail_ids: np.ndarray | None = None  # [N, s]: ids drawn from this side's tail (a golden's reference)
    tail_logprobs: np.ndarray | None = None  # [N, s]: their logprobs on this side

    @property
    def reference_ids(self) -> np.ndarray:
        """The ids a candidate is asked for at each position: the top-k, then the tail sample."""
        return reference_ids(self.top_ids, self.tail_ids)

    @property
    def n(self) -> int:
        return int(self.target.size)


def chunk_text(session: Session, text: str, config: FidelityConfig) -> list[Chunk]:
    if config.mode == "llamacpp":
        chunks = llamacpp_chunks(session.encode(text, add_bos=True), config.n_ctx, session.bos_token_id)
    else:
        prefix = session.bos_token_id if session.bos_token_id is not None else session.eos_token_id
        if prefix is None:
            raise ConfigError("rolling mode needs a BOS or EOS token to prefix the first window")
        chunks = rolling_chunks(session.encode(text, add_bos=False), config.n_ctx, prefix)
    return chunks[: config.max_chunks] if config.max_chunks else chunks


def score_text(
    session: Session,
    chunks: list[Chunk],
    config: FidelityConfig,
    reference: TokenScores | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    checkpoint: ChunkCheckpoint | None = None,
) -> TokenScores:
    """Score every chunk; with a reference, also gather this side's logprobs at its top-k ids.

    With a checkpoint, each chunk's arrays are saved as soon as they exist and reused on a rerun, so
    an interrupted run loses at most the chunk in flight."""
    block_size = config.block_size_for(session)
    serve = config.serves(session)
    parts: list[dict[str, np.ndarray]] = []
    offset = 0
    for index, chunk in enumerate(chunks):
        saved = checkpoint.load(index) if checkpoint is not None else None
        if saved is not None:
            parts.append(saved)
            offset += chunk.n_scored
            if on_chunk is not None:
                on_chunk(index + 1, len(chunks))
            continue
        gather = None
        if reference is not None:
            rows = reference.reference_ids[offset : offset + chunk.n_scored]
            gather = np.zeros((len(chunk.token_ids) - 1, rows.shape[1]), dtype=np.int64)
            gather[chunk.first_scored :] = rows
        schedule = serving_schedule(chunk) if serve else None
        result = session.score(
            chunk.token_ids,
            top_k=config.top_k,
            block_size=block_size,
            gather=gather,
            schedule=schedule,
            # Only the reference side draws a tail sample; a candidate is asked for the reference's draws.
            tail_samples=config.tail_samples if reference is None else 0,
        )
        keep = slice(chunk.first_scored, None)
        part: dict[str, np.ndarray] = {
            "chunk": np.full(chunk.n_scored, index, dtype=np.int32),
            "target": np.asarray(chunk.targets, dtype=np.int64),
            "logprob": result.logprobs[keep],
            "top_ids": result.top_ids[keep],
            "top_logprobs": result.top_logprobs[keep],
            "tail_mass": result.tail_mass[keep],
        }
        if result.gathered is not None:
            part["gathered"] = result.gathered[keep]
        if result.tail_ids is not None and result.tail_logprobs is not None:
            part["tail_ids"] = result.tail_ids[keep]
            part["tail_logprobs"] = result.tail_logprobs[keep]
        if checkpoint is not None:
            checkpoint.save(index, part)
        parts.append(part)
        offset += chunk.n_scored
        if on_chunk is not None:
            on_chunk(index + 1, len(chunks))
    if reference is not None and offset != reference.n:
        raise ConfigError(
            f"the candidate scored {offset} tokens but the reference has {reference.n}; "
            "they must use the same text and chunking"
        )
    merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    label = scoring_label(block_size, serve, chunks[0].first_scored if chunks else None)
    return TokenScores(**merged, block_size=block_size, scoring=label)


@dataclass(frozen=True)
class FidelityResult:
    summary: dict[str, Any]
    per_token: dict[str, np.ndarray]


def kl_topk_tail(p_top: np.ndarray, p_tail: np.ndarray, q_at_p_top: np.ndarray) -> np.ndarray:
    """KL(P||Q) over P's top-k tokens plus one tail bucket (a lower bound of the full KL).

    p_top and q_at_p_top are logprobs [N, k] at the same token ids; p_tail is 1 - sum(P top-k). A NaN
    in q_at_p_top is an id the candidate engine did not return (HTTP top-k): it joins the tail bucket
    on both sides, which merges outcomes and so keeps the bound.
    """
    known = ~np.isnan(q_at_p_top)
    p = np.exp(p_top)
    head = np.where(known, p * (p_top - np.where(known, q_at_p_top, 0.0)), 0.0).sum(axis=1)
    p_tail = p_tail + np.where(known, 0.0, p).sum(axis=1)
    # A tail is 1 minus a sum of float32 probabilities: below TAIL_RESOLUTION it is rounding, and
    # log(noise / noise) would add a spurious KL term (0.6% of the total on a full-vocabulary row).
    q_tail = np.clip(
        1.0 - np.where(known, np.exp(np.where(known, q_at_p_top, 0.0)), 0.0).sum(axis=1), TAIL_RESOLUTION, None
    )
    real = p_tail > TAIL_RESOLUTION
    safe_p_tail = np.where(real, p_tail, 1.0)
    tail = np.where(real, safe_p_tail * (np.log(safe_p_tail) - np.log(q_tail)), 0.0)
    return np.asarray(head + tail, dtype=np.float64)


def kl_sampled_tail(
    p_top: np.ndarray,
    q_top: np.ndarray,
    p_tail: np.ndarray,
    p_samples: np.ndarray,
    q_samples: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-position KL(P||Q): the exact top-k term plus an unbiased estimate of the tail term.

    The tail term, sum over ids outside P's top-k of P(x) log(P(x)/Q(x)), is P(tail) times the mean of
    log P(x) - log Q(x) over ids x drawn from P restricted to its tail (p_samples, q_samples [N, s]:
    both sides' logprobs at the draws). Returns (estimate per position, the sampling variance of each
    estimate); a position's estimate can be negative, their mean is unbiased for the mean full KL."""
    p = np.exp(p_top)
    head = (p * (p_top - q_top)).sum(axis=1)
    drawn = np.isfinite(p_samples)  # -inf: a position without a tail (nothing drawn)
    diff = np.where(drawn, p_samples - np.where(drawn, q_samples, 0.0), 0.0)
    count = drawn.sum(axis=1)
    weight = np.where((p_tail > TAIL_RESOLUTION) & (count > 0), p_tail, 0.0)
    safe = np.maximum(count, 1)
    mean = diff.sum(axis=1) / safe
    spread = np.where(drawn, (diff - mean[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(count - 1, 1)
    variance = np.where(count > 1, weight**2 * spread / safe, 0.0)
    return np.asarray(head + weight * mean, dtype=np.float64), np.asarray(variance, dtype=np.float64)


def kl_per_position(
    p_top: np.ndarray, p_tail: np.ndarray, p_samples: np.ndarray | None, gathered: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """KL(P||Q) per position from the reference's top-k logprobs, tail mass and tail draws (None:
    none kept) and the candidate's logprobs `gathered` at the reference's ids (top-k, then draws).

    Returns (KL, the top-k + tail-bucket lower bound, the sampling variance of each KL). KL is the
    sampled-tail estimate when there are draws and every id's logprob is known; otherwise it is the
    bound and the variance is None (an engine that returned only its own top-k leaves unknowns)."""
    k = p_top.shape[1]
    q_top = gathered[:, :k].astype(np.float64)
    bound = np.asarray(np.clip(kl_topk_tail(p_top, p_tail, q_top), 0.0, None), dtype=np.float64)  # float noise
    s = 0 if p_samples is None else p_samples.shape[1]
    q_samples = gathered[:, k : k + s].astype(np.float64)
    if p_samples is None or q_samples.shape[1] != s or np.isnan(gathered[:, : k + s]).any():
        return bound, bound, None
    estimate, variance = kl_sampled_tail(p_top, q_top, p_tail, p_samples.astype(np.float64), q_samples)
    return estimate, bound, variance


def _kl_estimate(reference: TokenScores, candidate: TokenScores) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(per-position KL used for the mean, the lower bound per position, how it was computed)."""
    assert candidate.gathered is not None
    kl, bound, variance = kl_per_position(
        reference.top_logprobs.astype(np.float64),
        reference.tail_mass.astype(np.float64),
        reference.tail_logprobs,
        candidate.gathered,
    )
    if variance is None:
        why = (
            "the golden has no tail sample"
            if reference.tail_ids is None
            else "the candidate engine returned only its own top-k"
        )
        return kl, bound, {"kind": "bound", "tail_samples": 0, "why": why, "sampling_se": 0.0}
    sampling_se = float(np.sqrt(variance.sum()) / kl.size)
    s = reference.tail_logprobs.shape[1] if reference.tail_logprobs is not None else 0
    return kl, bound, {"kind": "sampled-tail", "tail_samples": s, "sampling_se": sampling_se}


def at_least_zero(est: Estimate) -> dict[str, float]:
    """KL is never negative: an estimate (or the low end of its interval) below 0 is sampling noise
    around an unchanged distribution, reported as 0 (the interval keeps its coverage)."""
    return {**est.as_dict(), "value": max(est.value, 0.0), "low": max(est.low, 0.0)}


def compare(reference: TokenScores, candidate: TokenScores, level: float = 0.95) -> FidelityResult:
    """All fidelity metrics of the candidate Q against the reference P on the same tokens."""
    if candidate.gathered is None:
        raise ConfigError("the candidate must be scored with the reference (score_text(..., reference=...))")
    if reference.n != candidate.n or not np.array_equal(reference.target, candidate.target):
        raise ConfigError("reference and candidate scored different tokens; use the same text and chunking")
    nll_p = -reference.logprob.astype(np.float64)
    nll_q = -candidate.logprob.astype(np.float64)
    chunks = reference.chunk
    k = reference.top_logprobs.shape[1]
    q_top = candidate.gathered[:, :k].astype(np.float64)
    kl, kl_bound, estimator = _kl_estimate(reference, candidate)
    shown = np.clip(kl, 0.0, None)  # per-position figures (percentiles, buckets): a KL is >= 0
    same = reference.top_ids[:, 0] == candidate.top_ids[:, 0]
    dp = np.exp(-nll_q) - np.exp(-nll_p)
    confidence = np.exp(reference.top_logprobs[:, 0].astype(np.float64))

    ln_ratio = clustered_mean(nll_q - nll_p, chunks, level)
    kl_plain = plain_mean(kl, level)
    kl_clustered = clustered_mean(kl, chunks, level)
    if estimator["sampling_se"] > kl_clustered.se:
        # The clustered SE holds the tail sample's variance in expectation but is itself estimated from
        # a few chunks: it is never allowed below the sampling SE alone.
        df = int(np.unique(chunks).size) - 1
        kl_clustered = Estimate.student(kl_clustered.value, estimator["sampling_se"], df, level)
    bound_clustered = clustered_mean(kl_bound, chunks, level)
    top1 = proportion(same, level)
    buckets = []
    for low, high in itertools.pairwise(CONFIDENCE_BUCKETS):
        upper = confidence <= high if high == 1.0 else confidence < high
        mask = (confidence >= low) & upper
        buckets.append(
            {
                "bucket": f"[{low:g},{high:g}{']' if high == 1.0 else ')'}",
                "n": int(mask.sum()),
                "kl_mean": float(shown[mask].mean()) if mask.any() else float("nan"),
            }
        )
    summary: dict[str, Any] = {
        "n_tokens": reference.n,
        "n_chunks": int(np.unique(chunks).size),
        "top_k": k,
        # KL over the top-k plus one tail bucket is a lower bound; it misses roughly this share of the
        # full KL (measured on the fixture model), so a large value asks for a larger top_k.
        "reference_tail_mass": float(reference.tail_mass.mean()),
        # Reference top-k mass whose ids the candidate engine did not return (HTTP top-k), merged into
        # the tail bucket: 0 in process; a large value asks for a larger engine top-k (max_logprobs).
        "merged_mass": float(np.where(np.isnan(q_top), np.exp(reference.top_logprobs), 0.0).sum(axis=1).mean()),
        "block_size": {"reference": reference.block_size, "candidate": candidate.block_size},
        "scoring": {"reference": reference.scoring, "candidate": candidate.scoring},
        "ppl_reference": float(np.exp(nll_p.mean())),
        "ppl_candidate": float(np.exp(nll_q.mean())),
        "ln_ppl_ratio": ln_ratio.as_dict(),
        "ppl_ratio": ln_ratio.map(np.exp).as_dict(),
        "kl_mean": {**at_least_zero(kl_clustered), "se_plain": kl_plain.se},
        # How kl_mean was computed: "sampled-tail" (top-k exact + an unbiased estimate of the tail, its
        # sampling variance inside the interval) or "bound" (top-k + one tail bucket: a lower bound).
        "kl_estimator": estimator,
        "kl_bound": bound_clustered.as_dict(),
        "kl_percentiles": {
            key: value for key, value in percentiles(shown).items() if key in ("p50", "p90", "p99", "p99.9", "max")
        },
        "same_top1": top1.as_dict(),
        "dp_rms": float(np.sqrt((dp**2).mean())),
        "dp_mean": float(dp.mean()),
        "dp_percentiles": percentiles(dp),
        "nll_correlation": pearson(nll_q, nll_p),
        "kl_by_confidence": buckets,
    }
    per_token = {
        "chunk": chunks,
        "target": reference.target,
        "nll_reference": nll_p,
        "nll_candidate": nll_q,
        "kl": kl,
        "kl_bound": kl_bound,
        "same_top1": same,
        "dp": dp,
        "reference_confidence": confidence,
        "reference_top1": reference.top_ids[:, 0],
        "candidate_top1": candidate.top_ids[:, 0],
    }
    return FidelityResult(summary, per_token)


def perplexity(scores: TokenScores) -> Estimate:
    """PPL with an interval from the chunk-clustered SE of the mean NLL."""
    return clustered_mean(-scores.logprob, scores.chunk).map(np.exp)
