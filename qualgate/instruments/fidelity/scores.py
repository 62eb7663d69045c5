"""Scoring a text through a session: chunking it as llama.cpp's perplexity tool does (or in rolling
windows), feeding each chunk as an engine would serve it, and keeping per-token arrays (TokenScores)
with the reference's top-k and sampled tail ids."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qualgate.chunking import Chunk, ChunkingMode, llamacpp_chunks, rolling_chunks
from qualgate.errors import ConfigError
from qualgate.instruments.fidelity.token_scores import InMemoryRows, ReferenceRows, TokenScores

if TYPE_CHECKING:
    from qualgate.backends.base import ScoreResult, Session

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


@dataclass(frozen=True)
class ScoredChunk:
    """One chunk scored: its index, this side's scores and (with a reference) the reference's at the
    same positions."""

    index: int
    scores: TokenScores
    reference: TokenScores | None


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
    """Every chunk scored (iter_scores), joined into one TokenScores."""
    rows = None if reference is None else InMemoryRows(reference)
    parts = [s.scores for s in iter_scores(session, chunks, config, rows, on_chunk, checkpoint)]
    if not parts:
        raise ConfigError("there are no chunks to score; give more text or a smaller n_ctx")
    return TokenScores.concat(parts)


def iter_scores(
    session: Session,
    chunks: list[Chunk],
    config: FidelityConfig,
    reference: ReferenceRows | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    checkpoint: ChunkCheckpoint | None = None,
) -> Iterator[ScoredChunk]:
    """Score every chunk, in order; with a reference, also gather this side's logprobs at its top-k
    ids (and tail draws) and hand the reference's rows over with each chunk.

    Chunks go to the session in groups it may batch (in one forward pass each, or through one batched
    KV cache when they are fed in blocks or the serving schedule and the cache allows it). With a
    checkpoint, each chunk's arrays are saved as soon as they exist and reused on a rerun, so an
    interrupted run loses at most the batch in flight. Nothing is kept between groups: a caller that
    folds each chunk as it comes holds a fixed amount of memory whatever the text's length."""
    from qualgate.backends.base import ScoreRequest

    block_size = config.block_size_for(session)
    serve = config.serves(session)
    one_pass = block_size is None and not serve
    label = scoring_label(block_size, serve, chunks[0].first_scored if chunks else None)
    # Only the reference side draws a tail sample and needs its own top-k; a candidate is asked for
    # the reference's ids (gather) and its top-1. An engine that returns only its own top-k needs the
    # full top_k for gather to find the reference's ids in it.
    full_vocab = session.capabilities.max_top_k is None
    top_k = config.top_k if reference is None or not full_vocab else 1
    tail_samples = config.tail_samples if reference is None else 0
    total = sum(c.n_scored for c in chunks)
    if reference is not None and total != reference.n:
        raise ConfigError(
            f"the candidate scored {total} tokens but the reference has {reference.n}; "
            "they must use the same text and chunking"
        )
    finished = 0

    def gather_for(chunk: Chunk, rows: TokenScores | None) -> np.ndarray | None:
        if rows is None:
            return None
        asked = rows.reference_ids
        gather = np.zeros((len(chunk.token_ids) - 1, asked.shape[1]), dtype=np.int64)
        gather[chunk.first_scored :] = asked
        return gather

    # Groups are fixed ranges of chunk indices, and a group is reused only whole: a resumed run puts
    # every chunk in the batch a fresh run would (batch shapes change GEMM kernels, and so the last
    # bits), so an interrupted run ends with the numbers of an uninterrupted one.
    width = max((len(c.token_ids) - 1 for c in chunks), default=1)
    group = session.scoring_group(width, cached=not one_pass)
    for start in range(0, len(chunks), group):
        indices = list(range(start, min(start + group, len(chunks))))
        refs = [None if reference is None else reference.take(chunks[i].n_scored) for i in indices]
        saved = [checkpoint.load(i) if checkpoint is not None else None for i in indices]
        if all(part is not None for part in saved):
            parts = [part for part in saved if part is not None]
        else:
            requests = [
                ScoreRequest(
                    chunks[i].token_ids,
                    top_k,
                    gather_for(chunks[i], ref),
                    tail_samples,
                    block_size=block_size,
                    schedule=tuple(serving_schedule(chunks[i])) if serve else None,
                )
                for i, ref in zip(indices, refs, strict=True)
            ]
            results = session.score_batch(requests)
            parts = [chunk_part(i, chunks[i], result) for i, result in zip(indices, results, strict=True)]
            if checkpoint is not None:
                for i, part in zip(indices, parts, strict=True):
                    checkpoint.save(i, part)
        for i, part, ref in zip(indices, parts, refs, strict=True):
            finished += 1
            if on_chunk is not None:
                on_chunk(finished, len(chunks))
            yield ScoredChunk(i, TokenScores(**part, block_size=block_size, scoring=label), ref)


def chunk_part(index: int, chunk: Chunk, result: ScoreResult) -> dict[str, np.ndarray]:
    """What a chunk's scores keep: its scored positions only (llama.cpp's first half is context).

    The [positions, k] arrays are kept as int32 ids and float32 logprobs: engines compute logprobs in
    float32 (or return them as such), so this loses nothing and holds a long text in a quarter of the
    memory; they are widened to float64 block by block where KL is computed."""
    keep = slice(chunk.first_scored, None)
    part: dict[str, np.ndarray] = {
        "chunk": np.full(chunk.n_scored, index, dtype=np.int32),
        "target": np.asarray(chunk.targets, dtype=np.int64),
        "logprob": result.logprobs[keep],
        "top_ids": result.top_ids[keep].astype(np.int32),
        "top_logprobs": result.top_logprobs[keep].astype(np.float32),
        "tail_mass": result.tail_mass[keep],
    }
    if result.gathered is not None:
        part["gathered"] = result.gathered[keep].astype(np.float32)
    if result.tail_ids is not None and result.tail_logprobs is not None:
        part["tail_ids"] = result.tail_ids[keep].astype(np.int32)
        part["tail_logprobs"] = result.tail_logprobs[keep].astype(np.float32)
    return part
