"""The CI examples in docs/ci work when copied: the extras each workflow installs cover every
instrument and backend of the pipelines it runs (a nightly that installs `.[hf]` but runs benchmarks
would stop at once with exit 2; the test stops it here instead)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from qualgate.config import load_pipeline
from qualgate.requirements import extras

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "docs" / "ci").glob("*.yml"))


def _commands(workflow: Path) -> list[list[str]]:
    steps = [
        step for job in yaml.safe_load(workflow.read_text(encoding="utf-8"))["jobs"].values() for step in job["steps"]
    ]
    lines = [line.split("#")[0] for step in steps if "run" in step for line in step["run"].splitlines()]
    return [shlex.split(line) for line in lines if line.strip()]


def installed_extras(workflow: Path) -> set[str]:
    found: set[str] = set()
    for argv in _commands(workflow):
        if argv[:2] == ["pip", "install"]:
            for arg in argv[2:]:
                match = re.fullmatch(r"\.\[([\w,]+)\]", arg)
                if match:
                    found |= set(match.group(1).split(","))
    return found


def pipelines_run(workflow: Path) -> list[str]:
    return [argv[2] for argv in _commands(workflow) if argv[:2] in (["qualgate", "run"], ["qualgate", "validate"])]


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.name for w in WORKFLOWS])
def test_workflow_installs_what_its_pipelines_use(workflow: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    pipelines = pipelines_run(workflow)
    assert pipelines, f"{workflow.name} runs no pipeline"
    have = installed_extras(workflow)
    for pipeline in pipelines:
        need = extras(load_pipeline(Path(pipeline)))
        assert need <= have, (
            f"{workflow.name} runs {pipeline}, which needs .[{','.join(sorted(need))}]; it installs {have}"
        )


def test_the_check_sees_a_missing_extra(tmp_path: Path) -> None:
    workflow = tmp_path / "nightly.yml"
    text = (REPO / "docs" / "ci" / "github-nightly.yml").read_text(encoding="utf-8")
    workflow.write_text(text.replace(".[hf,lmeval,judge,llamacpp]", ".[hf]"), encoding="utf-8")
    assert installed_extras(workflow) == {"hf"}
    assert "lmeval" in extras(load_pipeline(REPO / pipelines_run(workflow)[0]))
