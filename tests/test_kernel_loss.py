"""Algorithm vs kernel loss: an engine stack measured as deployed (llama.cpp) and simulated in process
(the same GGUF file dequantized into the HF model), paired on the same tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from qualgate import build_layer, build_stack, open_session
from qualgate import golden as golden_store
from qualgate.cli import main
from qualgate.instruments.fidelity import compare, score_text
from qualgate.instruments.kernel_loss import paired_split, simulated_stack

REPO = Path(__file__).resolve().parent.parent


def test_the_paired_split_is_the_per_token_difference() -> None:
    rng = np.random.default_rng(0)
    chunk = np.repeat(np.arange(8), 50)
    simulated = {
        "chunk": chunk,
        "target": np.arange(400),
        "kl": rng.exponential(0.01, 400),
        "same_top1": rng.random(400) < 0.95,
        "nll_candidate": rng.exponential(2.0, 400),
    }
    deployed = {**simulated, "kl": simulated["kl"] + 0.002, "nll_candidate": simulated["nll_candidate"] + 0.01}
    split = paired_split(deployed, simulated)
    assert split["kl_mean"]["value"] == pytest.approx(0.002) and split["kl_mean"]["low"] == pytest.approx(0.002)
    assert split["same_top1"]["value"] == 0.0
    assert split["ppl_ratio"]["value"] == pytest.approx(np.exp(0.01))


def test_engine_layers_map_to_their_in_process_simulation() -> None:
    model = build_stack({"path": "bundled:target"}).model
    q4 = build_layer({"kind": "weight_quant", "method": "gguf", "type": "Q4_K_M"})
    twin = simulated_stack(build_stack(model, [q4]))
    assert not isinstance(twin, str) and [layer.name for layer in twin.layers] == ["gguf-q4_k_m-sim"]
    fp8 = build_layer({"kind": "kv_quant", "method": "fp8"})
    assert fp8.simulation() is fp8, "a layer qualgate applies itself is its own simulation"
    ggml = build_layer({"kind": "kv_quant", "method": "ggml"})
    reason = simulated_stack(build_stack(model, [q4, ggml]))
    assert isinstance(reason, str) and "kv-q8_0" in reason and "no in-process simulation" in reason


def test_kernel_loss_needs_an_engine_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = yaml.safe_load((REPO / "pipelines" / "demo-kernel-loss.yaml").read_text())
    pipeline["backend"] = {"name": "hf"}
    pipeline["layers"] = {"w4": {"kind": "weight_quant", "method": "rtn", "bits": 4}}
    pipeline["stacks"] = [{"layers": ["w4"]}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    assert main(["validate", str(path)]) == 2
    assert "set backend.name to an engine" in capsys.readouterr().err


def test_the_simulated_gguf_is_llamacpps_file_dequantized(domain_text: str) -> None:
    """The in-process Q4_K_M reads back exactly what llama.cpp's quantizer wrote: its weights differ from
    the float32 baseline by K-quant error (not zero, not more), and its KL is the algorithm's."""
    manifest = golden_store.read_manifest(REPO / "golden" / "bundled-target")
    config = manifest.fidelity_config()
    base = build_stack({"path": "bundled:target"})
    chunks, reference = golden_store.load(REPO / "golden" / "bundled-target", base.model, domain_text, config)
    sim = build_stack(
        {"path": "bundled:target"}, [{"kind": "weight_quant", "method": "gguf_dequant", "type": "Q4_K_M"}]
    )
    with open_session(sim) as session, open_session(base) as baseline:
        q = dict(session.model.named_parameters())["model.layers.1.self_attn.q_proj.weight"]  # type: ignore[attr-defined]
        w = dict(baseline.model.named_parameters())["model.layers.1.self_attn.q_proj.weight"]  # type: ignore[attr-defined]
        w, q = w.detach(), q.detach()
        sqnr = 10 * np.log10(float((w**2).sum()) / float(((w - q) ** 2).sum()))
        assert 15 < sqnr < 30, f"Q4_K rounding error expected, got SQNR {sqnr:.1f} dB"
        kl = compare(reference, score_text(session, chunks, config, reference=reference)).summary["kl_mean"]
    assert 1e-3 < kl["value"] < 1e-2


@pytest.mark.slow
def test_llamacpp_splits_into_algorithm_and_kernel_loss(tmp_path: Path) -> None:
    """On llama.cpp: the f32 GGUF has ~0 loss on both sides; Q4_K_M's algorithm loss is the simulated
    one and llama.cpp adds a small, positive kernel loss (activations rounded to 8 bits)."""
    pipeline: dict[str, Any] = yaml.safe_load((REPO / "pipelines" / "demo-kernel-loss.yaml").read_text())
    pipeline["stacks"] = [{"layers": []}, {"layers": ["q4"]}]
    pipeline["instruments"]["fidelity"]["golden"] = str(REPO / "golden" / "bundled-target")
    pipeline["backend"]["options"]["cache_dir"] = str(tmp_path / "gguf")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-tracking"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    sections = {s["name"]: s["instruments"]["kernel_loss"] for s in report["stacks"]}
    base, q4 = sections["base"], sections["gguf-q4_k_m"]
    assert base["simulated"]["kl_mean"]["value"] < 1e-6 and base["deployed"]["kl_mean"]["value"] < 1e-5
    assert 3e-3 < q4["simulated"]["kl_mean"]["value"] < 5e-3
    assert q4["kernel"]["kl_mean"]["low"] > 0, "llama.cpp's kernels add measurable KL to Q4_K_M"
    assert q4["kernel"]["kl_mean"]["value"] < 0.1 * q4["deployed"]["kl_mean"]["value"]
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "### Algorithm vs kernel loss" in summary and "| gguf-q4_k_m |" in summary
    assert "![algorithm vs kernel loss](plots/kernel_loss.png)" in summary
    assert (tmp_path / "run" / "plots" / "kernel_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_vllm_on_a_cpu_is_simulated_with_the_fp8_format_it_really_stores() -> None:
    """vLLM's CPU platform turns fp8_e4m3 into fp8_e5m2 without saying so; kernel_loss found it (the e4m3
    simulation lost 4.6x less than vLLM). Its simulation of an e4m3 cache on a CPU is e5m2."""
    from qualgate.backends.http.vllm import VLLMBackend

    fp8 = build_layer({"kind": "kv_quant", "method": "fp8"})
    on_cpu = build_stack({"path": "bundled:target", "device": "cpu"}, [fp8])
    twin = simulated_stack(on_cpu, VLLMBackend)
    assert not isinstance(twin, str) and twin.name == "kv-fp8-e5m2 (simulated)"
    e5m2 = build_layer({"kind": "kv_quant", "method": "fp8", "format": "e5m2"})
    assert VLLMBackend.simulation(e5m2, on_cpu) is e5m2
