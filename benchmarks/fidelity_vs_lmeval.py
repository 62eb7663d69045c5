"""Throughput of qualgate's fidelity scoring against lm-eval's rolling perplexity, same model and text.

    python benchmarks/fidelity_vs_lmeval.py [--chars 60000] [--max-length 512]

Both sides in rolling mode, float32, one process, each at every batch size in --batch-sizes; the best
of each is compared. qualgate is measured on both sides of a comparison: recording a golden (top-64
plus 16 tail draws per token kept) and scoring a candidate against it (the golden's 80 ids gathered
per token). The model's bare forward pass (logits only, nothing kept) is printed too: no scorer on
the same model can be faster, so it bounds the ratio. Checks that both give the same total
log-likelihood, and compares golden storage per scored token with a full-vocabulary float16 store.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from qualgate import build_stack, golden_record
from qualgate.backends.hf import HFSession
from qualgate.fixtures import bundled_model_path
from qualgate.instruments.fidelity import FidelityConfig, chunk_text, score_text

TEXT = Path(__file__).resolve().parent.parent / "evals" / "domain" / "cpython_docs_heldout.txt"


def best_of(runs: int, work: Callable[[], object]) -> float:
    """The fastest of `runs` timings (after one warm-up): the least disturbed by the machine."""
    work()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=60000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,2,4,auto", help="comma-separated; auto is each tool's own")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per setting (the fastest counts)")
    args = parser.parse_args()

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(args.threads)
    sizes: list[int | str] = [s if s == "auto" else int(s) for s in args.batch_sizes.split(",")]
    text = TEXT.read_text(encoding="utf-8")[: args.chars]
    stack = build_stack({"path": "bundled:target"})
    config = FidelityConfig(mode="rolling", n_ctx=args.max_length, top_k=64)
    rows: list[tuple[str, str, float]] = []
    ours_total = 0.0
    n = 0
    for size in sizes:
        session = HFSession(stack, size if size == "auto" else int(size))  # type: ignore[arg-type]
        chunks = chunk_text(session, text, config)
        golden = score_text(session, chunks, config)
        n, ours_total = golden.n, float(golden.logprob.sum())
        record = partial(score_text, session, chunks, config)
        rows.append(("qualgate golden (top-64 + tail)", str(size), best_of(args.runs, record)))
        compare = partial(score_text, session, chunks, config, reference=golden)
        rows.append(("qualgate candidate (80 ids gathered)", str(size), best_of(args.runs, compare)))
    windows = [c.token_ids[:-1] for c in chunks]
    model = session.model

    def forward(batch: int) -> None:
        with torch.no_grad():
            for i in range(0, len(windows), batch):
                part = windows[i : i + batch]
                width = max(len(w) for w in part)
                model(input_ids=torch.tensor([w + [0] * (width - len(w)) for w in part]))

    for size in [s for s in sizes if s != "auto"]:
        rows.append(("model forward pass only (the bound)", str(size), best_of(args.runs, partial(forward, int(size)))))

    totals: list[float] = []
    for size in sizes:
        lm = HFLM(
            pretrained=str(bundled_model_path("target")),
            add_bos_token=False,
            max_length=args.max_length,
            batch_size=size,
            device="cpu",
            dtype="float32",
        )
        request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
        rolling = partial(lm.loglikelihood_rolling, [request], disable_tqdm=True)
        rows.append(("lm-eval loglikelihood_rolling", str(size), best_of(args.runs, rolling)))
        totals = rolling()
    theirs_total = totals[0]

    print(f"tokens scored: {n} in {len(chunks)} windows of {args.max_length}, {args.threads} threads")
    print(
        f"total loglikelihood: qualgate {ours_total:.6f}  lm-eval {theirs_total:.6f}  "
        f"rel diff {abs(ours_total - theirs_total) / abs(theirs_total):.2e}"
    )
    print(f"{'scorer':40s} {'batch':>6s} {'tokens/s':>10s}")
    for name, size, seconds in rows:
        print(f"{name:40s} {size:>6s} {n / seconds:>10,.0f}")
    best = {name: min(s for nm, _, s in rows if nm == name) for name, _, _ in rows}
    lmeval = best["lm-eval loglikelihood_rolling"]
    for name, seconds in best.items():
        print(f"best {name}: {n / seconds:,.0f} tokens/s = {lmeval / seconds:.2f}x lm-eval's best")

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
