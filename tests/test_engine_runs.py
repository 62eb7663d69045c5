"""The demo ladder on real engines, managed by qualgate: llama.cpp in process (llama-cpp-python) and
vLLM's CPU build over HTTP in its own environment; and endpoints the probe must refuse (exit 3).

Engine baselines against the HF golden (documented in docs/engines.md, measured on the bundled model):
llama.cpp f32 KL ~5e-8, vLLM float32 KL ~2.5e-9, same top-1 >= 0.999, PPL ratio 1 within 1e-3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from broken_proxy import BrokenProxy
from helpers import REPO, engine_threads, pipeline_file, run_pipeline
from llama_server import LlamaServer

from qualgate.engines.gguf_quant import baseline_gguf
from qualgate.engines.servers import POOL
from qualgate.models import ModelSpec

pytestmark = pytest.mark.slow
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
BASELINE_KL = 1e-6  # engine float32 baseline vs the HF golden: numerics only
BASELINE_PPL = 1e-3  # |PPL ratio - 1|


def stacks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s["instruments"] for s in report["stacks"]}


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["verdict"] for s in report["stacks"]}


def exit_code_of(report: dict[str, Any]) -> int:
    """What `qualgate run` exits with for a finished run: 1 when the gate failed, else 0 (pass or warn)."""
    return 1 if report["verdict"] == "fail" else 0


def assert_engine_baseline(instruments: dict[str, Any]) -> None:
    fidelity = instruments["fidelity"]
    assert fidelity["kl_mean"]["value"] < BASELINE_KL
    assert abs(fidelity["ppl_ratio"]["value"] - 1) < BASELINE_PPL
    assert fidelity["same_top1"]["value"] >= 0.998


def assert_lossless(instruments: dict[str, Any], layer: str, counter: str) -> None:
    equivalence = instruments["equivalence"]
    assert equivalence["real_divergences"] == 0, equivalence["divergences"]
    assert equivalence["layer_stats"][layer][counter] > 0, f"the engine's {layer} was not exercised"


def assert_mlflow_layout(run_dir: Path, report: dict[str, Any]) -> None:
    """The same MLflow tree as an HF run: one parent, one nested child per stack with its numbers."""
    from mlflow.tracking import MlflowClient

    from qualgate.tracking.state import TrackingState

    state = TrackingState.load(run_dir)
    assert state.status == "logged", state
    client = MlflowClient(state.uri)
    parent = client.get_run(state.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    assert sorted(by_name) == sorted(s["name"] for s in report["stacks"])
    for stack in report["stacks"]:
        logged = by_name[stack["name"]].data.metrics["fidelity/kl_mean"]
        assert logged == pytest.approx(stack["instruments"]["fidelity"]["kl_mean"]["value"])


def on_engine_data(path: Path, golden: Path) -> None:
    """The engine runs' data: the small golden, and the shared-prefix prompts beside the general ones
    (the prefix cache's hits)."""
    data = yaml.safe_load(path.read_text())
    data["instruments"]["fidelity"]["golden"] = str(golden)
    data["instruments"]["equivalence"]["prompts"].append("evals/prompts/shared_prefix.jsonl")
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def llama_cpp_installed() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI installs llama-cpp-python (make install)")
        pytest.skip("llama-cpp-python is not installed (pip install 'qualgate[llamacpp]')")


def test_demo_ladder_on_llama_cpp(tmp_path: Path, llama_cpp_installed: None, small_golden: Path) -> None:
    path = pipeline_file(
        tmp_path,
        {
            "q4": {"kind": "weight_quant", "method": "gguf", "type": "Q4_K_M"},
            "kv": {"kind": "kv_quant", "method": "ggml", "type_k": "q8_0", "type_v": "q8_0"},
            "spec": {"kind": "speculation", "method": "ngram", "num_speculative_tokens": 4},
            "draft": {"kind": "speculation", "method": "draft_model", "num_speculative_tokens": 4},
            "prefix": {"kind": "prefix_cache", "method": "block"},
        },
        stacks=[{"layers": ["q4", "kv"]}, {"layers": ["spec"]}, {"layers": ["draft"]}, {"layers": ["prefix"]}],
        backend={"name": "llamacpp", "options": {"n_threads": engine_threads()}},
    )
    on_engine_data(path, small_golden)
    code = run_pipeline(path, tmp_path / "run")  # logged to the tests' MLflow store
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    found = stacks(report)
    # Q4_K_M + q8_0 KV keeps ~95% of top-1 tokens (docs/engines.md, engine table: 94.9% on 16 chunks, 95.4%
    # on these 6): at warn 0.95 the stack warns, measured or for lack of samples; it is far from fail 0.90.
    # The f32 lossless singles pass (llama.cpp's batched-verify drift stays inside the calibrated tolerance).
    assert verdicts(report)["gguf-q4_k_m+kv-q8_0"] == "warn"
    assert code == 0 and report["verdict"] == "warn", report["reasons"]
    assert [r.split(":")[0] for r in report["reasons"]] == ["gguf-q4_k_m+kv-q8_0"], report["reasons"]
    assert found["gguf-q4_k_m+kv-q8_0"]["fidelity"]["same_top1"]["low"] > 0.9
    assert {name: v for name, v in verdicts(report).items() if name != "gguf-q4_k_m+kv-q8_0"} == dict.fromkeys(
        ("base", "spec-ngram4", "spec-draft4", "prefix-cache"), "pass"
    )
    assert_engine_baseline(found["base"])
    assert_mlflow_layout(tmp_path / "run", report)
    quantized = found["gguf-q4_k_m+kv-q8_0"]["fidelity"]
    assert quantized["kl_mean"]["value"] > 1000 * found["base"]["fidelity"]["kl_mean"]["value"]
    assert quantized["merged_mass"] == 0.0, "in process: full logits, nothing merged"
    assert_lossless(found["spec-ngram4"], "speculation", "accepted_tokens")
    assert_lossless(found["spec-draft4"], "speculation", "accepted_tokens")  # the bundled draft, as GGUF
    assert_lossless(found["prefix-cache"], "prefix_cache", "hits")


@pytest.fixture(scope="module")
def vllm_env() -> Path:
    if not VLLM_PYTHON.is_file():
        if os.environ.get("CI"):
            pytest.fail("CI builds the vLLM environment (scripts/vllm-env)")
        pytest.skip("no vLLM environment: run scripts/vllm-env")
    return VLLM_PYTHON


def cpu_keeps_fp8_kv() -> bool:
    """vLLM's CPU attention stores an FP8 KV cache only on x86 with AVX-512 or AMX (cpu_attn.py)."""
    import torch

    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


def test_demo_ladder_on_managed_vllm(
    tmp_path: Path, vllm_env: Path, small_golden: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """n-gram speculation with prefix caching (both lossless, one server: every vLLM server start costs
    ~40 s on 2 cores), then the FP8 KV stack where this CPU can run vLLM's FP8 KV cache (AVX-512 or AMX;
    its start-up failure on AVX2 is a recorded log in test_engines.py, ~60 s of server start to replay
    here). A rerun of the finished run reuses every stack and probe: no server starts."""
    layers = {
        "kv": {"kind": "kv_quant", "method": "fp8"},
        "spec": {"kind": "speculation", "method": "ngram", "num_speculative_tokens": 4},
        "prefix": {"kind": "prefix_cache", "method": "block", "block_size": 32},
    }
    backend = {"name": "vllm", "options": {"python": str(vllm_env), "max_model_len": 1024, "block_size": 32}}
    fp8 = cpu_keeps_fp8_kv()
    path = pipeline_file(
        tmp_path, layers, stacks=[{"layers": x} for x in [["spec", "prefix"]] + [["kv"]] * fp8], backend=backend
    )
    on_engine_data(path, small_golden)

    run = tmp_path / "run"
    code = run_pipeline(path, run, "--no-tracking")
    assert "starting vllm server" in capsys.readouterr().err
    report = json.loads((run / "report.json").read_text())
    (run / "report.json").unlink()
    assert run_pipeline(path, run, "--no-tracking") == code
    assert "starting vllm server" not in capsys.readouterr().err, "finished stacks are reused, not rerun"
    assert json.loads((run / "report.json").read_text()) == report
    # Measured on AVX2 (no FP8 KV): PASS exit 0, the lossless stack token-identical. With an FP8 KV stack
    # (AVX-512) its same-top-1 sits at the warn tier 0.95 (0.949 on 16 chunks in docs/engines.md, 0.961
    # [0.951, 0.971] on these 6: pass): the exit code follows the verdict.
    lossless = {name: v for name, v in verdicts(report).items() if name != "kv-fp8-e4m3"}
    both = "spec-ngram4+prefix-cache-block_size32"
    assert lossless == dict.fromkeys(("base", both), "pass"), report["reasons"]
    assert code == exit_code_of(report) and (fp8 or (code == 0 and report["verdict"] == "pass")), report["verdict"]
    found = stacks(report)
    assert found["base"]["fidelity"]["n_chunks"] == 6
    assert_engine_baseline(found["base"])
    assert_lossless(found[both], "speculation", "accepted_tokens")
    assert_lossless(found[both], "prefix_cache", "hits")  # block_size 32 is not the default
    logs = list((run / "engine-logs").glob("vllm-*.log"))
    assert len(logs) == 2 + fp8 and not POOL.servers, "one server per stack, all stopped with the run"
    probes = report["provenance"]["engine_probes"]  # kept across the rerun with the stacks' records
    assert sorted(probes) == sorted(found) and all(p["mode"] == "token_ids" for p in probes.values())
    assert all(p["top_k"] == 64 for p in probes.values()) and probes["base"]["canary_mean_abs_diff"] < 1e-3
    if fp8:
        kv = found["kv-fp8-e4m3"]["fidelity"]
        # Which side of 0.95 the lower bound falls on depends on the chunks; that the gate reads it is fixed.
        assert verdicts(report)["kv-fp8-e4m3"] == ("pass" if kv["same_top1"]["low"] >= 0.95 else "warn")
        assert 0.9 < kv["same_top1"]["value"] < 0.99, "FP8 KV moves some top-1 tokens, far from 4-bit's damage"
        assert kv["kl_mean"]["value"] > 1000 * found["base"]["fidelity"]["kl_mean"]["value"]
        assert kv["merged_mass"] < 0.01, "vLLM returned (nearly) all of the reference's top-64"
        assert probes["kv-fp8-e4m3"]["canary_mean_abs_diff"] > 1e-3


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory, llama_cpp_installed: None) -> Any:
    gguf = baseline_gguf(ModelSpec(path="bundled:target"), REPO / "runs" / "gguf")
    server = LlamaServer(gguf, tmp_path_factory.mktemp("llama") / "server.log").start()
    yield server
    server.stop()


def endpoint_pipeline(tmp_path: Path, url: str, model: str = "bundled:target", **instruments: Any) -> Path:
    """One endpoint for every stack; the ngram stack makes equivalence open a session when fidelity is off."""
    path = pipeline_file(
        tmp_path,
        {"spec": {"kind": "speculation", "method": "ngram"}},
        stacks=[{"layers": ["spec"]}],
        backend={"name": "openai", "options": {"base_url": url, "model": "judge"}},
    )
    data = yaml.safe_load(path.read_text())
    data["model"]["path"] = model
    if instruments.get("no_fidelity"):
        del data["instruments"]["fidelity"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_endpoint_with_generated_only_logprobs_is_refused(
    tmp_path: Path, llama_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with BrokenProxy(llama_server.url) as proxy:
        code = run_pipeline(endpoint_pipeline(tmp_path, proxy.url), tmp_path / "run", "--no-tracking")
    err = capsys.readouterr().err
    assert code == 3, err
    assert "refused by the capability probe" in err and "cover only the 1 generated tokens" in err
    assert proxy.url in err


def test_endpoint_with_another_tokenizer_is_refused(
    tmp_path: Path, llama_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server serves the BPE target model; the pipeline says the byte-level model."""
    path = endpoint_pipeline(tmp_path, llama_server.url, model="bundled:bytes", no_fidelity=True)
    code = run_pipeline(path, tmp_path / "run", "--no-tracking")
    err = capsys.readouterr().err
    assert code == 3, err
    assert "tokenizer mismatch at position 0" in err
