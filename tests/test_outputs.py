"""Outputs under faults: atomic report files, a lock per run directory, no stale verdict, a full disk
that is exit 3 and resumes, secrets that never reach an output, and the exit-4 contract."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qualgate import report as publish
from qualgate.cli import main
from qualgate.errors import ConfigError, InfrastructureError
from qualgate.fsio import atomic_write, read_text
from qualgate.redact import REDACTED, is_secret, redact, show
from qualgate.run_lock import LOCK_FILE, RunLock
from qualgate.yaml_file import load_yaml

REPORT: dict[str, Any] = {
    "report_version": 1,
    "pipeline": "p",
    "verdict": "pass",
    "measured": "pass",
    "inconclusive": 0,
    "reasons": [],
    "compound": {"metrics": [], "baseline": {}, "ladder": [], "singles": [], "note": ""},
    "stacks": [
        {
            "name": "s",
            "role": "ladder",
            "verdict": "pass",
            "measured": "pass",
            "inconclusive": [],
            "reasons": ["fidelity.kl_mean nan"],
            "lossless": False,
            "step": 1,
            "layers": [],
            "instruments": {},
            "findings": [
                {
                    "instrument": "fidelity",
                    "metric": "kl_mean",
                    "value": float("nan"),
                    "low": None,
                    "high": None,
                    "status": "error",
                    "gated": "fail",
                    "reason": "kl_mean nan",
                    "pessimistic": float("inf"),
                }
            ],
        }
    ],
}


def _full_disk(fd: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.json"
    atomic_write(target, b"old")
    monkeypatch.setattr(os, "fsync", _full_disk)
    with pytest.raises(InfrastructureError, match=r"^disk full writing .*report\.json \(5 bytes needed, [\d,]+ free\)"):
        atomic_write(target, b"new!!")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"], "no temp file left behind"


def test_report_files_are_valid_json_without_nan_and_written_whole(tmp_path: Path) -> None:
    publish.write(REPORT, tmp_path)
    text = (tmp_path / "report.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    finding = json.loads(text)["stacks"][0]["findings"][0]
    assert finding["value"] is None and finding["pessimistic"] is None and finding["status"] == "error"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junit.xml", "report.json", "summary.md"]


def test_a_full_disk_while_writing_the_report_is_exit_3_and_leaves_no_torn_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish.write(REPORT, tmp_path)
    before = (tmp_path / "report.json").read_bytes()
    monkeypatch.setattr(os, "fsync", _full_disk)
    with pytest.raises(InfrastructureError, match="disk full writing"):
        publish.write({**REPORT, "verdict": "fail"}, tmp_path)
    assert (tmp_path / "report.json").read_bytes() == before


def test_supersede_removes_the_previous_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publish.write(REPORT, tmp_path)
    (tmp_path / "records").mkdir()
    publish.supersede(tmp_path)
    assert not any((tmp_path / name).exists() for name in publish.OUTPUTS)
    assert main(["report", str(tmp_path)]) == 2
    assert "has not finished" in capsys.readouterr().err


def test_a_live_holder_keeps_the_lock_and_is_named(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(f"{holder.pid} {socket.gethostname()}\n", encoding="utf-8")
        with pytest.raises(InfrastructureError, match=rf"in use by another qualgate run \(pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing it: the next run takes it over.
    with RunLock(tmp_path) as lock:
        assert (tmp_path / LOCK_FILE).read_text(encoding="utf-8").split()[0] == str(os.getpid())
        with pytest.raises(InfrastructureError, match=rf"pid {os.getpid()} "):
            RunLock(tmp_path).acquire()
    assert not lock.held and not (tmp_path / LOCK_FILE).exists()


def test_a_torn_lock_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text("", encoding="utf-8")
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text(encoding="utf-8").startswith(str(os.getpid()))


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("api_key", True),
        ("hf_token", True),
        ("client_secret", True),
        ("Authorization", True),
        ("password", True),
        ("per_token", False),
        ("max_tokens", False),
        ("api_key_env", False),
        ("tokenizer.json", False),
        ("top_k", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret(name) is secret


def test_echoes_are_bounded_and_redacted() -> None:
    shared: list[Any] = ["x" * 50] * 9
    for _ in range(8):
        shared = [shared] * 9  # 9^8 leaves through aliases: a repr would never end
    assert len(show(shared)) <= 200
    assert show("sk-123", "api_key") == REDACTED
    assert "sk-123" not in show({"endpoint": {"api_key": "sk-123", "model": "m"}})
    assert redact({"a": [{"token": "t"}], "n_tokens": 3}) == {"a": [{"token": REDACTED}], "n_tokens": 3}


def test_yaml_merge_keys_may_override_but_plain_duplicates_may_not(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("base: &b {bits: 4, group_size: 64}\nw: {<<: *b, bits: 8}\n", encoding="utf-8")
    assert load_yaml(path, "pipeline")["w"] == {"bits": 8, "group_size": 64}
    path.write_text("w: {bits: 4}\nx: 1\nw: {bits: 8}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'w' appears twice \(lines 1 and 3\)"):
        load_yaml(path, "pipeline")


def test_read_text_names_the_byte_and_line_of_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"ok\nca\xe9\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 \(byte 5, line 2\)"):
        read_text(path, "text")


def test_a_tracking_store_that_cannot_be_written_is_exit_3_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qualgate.tracking.mlflow_log import check_uri

    check_uri(f"sqlite:///{tmp_path}/mlflow.db")
    # Root writes anywhere, so the refusal a user meets (a read-only checkout) is simulated at os.access.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(InfrastructureError, match=r"is not writable, so MLflow cannot create or update mlflow\.db"):
        check_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(ConfigError, match=r"MLflow has no store for scheme 'foo'"):
        check_uri("foo://bar")
