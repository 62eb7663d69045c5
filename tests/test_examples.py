"""pipelines/examples/ for real models validate here: the checkpoints are faked with their real config
and a tokenizer (no weights), and their goldens recorded from the bundled target's scores under the
faked model's identity, so `qualgate validate` checks everything it checks for a user."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import REPO

from qualgate import build_stack, golden_record
from qualgate.backends.hf import HFSession
from qualgate.cli import main
from qualgate.fixtures import bundled_model_path
from qualgate.instruments.fidelity import FidelityConfig
from qualgate.models import ModelSpec
from qualgate.stack import Stack

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA_31 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
MODELS = {
    "Llama-3.1-8B-Instruct": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32},
    "Llama-3.1-70B-Instruct": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80},
    "Llama-3.2-1B-Instruct": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16},
}
GOLDENS = {"llama-3.1-8b-instruct": "Llama-3.1-8B-Instruct", "llama-3.1-70b-instruct": "Llama-3.1-70B-Instruct"}
TEXT = "dataset:wikitext:wikitext-2-raw-v1:test:text"


@pytest.fixture
def user_checkout(offline_datasets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory as a user has it: models/ (configs and tokenizers), golden/, the repo's evals/."""
    for name, size in MODELS.items():
        model = tmp_path / "models" / name
        model.mkdir(parents=True)
        heads = size["hidden_size"] // 128
        config = {**LLAMA_31, **size, "num_attention_heads": heads, "num_key_value_heads": 8, "head_dim": 128}
        (model / "config.json").write_text(json.dumps(config))
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(bundled_model_path("target") / file, model / file)
        tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": TEMPLATE}))
    (tmp_path / "evals").symlink_to(REPO / "evals")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUALGATE_VLLM_PYTHON", sys.executable)  # the vLLM environment's interpreter
    session = HFSession(build_stack({"path": "bundled:target"}))
    config = FidelityConfig(max_chunks=3)
    for golden, name in GOLDENS.items():
        # The bundled target's scores, recorded as the faked model's golden (its files, bf16, the text).
        session.stack = Stack(model=ModelSpec(path=f"models/{name}", dtype="bfloat16"))
        from qualgate.golden import read_text_file

        golden_record.record(session, read_text_file(TEXT), config, tmp_path / "golden" / golden, text_source=TEXT)
    return tmp_path


@pytest.mark.parametrize("example", ["llama-3.1-8b-pre-deploy", "llama-3.1-70b-vllm-tp", "llamacpp-gguf-ladder"])
def test_the_real_model_examples_validate(
    user_checkout: Path, example: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = REPO / "pipelines" / "examples" / f"{example}.yaml"
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_a_golden_made_elsewhere_is_named_not_used(user_checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The 8B's golden against the 70B: exit 2 naming what differs, never a silent comparison."""
    shutil.rmtree(user_checkout / "golden" / "llama-3.1-70b-instruct")
    shutil.copytree(
        user_checkout / "golden" / "llama-3.1-8b-instruct", user_checkout / "golden" / "llama-3.1-70b-instruct"
    )
    assert main(["validate", str(REPO / "pipelines" / "examples" / "llama-3.1-70b-vllm-tp.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "golden baseline does not match: model file" in err, err
