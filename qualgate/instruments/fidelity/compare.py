"""Comparing a candidate's per-token scores with the reference's: KL divergence (top-k plus a tail
bucket, or with the sampled tail estimate), same-top-1 agreement and the perplexity ratio, each with a
chunk-clustered interval. Pure functions of two TokenScores."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qualgate.errors import ConfigError
from qualgate.instruments.fidelity.scores import CONFIDENCE_BUCKETS, TAIL_RESOLUTION, ScoredChunk
from qualgate.instruments.fidelity.token_scores import TokenScores
from qualgate.stats import Estimate, clustered_mean, pearson, percentiles, plain_mean, proportion


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


# Positions per block when computing per-position KL: the [block, k] float64 temporaries stay a few
# MB whatever the text's length (a whole 100k-token text made them hundreds of MB).
BLOCK = 4096


def position_metrics(reference: TokenScores, candidate: TokenScores) -> dict[str, np.ndarray]:
    """Every per-position figure of the candidate Q against the reference P on the same positions.

    `kl` is the sampled-tail estimate where the block allows one (else the bound), `kl_variance` its
    sampling variance (NaN where the block only has the bound), `merged` the reference's top-k mass at
    ids the candidate engine did not return."""
    if candidate.gathered is None:
        raise ConfigError("the candidate must be scored with the reference (score_text(..., reference=...))")
    if reference.n != candidate.n or not np.array_equal(reference.target, candidate.target):
        raise ConfigError("reference and candidate scored different tokens; use the same text and chunking")
    k = reference.top_logprobs.shape[1]
    p_top = reference.top_logprobs.astype(np.float64)
    kl, bound, variance = kl_per_position(
        p_top, reference.tail_mass.astype(np.float64), reference.tail_logprobs, candidate.gathered
    )
    nll_p = -reference.logprob.astype(np.float64)
    nll_q = -candidate.logprob.astype(np.float64)
    return {
        "chunk": reference.chunk,
        "target": reference.target,
        "nll_reference": nll_p,
        "nll_candidate": nll_q,
        "kl": kl,
        "kl_bound": bound,
        "kl_variance": np.full(reference.n, np.nan) if variance is None else variance,
        "merged": np.where(np.isnan(candidate.gathered[:, :k]), np.exp(p_top), 0.0).sum(axis=1),
        "same_top1": reference.top_ids[:, 0] == candidate.top_ids[:, 0],
        "dp": np.exp(-nll_q) - np.exp(-nll_p),
        "reference_confidence": np.exp(p_top[:, 0]),
        "reference_tail_mass": reference.tail_mass.astype(np.float64),
        "reference_top1": reference.top_ids[:, 0],
        "candidate_top1": candidate.top_ids[:, 0],
    }


# Per-position figures that are working values, not part of the per-token file.
_WORKING = ("kl_variance", "merged", "reference_tail_mass")


class Comparison:
    """The fidelity metrics folded one stretch of positions at a time: only the per-position scalars
    are kept (about 100 bytes a token), never either side's [positions, k] arrays."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, np.ndarray]] = []
        self.meta: dict[str, Any] | None = None

    def add(self, reference: TokenScores, candidate: TokenScores) -> None:
        if reference.n != candidate.n:  # blocks are cut by the reference: a longer candidate would be cut too
            raise ConfigError("reference and candidate scored different tokens; use the same text and chunking")
        if self.meta is None:
            self.meta = {
                "top_k": reference.top_logprobs.shape[1],
                "tail_samples": 0 if reference.tail_logprobs is None else reference.tail_logprobs.shape[1],
                "block_size": {"reference": reference.block_size, "candidate": candidate.block_size},
                "scoring": {"reference": reference.scoring, "candidate": candidate.scoring},
            }
        for start in range(0, reference.n, BLOCK):
            rows = slice(start, start + BLOCK)
            self.blocks.append(position_metrics(reference.select(rows), candidate.select(rows)))

    def result(self, level: float = 0.95) -> FidelityResult:
        if self.meta is None:
            raise ConfigError("no positions were compared; give more text or a smaller n_ctx")
        columns = {name: np.concatenate([b[name] for b in self.blocks]) for name in self.blocks[0]}
        return summarize(columns, self.meta, level)


