"""Planted defects (tests/plugin_layers.py): each real bug class must be caught by the default checks.

A lossy speculation that claims to be lossless, prefix caches with a wrong key or an off-by-one
boundary, an FP8 KV cache broken only on single-token writes, and a weight quantizer with a wrong
scale. Each runs through the same code a pipeline uses, with the shipped defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO
from helpers import run_pipeline as _run

from qualgate import build_stack, open_session
from qualgate.instruments.equivalence import (
    EquivalenceConfig,
    EquivalenceResult,
    load_prompts,
    prefix_probes,
    reference_stack,
    run_equivalence,
    speculation_probes,
)
from qualgate.instruments.fidelity import FidelityConfig, chunk_text, compare, score_text

DOMAIN = REPO / "evals" / "domain" / "cpython_docs_heldout.txt"
PROMPTS = REPO / "evals" / "prompts"


def _equivalence(layer: dict[str, Any]) -> EquivalenceResult:
    stack = build_stack({"path": "bundled:target"}, [layer])
    with open_session(stack) as candidate, open_session(reference_stack(stack)) as reference:
        text_ids = reference.encode(DOMAIN.read_text(encoding="utf-8"), add_bos=False)
        prompts = load_prompts(PROMPTS / "general.jsonl")[:4]
        if layer["kind"] == "prefix_cache":
            prompts += prefix_probes(text_ids, reference.bos_token_id, 16)
        else:
            prompts += speculation_probes(text_ids, reference.bos_token_id)
        return run_equivalence(candidate, reference, prompts, EquivalenceConfig(max_new_tokens=16))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["plugin_layers:PartialKeyPrefixCache", "plugin_layers:OffByOnePrefixCache"])
def test_broken_prefix_cache_keys_are_caught_by_the_probes(method: str) -> None:
    result = _equivalence({"kind": "prefix_cache", "method": method, "block_size": 16})
    assert not result.passed
    caught = result.real_divergences > 0 or any("shared-prefix logprobs differ" in p for p in result.problems)
    assert caught, result.summary()
    assert result.coverage["crossed_differing_block"] >= 12
    # The hand-written prompt files alone would not have caught the partial key: no probe group, no failure.
    assert all(d.group.startswith("prefix:") for d in result.divergences), [d.group for d in result.divergences]


@pytest.mark.slow
def test_a_lossy_acceptance_rule_claiming_lossless_is_caught() -> None:
    result = _equivalence({"kind": "speculation", "method": "plugin_layers:TopTwoDraft"})
    assert not result.passed and result.real_divergences >= 1, result.summary()
    assert set(result.groups) >= {"general", "speculation:high", "speculation:ordinary", "speculation:low"}


def _fidelity_kl(layer: dict[str, Any], config: FidelityConfig, base_session: Any, chunks: list[Any]) -> float:
    reference = score_text(base_session, chunks, FidelityConfig(max_chunks=2))
    with open_session(build_stack({"path": "bundled:target"}, [layer])) as session:
        scores = score_text(session, chunks, config, reference=reference)
    return float(compare(reference, scores).summary["kl_mean"]["value"])


@pytest.mark.slow
def test_a_kv_cache_broken_only_when_decoding_is_caught_in_the_serving_pattern(
    base_session: Any, domain_text: str
) -> None:
    chunks = chunk_text(base_session, domain_text, FidelityConfig(max_chunks=2))
    broken = {"kind": "kv_quant", "method": "plugin_layers:DecodeSaturatingFp8"}
    correct = {"kind": "kv_quant", "method": "fp8"}
    serve = FidelityConfig(max_chunks=2)
    blocks = FidelityConfig(max_chunks=2, kv_scoring="blocks")
    assert _fidelity_kl(broken, blocks, base_session, chunks) == pytest.approx(
        _fidelity_kl(correct, blocks, base_session, chunks), rel=1e-6
    ), "blocks of 32 never write a single token: the bug is invisible there"
    served = _fidelity_kl(broken, serve, base_session, chunks)
    assert served > 0.05, served
    assert _fidelity_kl(correct, serve, base_session, chunks) < 0.005


@pytest.mark.slow
def test_the_default_pipeline_catches_every_planted_defect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's instruments and gate, one stack per planted defect: every one fails, for its reason."""
    monkeypatch.chdir(REPO)
    demo = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    demo["layers"] = {
        "wrong_scale": {"kind": "weight_quant", "method": "plugin_layers:WrongScaleRTN", "bits": 4, "group_size": 64},
        "kv_decode": {"kind": "kv_quant", "method": "plugin_layers:DecodeSaturatingFp8"},
        "top2": {"kind": "speculation", "method": "plugin_layers:TopTwoDraft"},
        "bad_key": {"kind": "prefix_cache", "method": "plugin_layers:PartialKeyPrefixCache", "block_size": 16},
    }
    demo["stacks"] = [{"layers": [name]} for name in demo["layers"]]
    demo.pop("controls")  # its 2-bit layer is replaced; every stack here is a planted defect
    demo["instruments"].pop("benchmarks")
    demo["instruments"].pop("judge")  # judged in tests/test_judge_model.py; here the planted layers' instruments
    demo["instruments"]["equivalence"]["prompts"] = ["evals/prompts/general.jsonl"]
    demo["tracking"] = {"enabled": False}
    path = tmp_path / "planted.yaml"
    path.write_text(yaml.safe_dump(demo))
    assert _run(path, tmp_path / "run") == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    verdicts = {s["name"]: s["verdict"] for s in report["stacks"] if s["layers"]}
    assert set(verdicts.values()) == {"fail"} and len(verdicts) == 4, verdicts
    reasons = {s["layers"][0]["name"]: " ".join(s["reasons"]) for s in report["stacks"] if s["layers"]}
    assert "kl_mean" in reasons["wrong_scale"]
    assert "kl_mean" in reasons["kv_decode"]
    assert "real_divergences" in reasons["top2"]
    assert "real_divergences" in reasons["bad_key"] or "shared-prefix logprobs differ" in reasons["bad_key"]
    # The new figures reach every output: summary.md's sections and the MLflow child runs' metrics.
    markdown = (tmp_path / "run" / "summary.md").read_text()
    assert "### Lossless layers (greedy equivalence)" in markdown and "### Decode path" in markdown
    from qualgate.tracking.layout import build_layout

    layout = build_layout(report, "uid")
    metrics = {s.stack["name"]: {key for key, _, _ in s.spec.metrics} for s in layout.stacks}
    kv_stack = next(s["name"] for s in report["stacks"] if s["layers"] and s["layers"][0]["name"] == "kv_decode")
    assert {
        "decode_path/kl_mean",
        "decode_path/kl_mean_high",
        "decode_path/shape_kl",
        "decode_path/shape_kl_high",
    } <= metrics[kv_stack]
    spec_stack = next(s["name"] for s in report["stacks"] if s["layers"] and s["layers"][0]["name"] == "top2")
    assert {"equivalence/tolerance", "equivalence/noise_floor/p99.9", "equivalence/drift/max"} <= metrics[spec_stack]
    key_stack = next(s["name"] for s in report["stacks"] if s["layers"] and s["layers"][0]["name"] == "bad_key")
    assert "equivalence/prefix_coverage" in metrics[key_stack]
    spec_eq = next(s for s in report["stacks"] if s["name"] == spec_stack)["instruments"]["equivalence"]
    assert spec_eq["tolerance"]["source"] == "calibrated" and set(spec_eq["prefix_logprob_drift"]) >= {
        "p50",
        "p99",
        "max",
    }
