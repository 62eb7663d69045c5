"""Small numeric helpers for tests (the real metrics live in qualgate's fidelity instrument)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qualgate import ScoreResult
from qualgate.cli import main

REPO = Path(__file__).resolve().parent.parent


def pipeline_file(
    tmp_path: Path, layers: dict[str, Any], stacks: Any = "auto", serving: bool = False, **extra: Any
) -> Path:
    """A small pipeline on the bundled model: fidelity against the bundled golden, short equivalence.

    serving=False (most tests: they check run mechanics, not the serving checks, which have their own
    tests and cost a forward pass per token) feeds KV stacks in blocks of 32 and leaves out the decode
    path and the speculation probes; serving=True keeps the shipped defaults. A stack with a prefix cache
    keeps its probes: it fails without them (coverage)."""
    fidelity: dict[str, Any] = {"golden": "golden/bundled-target"}
    equivalence: dict[str, Any] = {"prompts": ["evals/prompts/general.jsonl"], "max_new_tokens": 12}
    if not serving:
        fidelity["kv_scoring"] = "blocks"
        equivalence["decode_path"] = False
        equivalence["probes"] = any(layer.get("kind") == "prefix_cache" for layer in layers.values())
    data = {
        "version": 1,
        "name": "t",
        "model": {"path": "bundled:target"},
        "layers": layers,
        "stacks": stacks,
        "instruments": {"fidelity": fidelity, "equivalence": equivalence},
        **extra,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def engine_threads() -> int:
    """Threads for an engine a test starts (llama.cpp): the worker's share of the cores (conftest sets
    OMP_NUM_THREADS under pytest-xdist). ggml's threads spin while they wait, so two of them on a core
    another worker is using run several times slower, not just half as fast."""
    return int(os.environ.get("OMP_NUM_THREADS", "2"))


def run_pipeline(path: Path, out: Path, *args: str) -> int:
    return main(["run", str(path), "--out", str(out), *args])


def full_logprobs(result: ScoreResult, vocab_size: int) -> np.ndarray:
    """[N, V] logprobs from a result scored with top_k = vocabulary size."""
    assert result.top_k == vocab_size, "score with top_k=vocab_size to get the full distribution"
    out = np.empty((result.top_ids.shape[0], vocab_size))
    np.put_along_axis(out, result.top_ids, result.top_logprobs, axis=1)
    return out


def mean_kl(reference: ScoreResult, candidate: ScoreResult, vocab_size: int) -> float:
    p = full_logprobs(reference, vocab_size)
    q = full_logprobs(candidate, vocab_size)
    return float((np.exp(p) * (p - q)).sum(axis=1).mean())


def same_top1(reference: ScoreResult, candidate: ScoreResult) -> float:
    return float((reference.top_ids[:, 0] == candidate.top_ids[:, 0]).mean())
