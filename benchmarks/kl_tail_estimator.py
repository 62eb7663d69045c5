"""The golden's sampled-tail KL estimate against the full-vocabulary KL, same model, text and chunks.

    python benchmarks/kl_tail_estimator.py [--chunks 16] [--samples 4 8 16 32] [--seeds 3]

For each stack (RTN 2/4/8-bit weights, FP8 KV cache) prints the exact mean KL over the whole
vocabulary, the top-k + tail-bucket lower bound, and the sampled-tail estimate with its 95% interval
for each tail sample count (and tail seed: a different draw of the sample), whether the exact value is
inside the interval, and the compressed bytes per token the sample adds to a golden.
"""

from __future__ import annotations

import argparse
import io
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np

from qualgate import build_stack, open_session
from qualgate.backends.rows import sample_tail
from qualgate.instruments.fidelity import FidelityConfig, TokenScores, chunk_text, compare, score_text

STACKS: dict[str, list[dict[str, Any]]] = {
    "rtn2": [{"kind": "weight_quant", "method": "rtn", "bits": 2, "group_size": 64}],
    "rtn4": [{"kind": "weight_quant", "method": "rtn", "bits": 4, "group_size": 64}],
    "rtn8": [{"kind": "weight_quant", "method": "rtn", "bits": 8, "group_size": 64}],
    "kv-fp8": [{"kind": "kv_quant", "method": "fp8"}],
}
TEXT = "evals/domain/cpython_docs_heldout.txt"


def full_logprobs(session: Any, chunks: list[Any], config: FidelityConfig) -> np.ndarray:
    """[N, vocab] logprobs of every scored position (ids in natural order)."""
    vocab = session.vocab_size
    ids = np.arange(vocab)
    rows = []
    for chunk in chunks:
        gather = np.broadcast_to(ids, (len(chunk.token_ids) - 1, vocab)).copy()
        schedule = None
        if config.serves(session):
            from qualgate.instruments.fidelity import serving_schedule

            schedule = serving_schedule(chunk)
        result = session.score(chunk.token_ids, top_k=1, gather=gather, schedule=schedule)
        assert result.gathered is not None
        rows.append(result.gathered[chunk.first_scored :])
    return np.concatenate(rows)


def reference_with_samples(base: TokenScores, logp: np.ndarray, samples: int, seed: int) -> TokenScores:
    ids, values = sample_tail(logp, base.top_ids, samples, seed)
    return replace(base, tail_ids=ids, tail_logprobs=values)


def candidate_for(reference: TokenScores, logq: np.ndarray, scores: TokenScores) -> TokenScores:
    gathered = np.take_along_axis(logq, reference.reference_ids, axis=1)
    return replace(scores, gathered=gathered)


def tail_bytes(reference: TokenScores) -> float:
    assert reference.tail_ids is not None and reference.tail_logprobs is not None
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, tail_ids=reference.tail_ids.astype(np.uint16), tail_logprobs=reference.tail_logprobs.astype(np.float32)
    )
    return buffer.getbuffer().nbytes / reference.n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=64)
    args = parser.parse_args()
    config = FidelityConfig(max_chunks=args.chunks, top_k=args.top_k, tail_samples=0)
    text = Path(TEXT).read_text(encoding="utf-8")
    with open_session(build_stack({"path": "bundled:target", "dtype": "float32"})) as base:
        chunks = chunk_text(base, text, config)
        reference = score_text(base, chunks, config)
        logp = full_logprobs(base, chunks, config)
    print(f"{reference.n} tokens in {len(chunks)} chunks, top-{args.top_k}, vocab {logp.shape[1]}")
    print("stack    full KL    bound (share)      samples seed  estimate [95%]                  covered  bytes/token")
    misses = 0
    for name, layers in STACKS.items():
        with open_session(build_stack({"path": "bundled:target", "dtype": "float32"}, layers)) as session:
            logq = full_logprobs(session, chunks, config)
            scores = score_text(session, chunks, config, reference=reference)
        p = np.exp(logp)
        full = float((p * (logp - logq)).sum(axis=1).mean())
        for samples in args.samples:
            for seed in range(args.seeds):
                ref = reference_with_samples(reference, logp, samples, seed)
                summary = compare(ref, candidate_for(ref, logq, scores)).summary
                kl, bound = summary["kl_mean"], summary["kl_bound"]["value"]
                covered = kl["low"] <= full <= kl["high"]
                misses += not covered
                print(
                    f"{name:8} {full:.6f}  {bound:.6f} ({bound / full:4.0%})  {samples:7d} {seed:4d}  "
                    f"{kl['value']:.6f} [{kl['low']:.6f}, {kl['high']:.6f}]  {'yes' if covered else 'NO':7}  "
                    f"{tail_bytes(ref):.1f}"
                )
    print(f"{misses} intervals missed the full-vocabulary KL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
