"""chat_template: true: generation prompts go through the model's chat template, recorded in provenance."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import pipeline_file, run_pipeline

from qualgate import build_stack, open_session
from qualgate.cli import main
from qualgate.fixtures import bundled_model_path
from qualgate.instruments.judge.run import JudgePrompt, answers

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled target with a tokenizer that has a chat template (as an instruct model ships it)."""
    model = tmp_path_factory.mktemp("chat") / "target-instruct"
    shutil.copytree(bundled_model_path("target"), model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return model


def test_a_prompt_is_one_user_turn_with_the_generation_prompt_and_one_bos(chat_model: Path) -> None:
    with open_session(build_stack({"path": str(chat_model)})) as session:
        assert session.chat_template == TEMPLATE
        text = session.render_chat([{"role": "user", "content": "What does dict.get return?"}])
        assert text == "<s><|user|>\nWhat does dict.get return?\n<|assistant|>\n"
        ids = session.encode_chat("What does dict.get return?")
        assert ids[0] == session.bos_token_id and ids.count(session.bos_token_id) == 1
        assert ids == session.encode(text[len("<s>") :], add_bos=True)
        [judged] = answers(session, [JudgePrompt("p", "What does dict.get return?", None)], 6, chat=True)
        [plain] = session.generate([ids], max_new_tokens=6, top_k=1)
        assert judged == plain.text


@pytest.mark.slow
def test_equivalence_and_benchmarks_through_the_template_are_recorded(chat_model: Path, tmp_path: Path) -> None:
    layers = {"spec": {"kind": "speculation", "method": "draft_model", "draft": "bundled:draft"}}
    path = pipeline_file(tmp_path, layers, stacks=[{"layers": ["spec"]}])
    data = yaml.safe_load(path.read_text())
    data["model"] = {"path": str(chat_model)}
    data["instruments"] = {
        "equivalence": {
            "prompts": ["evals/prompts/general.jsonl"],
            "max_new_tokens": 8,
            "chat_template": True,
            "probes": False,
            "decode_path": False,
        },
        "benchmarks": {"tasks": ["qg_cloze"], "limit": 8, "chat_template": True},
    }
    data["tracking"] = {"enabled": False}
    path.write_text(yaml.safe_dump(data))
    assert run_pipeline(path, tmp_path / "run") == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    expected = hashlib.sha256(TEMPLATE.encode()).hexdigest()
    for name in ("equivalence_chat_template", "benchmarks_chat_template"):
        assert report["provenance"][name] == {"applied": True, "sha256": expected, "chars": len(TEMPLATE)}
    [stack] = [s for s in report["stacks"] if s["name"] == "spec-draft4"]
    assert stack["instruments"]["equivalence"]["real_divergences"] == 0
    [task] = stack["instruments"]["benchmarks"]["tasks"]
    assert task["task"] == "qg_cloze" and task["n"] == 8


def test_a_model_without_a_template_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = pipeline_file(tmp_path, {"spec": {"kind": "speculation", "method": "draft_model", "draft": "bundled:draft"}})
    data = yaml.safe_load(path.read_text())
    data["instruments"]["equivalence"]["chat_template"] = True
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "instruments.equivalence.chat_template" in err
    assert "tokenizer of model 'bundled:target' has no chat template" in err, err
