"""The exit-code contract under every malformed input and fault of the corpus (tests/malformed/):
the documented exit code, one error line that matches, no traceback, no secret; and `validate`
rejects every input-file problem `run` rejects, with the same code, before any model loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from malformed_corpus import cases, error_lines, run_case

CASES = cases()
# What only `run` can meet: its own flags, its run directory, the environment while it writes.
RUN_ONLY = {"lock-held", "disk-full-checkpoint", "resume-without-run", "out-is-a-file", "cli-unknown-flag"}


def test_the_corpus_is_large_and_covers_every_exit_code() -> None:
    codes = [yaml.safe_load(path.read_text(encoding="utf-8"))["exit"] for path in CASES]
    assert len(CASES) >= 60
    assert set(codes) == {2, 3, 4}


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_malformed_input_gets_its_exit_code_and_one_line(path: Path, tmp_path: Path) -> None:
    case = yaml.safe_load(path.read_text(encoding="utf-8"))
    outcome = run_case(path, tmp_path)
    everything = outcome.out + outcome.err
    assert "Traceback" not in everything, everything[-2000:]
    lines = error_lines(outcome)
    assert len(lines) == 1, outcome.err[-2000:]
    assert outcome.code == case["exit"], lines[0]
    assert len(lines[0]) <= 1000
    assert re.search(case["message"].replace("{dir}", str(tmp_path)), lines[0]), lines[0]
    for secret in case.get("absent", []):
        assert secret not in everything
        for file in tmp_path.rglob("*"):
            if file.is_file() and file.name != "pipeline.yaml":
                assert secret.encode() not in file.read_bytes(), file
    if case["exit"] == 4:
        log = Path(re.search(r"the traceback is in (\S+?);", lines[0]).group(1))  # type: ignore[union-attr]
        assert log.is_relative_to(tmp_path / "out") and "ZeroDivisionError" in log.read_text(encoding="utf-8")


INPUT_CASES = [
    p
    for p in CASES
    if p.stem not in RUN_ONLY
    and yaml.safe_load(p.read_text(encoding="utf-8")).get("command", ["run"])[0] == "run"
    and "tracking-uri" not in p.stem
]


@pytest.mark.parametrize("path", INPUT_CASES, ids=[p.stem for p in INPUT_CASES])
def test_validate_rejects_what_run_rejects(path: Path, tmp_path: Path) -> None:
    case = yaml.safe_load(path.read_text(encoding="utf-8"))
    validating = tmp_path / "case.yaml"
    command = case.get("command") or ["run", "{pipeline}"]
    validating.write_text(yaml.safe_dump({**case, "command": ["validate", command[1]]}), encoding="utf-8")
    outcome = run_case(validating, tmp_path)
    assert outcome.code == case["exit"], outcome.err[-1000:]
    assert len(error_lines(outcome)) == 1 and "Traceback" not in outcome.err


def test_a_full_disk_is_exit_3_supersedes_the_old_report_and_the_rerun_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"pipeline": "corpus", "verdict": "pass", "stacks": []}', encoding="utf-8")
    case = {"why": "the disk fills half way", "fault": "disk-full-after:20", "exit": 3}
    path = tmp_path / "case.yaml"
    path.write_text(yaml.safe_dump(case), encoding="utf-8")
    full = run_case(path, tmp_path)
    assert full.code == 3 and re.search(r"disk full writing .*out/.* bytes needed", error_lines(full)[0])
    assert not (out / "report.json").exists(), "an old PASS must not outlive a run that died"
    path.write_text(yaml.safe_dump({**case, "fault": None, "exit": 0}), encoding="utf-8")
    freed = run_case(path, tmp_path)
    assert freed.code == 0, freed.err[-2000:]
    reused = re.search(r"(\d+) units measured, (\d+) reused", freed.out)
    assert reused and int(reused.group(2)) >= 1, freed.out[-500:]  # the baseline finished before the disk filled
    assert (out / "report.json").is_file()


def test_a_second_run_into_a_busy_run_directory_exits_3_naming_the_first(tmp_path: Path) -> None:
    """Two real processes into one --out: the second stops at once (exit 3, the first's PID); the
    first finishes untouched, and its lock is gone after it."""
    import subprocess
    import sys
    import time

    from malformed_corpus import REPO, prepare

    argv = prepare({"why": "first of two runs"}, tmp_path)
    first = subprocess.Popen(
        [sys.executable, "-m", "qualgate", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock = tmp_path / "out" / ".qualgate.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lock.exists(), "the first run never took the run directory"
    case = tmp_path / "second.yaml"
    case.write_text(yaml.safe_dump({"why": "second run", "exit": 3}), encoding="utf-8")
    second = run_case(case, tmp_path)
    _, err = first.communicate(timeout=600)
    assert second.code == 3, second.err
    assert f"in use by another qualgate run (pid {first.pid} on " in error_lines(second)[0]
    assert first.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert not lock.exists() and (tmp_path / "out" / "report.json").is_file()
