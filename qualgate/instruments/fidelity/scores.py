"""Scoring a text through a session: chunking it as llama.cpp's perplexity tool does (or in rolling
windows), feeding each chunk as an engine would serve it, and keeping per-token arrays (TokenScores)
with the reference's top-k and sampled tail ids."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qualgate.chunking import Chunk, ChunkingMode, llamacpp_chunks, rolling_chunks
from qualgate.errors import ConfigError

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

    Chunks scored in one forward pass go to the session in groups it may batch; chunks fed through
    the KV cache (blocks, or the serving schedule) one at a time. With a checkpoint, each chunk's
    arrays are saved as soon as they exist and reused on a rerun, so an interrupted run loses at most
    the batch in flight."""
    from qualgate.backends.base import ScoreRequest

    block_size = config.block_size_for(session)
    serve = config.serves(session)
    one_pass = block_size is None and not serve
    # Only the reference side draws a tail sample and needs its own top-k; a candidate is asked for
    # the reference's ids (gather) and its top-1. An engine that returns only its own top-k needs the
    # full top_k for gather to find the reference's ids in it.
    full_vocab = session.capabilities.max_top_k is None
    top_k = config.top_k if reference is None or not full_vocab else 1
    tail_samples = config.tail_samples if reference is None else 0
    offsets = np.concatenate([[0], np.cumsum([c.n_scored for c in chunks])]).astype(int)
    parts: dict[int, dict[str, np.ndarray]] = {}

    def done(index: int, part: dict[str, np.ndarray], fresh: bool) -> None:
        if fresh and checkpoint is not None:
            checkpoint.save(index, part)
        parts[index] = part
        if on_chunk is not None:
            on_chunk(len(parts), len(chunks))

    asked = reference.reference_ids if reference is not None else None  # built once, not once per chunk

    def gather_for(index: int) -> np.ndarray | None:
        if asked is None:
            return None
        chunk = chunks[index]
        rows = asked[offsets[index] : offsets[index + 1]]
        gather = np.zeros((len(chunk.token_ids) - 1, rows.shape[1]), dtype=np.int64)
        gather[chunk.first_scored :] = rows
        return gather

    if reference is not None and offsets[-1] != reference.n:
        raise ConfigError(
            f"the candidate scored {offsets[-1]} tokens but the reference has {reference.n}; "
            "they must use the same text and chunking"
        )
    # Groups are fixed ranges of chunk indices, and a group is reused only whole: a resumed run puts
    # every chunk in the batch a fresh run would (batch shapes change GEMM kernels, and so the last
    # bits), so an interrupted run ends with the numbers of an uninterrupted one.
    width = max((len(c.token_ids) - 1 for c in chunks), default=1)
    group = session.scoring_group(width) if one_pass else 1
    for start in range(0, len(chunks), group):
        indices = list(range(start, min(start + group, len(chunks))))
        saved = [checkpoint.load(i) if checkpoint is not None else None for i in indices]
        if all(part is not None for part in saved):
            for index, part in zip(indices, saved, strict=True):
                assert part is not None
                done(index, part, fresh=False)
            continue
        if one_pass:
            requests = [ScoreRequest(chunks[i].token_ids, top_k, gather_for(i), tail_samples) for i in indices]
            results = session.score_batch(requests)
        else:
            [i] = indices
            schedule = serving_schedule(chunks[i]) if serve else None
            results = [
                session.score(
                    chunks[i].token_ids,
                    top_k=top_k,
                    block_size=block_size,
                    gather=gather_for(i),
                    schedule=schedule,
                    tail_samples=tail_samples,
                )
            ]
        for index, result in zip(indices, results, strict=True):
            done(index, chunk_part(index, chunks[index], result), fresh=True)
    merged = {key: np.concatenate([parts[i][key] for i in range(len(chunks))]) for key in parts[0]}
    label = scoring_label(block_size, serve, chunks[0].first_scored if chunks else None)
    return TokenScores(**merged, block_size=block_size, scoring=label)


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
