"""A backend added from outside qualgate (tests/plugin_backends.py, named by its path): its options are
checked, the layers it cannot apply are refused before anything runs, and a run measures through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import REPO, pipeline_file, run_pipeline

from qualgate.cli import main

BACKEND = "plugin_backends:NoPrefixCache"
W8 = {"kind": "weight_quant", "method": "rtn", "bits": 8}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def _with_backend(path: Path, options: dict[str, object]) -> Path:
    data = yaml.safe_load(path.read_text())
    data["backend"] = {"name": BACKEND, "options": options}
    del data["instruments"]["equivalence"]  # fidelity is enough to see the run measured through it
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_plugin_backend_measures_a_run(tmp_path: Path) -> None:
    path = _with_backend(pipeline_file(tmp_path, {"w8": W8}), {"threads": 1})
    assert run_pipeline(path, tmp_path / "run", "--no-tracking") == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["provenance"]["backend"] == BACKEND
    assert [s["name"] for s in report["stacks"]] == ["base", "w8g128"]
    assert report["stacks"][1]["instruments"]["fidelity"]["kl_mean"]["value"] > 0


def test_a_plugin_backend_refuses_what_it_cannot_apply_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = {"kind": "prefix_cache", "method": "block"}
    path = _with_backend(pipeline_file(tmp_path, {"prefix": prefix}), {})
    assert main(["validate", str(path)]) == 2
    assert "backend 'no_prefix_cache' cannot apply layer 'prefix-cache' (prefix_cache/block)" in capsys.readouterr().err
    path = _with_backend(pipeline_file(tmp_path, {"w8": W8}), {"thread": 2})
    assert main(["validate", str(path)]) == 2
    assert "unknown field 'thread'; did you mean 'threads'?" in capsys.readouterr().err