def _kl_estimator(columns: dict[str, np.ndarray], meta: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The per-position KL the mean is taken over, and how it was computed. One estimator for the
    whole text: a block with an unknown id (an engine's own top-k) makes it the bound."""
    variance = columns["kl_variance"]
    if meta["tail_samples"] == 0 or np.isnan(variance).any():
        why = "the candidate engine returned only its own top-k"
        if meta["tail_samples"] == 0:
            why = "the golden has no tail sample"
        return columns["kl_bound"], {"kind": "bound", "tail_samples": 0, "why": why, "sampling_se": 0.0}
    sampling_se = float(np.sqrt(variance.sum()) / variance.size)
    return columns["kl"], {"kind": "sampled-tail", "tail_samples": meta["tail_samples"], "sampling_se": sampling_se}


def at_least_zero(est: Estimate) -> dict[str, float]:
    """KL is never negative: an estimate (or the low end of its interval) below 0 is sampling noise
    around an unchanged distribution, reported as 0 (the interval keeps its coverage)."""
    return {**est.as_dict(), "value": max(est.value, 0.0), "low": max(est.low, 0.0)}


def compare(reference: TokenScores, candidate: TokenScores, level: float = 0.95) -> FidelityResult:
    """All fidelity metrics of the candidate Q against the reference P on the same tokens."""
    comparison = Comparison()
    comparison.add(reference, candidate)
    return comparison.result(level)


def compare_scored(scored: Iterable[ScoredChunk], level: float = 0.95) -> FidelityResult:
    """All fidelity metrics of a candidate scored chunk by chunk against a streamed reference
    (iter_scores with a reference): each chunk is folded in as it comes, so neither side's
    [tokens, k] arrays are ever held for the whole text."""
    comparison = Comparison()
    for chunk in scored:
        if chunk.reference is None:
            raise ConfigError("the candidate must be scored with the reference (iter_scores(..., reference=...))")
        comparison.add(chunk.reference, chunk.scores)
    return comparison.result(level)


def summarize(columns: dict[str, np.ndarray], meta: dict[str, Any], level: float = 0.95) -> FidelityResult:
    """The summary (means with chunk-clustered intervals, percentiles, buckets) of the per-position
    figures of a whole text (position_metrics, joined)."""
    nll_p, nll_q = columns["nll_reference"], columns["nll_candidate"]
    chunks = columns["chunk"]
    kl, estimator = _kl_estimator(columns, meta)
    kl_bound = columns["kl_bound"]
    shown = np.clip(kl, 0.0, None)  # per-position figures (percentiles, buckets): a KL is >= 0
    same = columns["same_top1"]
    dp = columns["dp"]
    confidence = columns["reference_confidence"]
    n = int(kl.size)

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
        "n_tokens": n,
        "n_chunks": int(np.unique(chunks).size),
        "top_k": meta["top_k"],
        # KL over the top-k plus one tail bucket is a lower bound; it misses roughly this share of the
        # full KL (measured on the fixture model), so a large value asks for a larger top_k.
        "reference_tail_mass": float(columns["reference_tail_mass"].mean()),
        # Reference top-k mass whose ids the candidate engine did not return (HTTP top-k), merged into
        # the tail bucket: 0 in process; a large value asks for a larger engine top-k (max_logprobs).
        "merged_mass": float(columns["merged"].sum()) / n if n else float("nan"),
        "block_size": meta["block_size"],
        "scoring": meta["scoring"],
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
    per_token = {name: values for name, values in columns.items() if name not in _WORKING}
    per_token["kl"] = kl
    return FidelityResult(summary, per_token)


def perplexity(scores: TokenScores) -> Estimate:
    """PPL with an interval from the chunk-clustered SE of the mean NLL."""
    return clustered_mean(-scores.logprob, scores.chunk).map(np.exp)
