"""Throughput of qualgate's fidelity scoring against lm-eval's rolling perplexity, same model and text.

    python benchmarks/fidelity_vs_lmeval.py [--chars 60000] [--max-length 512]

Prints tokens/s of each and their ratio (both in rolling mode, batch size 1, float32, one process),
checks that both give the same total log-likelihood, and compares golden storage per scored token
with a full-vocabulary float16 store.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from qualgate import build_stack, golden_record, open_session
from qualgate.fixtures import bundled_model_path
from qualgate.instruments.fidelity import FidelityConfig, chunk_text, score_text

TEXT = Path(__file__).resolve().parent.parent / "evals" / "domain" / "cpython_docs_heldout.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=60000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(args.threads)
    text = TEXT.read_text(encoding="utf-8")[: args.chars]
    session = open_session(build_stack({"path": "bundled:target"}))
    config = FidelityConfig(mode="rolling", n_ctx=args.max_length, top_k=64)
    chunks = chunk_text(session, text, config)
    score_text(session, chunks[:1], config)  # warm-up outside the timing, as for lm-eval below
    start = time.perf_counter()
    ours = score_text(session, chunks, config)
    ours_s = time.perf_counter() - start

    lm = HFLM(
        pretrained=str(bundled_model_path("target")),
        add_bos_token=False,
        max_length=args.max_length,
        batch_size=1,
        device="cpu",
        dtype="float32",
    )
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text[:2000],), idx=0)
    lm.loglikelihood_rolling([request], disable_tqdm=True)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    start = time.perf_counter()
    [theirs] = lm.loglikelihood_rolling([request], disable_tqdm=True)
    theirs_s = time.perf_counter() - start

    n = ours.n
    print(f"tokens scored: {n} in {len(chunks)} windows of {args.max_length}")
    print(
        f"total loglikelihood: qualgate {ours.logprob.sum():.6f}  lm-eval {theirs:.6f}  "
        f"rel diff {abs(ours.logprob.sum() - theirs) / abs(theirs):.2e}"
    )
    print(f"qualgate fidelity (top-64 + tail kept): {n / ours_s:,.0f} tokens/s")
    print(f"lm-eval loglikelihood_rolling:          {n / theirs_s:,.0f} tokens/s")
    print(f"ratio qualgate / lm-eval: {theirs_s / ours_s:.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        manifest = golden_record.record(session, text, FidelityConfig(top_k=64), Path(tmp))
    full_fp16 = 2 * session.vocab_size
    print(
        f"golden store: {manifest.bytes_per_token:.0f} bytes per scored token (top-64 + tail, compressed); "
        f"full-vocabulary float16: {full_fp16} bytes -> {full_fp16 / manifest.bytes_per_token:.1f}x smaller "
        f"(for a 128k vocabulary: {2 * 128256 / manifest.bytes_per_token:.0f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
