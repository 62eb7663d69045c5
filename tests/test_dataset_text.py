"""Real data offline: domain text and lm-eval's own tasks read from a local Hugging Face datasets cache.

The cache (tests/hub_cache.py) is built the way a connected machine fills it, under the names the Hub
uses, and read back with the Hub unreachable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import pipeline_file, run_pipeline
from hub_cache import domain_lines

from qualgate.cli import main
from qualgate.golden import read_text_file

SPEC = "dataset:wikitext:wikitext-2-raw-v1:test:text"


def test_text_from_a_cached_dataset_is_its_rows_in_order(offline_datasets: Path) -> None:
    assert read_text_file(SPEC) == "".join(domain_lines())


@pytest.mark.slow
def test_a_golden_recorded_on_a_cached_dataset_gates_a_run(offline_datasets: Path, tmp_path: Path) -> None:
    golden = tmp_path / "golden"
    args = ["golden", "record", "--out", str(golden), "--text", SPEC, "--n-ctx", "128", "--max-chunks", "4"]
    assert main(args) == 0
    manifest = json.loads((golden / "manifest.json").read_text())
    assert manifest["text"]["source"] == SPEC
    path = pipeline_file(
        tmp_path, {"w8": {"kind": "weight_quant", "method": "rtn", "bits": 8}}, stacks=[{"layers": ["w8"]}]
    )
    data = yaml.safe_load(path.read_text())
    text = {"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "test", "field": "text"}
    data["instruments"] = {"fidelity": {"golden": str(golden), "text": text}}
    data["tracking"] = {"enabled": False}
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 0
    assert run_pipeline(path, tmp_path / "run") in (0, 1)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    [stack] = [s for s in report["stacks"] if s["name"] == "w8g128"]
    assert stack["instruments"]["fidelity"]["n_chunks"] == 4
    assert any(d["source"] == SPEC for d in report["provenance"]["data"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            {"dataset": "acme/support-tickets", "split": "test"},
            "dataset 'acme/support-tickets', split 'test' is not in the local datasets cache",
        ),
        (
            {"dataset": "wikitext", "config": "wikitext-103-raw-v1"},
            "dataset 'wikitext', config 'wikitext-103-raw-v1', split 'test' is not in the local datasets cache",
        ),
        ({"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "train"}, "is not in the local datasets"),
        (
            {"dataset": "wikitext", "config": "wikitext-2-raw-v1", "field": "page"},
            "has no field 'page'; its fields: text",
        ),
    ],
)
def test_what_the_cache_does_not_hold_is_exit_2_with_the_fetch_command(
    offline_datasets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: dict[str, str], expected: str
) -> None:
    path = pipeline_file(tmp_path, {"w8": {"kind": "weight_quant", "method": "rtn", "bits": 8}})
    data = yaml.safe_load(path.read_text())
    data["instruments"]["fidelity"]["text"] = text
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err and str(path) in err, err
    if "fields" not in expected:
        config = f", {text['config']!r}" if "config" in text else ""
        command = f"datasets.load_dataset({text['dataset']!r}{config}, split={text.get('split', 'test')!r})"
        assert command in err and "copy that machine's cache here" in err, err


def test_a_malformed_dataset_spec_is_exit_2_naming_the_form(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["golden", "record", "--out", str(tmp_path / "g"), "--text", "dataset:wikitext:test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dataset:NAME:CONFIG:SPLIT:FIELD" in err, err


@pytest.mark.slow
def test_lm_evals_own_task_runs_on_its_cached_dataset(offline_datasets: Path, tmp_path: Path) -> None:
    path = pipeline_file(
        tmp_path, {"w8": {"kind": "weight_quant", "method": "rtn", "bits": 8}}, stacks=[{"layers": ["w8"]}]
    )
    data = yaml.safe_load(path.read_text())
    data["instruments"] = {"benchmarks": {"tasks": ["hellaswag"], "limit": 6}}
    data["tracking"] = {"enabled": False}
    path.write_text(yaml.safe_dump(data))
    assert run_pipeline(path, tmp_path / "run") in (0, 1)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    [stack] = [s for s in report["stacks"] if s["name"] == "w8g128"]
    [task] = stack["instruments"]["benchmarks"]["tasks"]
    assert task["task"] == "hellaswag" and task["n"] == 6, task


def test_lm_evals_own_task_without_its_data_is_exit_2(
    offline_datasets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = pipeline_file(tmp_path, {"w8": {"kind": "weight_quant", "method": "rtn", "bits": 8}})
    data = yaml.safe_load(path.read_text())
    data["instruments"] = {"benchmarks": {"tasks": ["piqa"]}}  # not in the test cache
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "task 'piqa' needs dataset '" in err and "not in the local datasets cache" in err
    assert 'python -c "import datasets; datasets.load_dataset(' in err and os.environ["HF_DATASETS_OFFLINE"] == "1"
