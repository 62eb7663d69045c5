"""Real data offline: domain text and lm-eval's own tasks read from a local Hugging Face datasets cache.

The cache is built here the way a connected machine fills it (datasets.load_dataset of a dataset
repository), under the names the Hub uses, and read back with the Hub unreachable."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO, pipeline_file, run_pipeline

from qualgate.cli import main
from qualgate.golden import read_text_file

SPEC = "dataset:wikitext:wikitext-2-raw-v1:test:text"
HELLASWAG_ENDINGS = [
    "opens the file and reads every line.",
    "eats the keyboard.",
    "flies to the moon.",
    "sings to the compiler.",
]


def _repository(root: Path, name: str, config: str, split_rows: dict[str, dict[str, list[Any]]]) -> Path:
    """A dataset repository on disk: one parquet file per split under its config, and the card's configs."""
    import datasets

    repo = root / name
    for split, rows in split_rows.items():
        (repo / config).mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows).to_parquet(str(repo / config / f"{split}-00000-of-00001.parquet"))
    files = "".join(f"  - split: {s}\n    path: {config}/{s}-*\n" for s in split_rows)
    (repo / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n")
    return repo


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """wikitext (config wikitext-2-raw-v1, rows of the bundled domain text) and Rowan/hellaswag (a few
    documents in its schema), cached as load_dataset leaves them."""
    import datasets

    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    lines = (REPO / "evals" / "domain" / "cpython_docs_heldout.txt").read_text(encoding="utf-8").splitlines()[:400]
    wiki = _repository(root / "src", "wikitext", "wikitext-2-raw-v1", {"test": {"text": [f"{x}\n" for x in lines]}})
    datasets.load_dataset(str(wiki), "wikitext-2-raw-v1", cache_dir=str(cache))
    docs = {
        "ind": list(range(6)),
        "activity_label": ["Programming"] * 6,
        "ctx_a": ["The developer"] * 6,
        "ctx_b": ["then"] * 6,
        "ctx": ["The developer then"] * 6,
        "endings": [HELLASWAG_ENDINGS] * 6,
        "source_id": ["qualgate"] * 6,
        "split": ["val"] * 6,
        "split_type": ["indomain"] * 6,
        "label": ["0", "0", "1", "0", "2", "0"],
    }
    swag = _repository(root / "src", "hellaswag", "default", {"train": docs, "validation": docs})
    datasets.load_dataset(str(swag), cache_dir=str(cache))
    # A Hub dataset with a namespace is cached as NAMESPACE___NAME
    (cache / "hellaswag").rename(cache / "Rowan___hellaswag")
    return cache


@pytest.fixture
def offline_cache(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This process reads `hf_cache` and may not reach the Hub (HF_DATASETS_OFFLINE=1 at start)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yield hf_cache


def test_text_from_a_cached_dataset_is_its_rows_in_order(offline_cache: Path) -> None:
    text = read_text_file(SPEC)
    lines = (REPO / "evals" / "domain" / "cpython_docs_heldout.txt").read_text(encoding="utf-8").splitlines()[:400]
    assert text == "".join(f"{x}\n" for x in lines if f"{x}\n")


@pytest.mark.slow
def test_a_golden_recorded_on_a_cached_dataset_gates_a_run(offline_cache: Path, tmp_path: Path) -> None:
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
    offline_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: dict[str, str], expected: str
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
def test_lm_evals_own_task_runs_on_its_cached_dataset(offline_cache: Path, tmp_path: Path) -> None:
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
    offline_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = pipeline_file(tmp_path, {"w8": {"kind": "weight_quant", "method": "rtn", "bits": 8}})
    data = yaml.safe_load(path.read_text())
    data["instruments"] = {"benchmarks": {"tasks": ["arc_easy"]}}
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "task 'arc_easy' needs dataset 'allenai/ai2_arc'" in err, err
    assert "datasets.load_dataset('allenai/ai2_arc', 'ARC-Easy')" in err and os.environ["HF_DATASETS_OFFLINE"] == "1"
