"""report.json through its typed model: a version-1 file from before the exit-code contract still
loads and prints; an unknown version or a foreign document is exit 2; every report written is valid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from qualgate import report as publish
from qualgate.cli import main
from qualgate.errors import ConfigError
from qualgate.report_model import REPORT_VERSION, parse

V1 = Path(__file__).resolve().parent / "recorded" / "report-v1-pre-deploy.json"


def test_a_version_1_report_still_loads_and_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(V1, tmp_path / "report.json")
    report = publish.read(tmp_path)
    assert report["report_version"] == 1 and report["verdict"] == "pass"
    assert report["stacks"][1]["findings"][0]["metric"] == "kl_mean"
    assert main(["report", str(tmp_path)]) == 0
    assert "qualgate pre-deploy: PASS" in capsys.readouterr().out


def test_an_unknown_version_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(V1.read_text(encoding="utf-8"))
    (tmp_path / "report.json").write_text(json.dumps({**data, "report_version": REPORT_VERSION + 1}))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"report_version {REPORT_VERSION + 1} is not one this qualgate reads" in err and len(err.splitlines()) == 1


def test_a_finding_of_the_wrong_shape_is_named() -> None:
    data = json.loads(V1.read_text(encoding="utf-8"))
    data["stacks"][1]["findings"][0]["status"] = "great"
    with pytest.raises(ConfigError, match=r"^r\.json is not a qualgate report \(stacks\.1\.findings\.0\.status: "):
        parse(data, "r.json")


def test_written_reports_carry_the_current_version_and_are_validated(tmp_path: Path) -> None:
    data = json.loads(V1.read_text(encoding="utf-8"))
    publish.write({**data, "report_version": REPORT_VERSION}, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["report_version"] == REPORT_VERSION
    # A report qualgate itself built wrong is a bug (exit 4), not the user's input: it is never written.
    with pytest.raises(ValidationError, match="verdict"):
        publish.write({**data, "verdict": "maybe"}, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == "pass"
