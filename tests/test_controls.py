"""Control stacks (qualgate/controls.py): known-bad stacks a run must fail. Caught when every
instrument in `must_fail` fails it, and then counted as pass; a miss fails the run (exit 1). Unit tests
of the judging, the plan and the pipeline checks, and one run on the bundled model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
import yaml
from helpers import REPO, pipeline_file, run_pipeline

from qualgate.config import load_pipeline
from qualgate.controls import judge_control, summary_lines
from qualgate.errors import ConfigError
from qualgate.junit import junit
from qualgate.report import verdict_label


def _finding(instrument: str, status: str) -> dict[str, Any]:
    return {"instrument": instrument, "metric": "m", "status": status, "gated": status, "reason": f"m is {status}"}


def _stack(verdict: str, *findings: dict[str, Any]) -> dict[str, Any]:
    return {"name": "w2", "verdict": verdict, "measured": verdict, "inconclusive": ["x.m"], "findings": list(findings),
            "reasons": [f"{f['instrument']}.{f['reason']}" for f in findings if f["status"] != "pass"]}  # fmt: skip


def test_a_control_failed_by_every_required_instrument_is_caught_and_counts_as_pass() -> None:
    done = judge_control(
        _stack(
            "fail", _finding("fidelity", "fail"), _finding("benchmarks.qg_cloze", "fail"), _finding("judge", "warn")
        ),
        ["fidelity", "benchmarks"],
    )
    assert (done["verdict"], done["measured"], done["reasons"], done["inconclusive"]) == ("pass", "pass", [], [])
    control = done["control"]
    assert control["caught"] and control["measured"] == "fail" and control["missed"] == []
    assert control["failed_by"] == ["benchmarks", "fidelity"], "a task's finding is its instrument's"
    assert verdict_label(done) == "FAIL as expected"


def test_a_control_one_required_instrument_passes_is_missed_and_fails_the_run() -> None:
    done = judge_control(_stack("fail", _finding("fidelity", "fail"), _finding("judge", "warn")), ["fidelity", "judge"])
    assert done["verdict"] == "fail" and not done["control"]["caught"]
    assert done["control"]["missed"] == ["judge"]
    assert done["reasons"][0].startswith("control.judge did not fail this known-bad stack (measured FAIL)")
    assert verdict_label(done) == "MISSED (FAIL, expected FAIL)"


def test_without_must_fail_any_failing_instrument_catches_it_and_none_misses_it() -> None:
    assert judge_control(_stack("fail", _finding("judge", "fail")), [])["control"]["caught"]
    missed = judge_control(_stack("warn", _finding("judge", "warn")), [])
    assert missed["control"]["missed"] == ["any instrument"] and missed["verdict"] == "fail"


def test_an_inconclusive_finding_the_policy_counts_as_fail_does_not_catch_a_control() -> None:
    """Its point estimate is within the thresholds: the instrument did not see the damage."""
    inconclusive = {**_finding("judge", "inconclusive"), "gated": "fail"}
    done = judge_control(_stack("fail", inconclusive), ["judge"])
    assert done["control"]["missed"] == ["judge"] and done["verdict"] == "fail"


def test_junit_has_one_case_per_required_instrument_and_the_summary_a_controls_table() -> None:
    caught = judge_control(_stack("fail", _finding("fidelity", "fail")), ["fidelity"])
    missed = {**judge_control(_stack("pass", _finding("fidelity", "pass")), ["fidelity"]), "name": "w8"}
    report = {"pipeline": "p", "stacks": [caught, missed]}
    suite = ET.fromstring(junit(report))[0]
    cases = {(c.get("classname"), c.get("name")): c for c in suite}
    assert set(cases) == {("qualgate.p.w2", "control.fidelity"), ("qualgate.p.w8", "control.fidelity")}
    assert cases[("qualgate.p.w2", "control.fidelity")].find("failure") is None
    assert cases[("qualgate.p.w8", "control.fidelity")].find("failure") is not None
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    lines = summary_lines(report)
    assert "| `w2` | FAIL | fidelity | fidelity | yes |" in lines
    assert "| `w8` | PASS | fidelity | - | NO: fidelity |" in lines


@pytest.mark.parametrize(
    ("controls", "stacks", "message"),
    [
        ([{"layers": ["w3"]}], "auto", "controls[0].layers names 'w3', which is not in layers; did you mean 'w2'?"),
        ([{"layers": ["w2"], "must_fail": ["judge"]}], "auto",
         "controls[0].must_fail names 'judge', which this pipeline does not run"),
        ([{"layers": ["w2"]}], [{"layers": ["w2"]}], "controls[0].layers ['w2'] is also a stack in stacks"),
        ([{"layers": ["w2"]}, {"layers": ["w2"]}], "auto", "controls[1].layers ['w2'] is also controls[0]"),
        ([{"layers": []}], "auto", "field 'controls[0].layers': List should have at least 1 item"),
    ],
)  # fmt: skip
def test_a_control_naming_what_the_pipeline_lacks_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, controls: list[dict[str, Any]], stacks: Any, message: str
) -> None:
    monkeypatch.chdir(REPO)
    path = pipeline_file(
        tmp_path, {"w2": {"kind": "weight_quant", "method": "rtn", "bits": 2}}, stacks, controls=controls
    )
    with pytest.raises(ConfigError) as raised:
        load_pipeline(path)
    assert str(path) in str(raised.value) and message in str(raised.value)


@pytest.mark.slow
def test_a_run_catches_the_2_bit_control_and_fails_on_an_8_bit_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """2-bit weights fail fidelity (caught); 8-bit weights pass it, so a control on them is missed and
    the run fails naming fidelity, though no gated stack failed."""
    monkeypatch.chdir(REPO)
    layers = {"w2": {"kind": "weight_quant", "method": "rtn", "bits": 2},
              "w8": {"kind": "weight_quant", "method": "rtn", "bits": 8}}  # fmt: skip
    controls = [{"layers": ["w2"], "must_fail": ["fidelity"]}, {"layers": ["w8"], "must_fail": ["fidelity"]}]
    path = pipeline_file(tmp_path, layers, controls=controls)
    out = tmp_path / "run"
    assert run_pipeline(path, out) == 1
    report = json.loads((out / "report.json").read_text())
    roles = [(s["role"], s["verdict"], s.get("control", {}).get("caught")) for s in report["stacks"]]
    assert roles == [("baseline", "pass", None), ("control", "pass", True), ("control", "fail", False)]
    w2, w8 = report["stacks"][1:]
    assert w2["control"]["measured"] == "fail" and "fidelity" in w2["control"]["failed_by"]
    assert w8["control"]["missed"] == ["fidelity"]
    assert report["verdict"] == "fail"
    assert report["reasons"] == [f"{w8['name']}: {w8['reasons'][0]}"], "only the miss is a reason of the run"
    printed = capsys.readouterr().out
    assert f"CONTROL {w2['name']}: FAIL as expected, failed by " in printed
    assert f"CONTROL {w8['name']}: MISSED (PASS, expected FAIL)" in printed
    summary = (out / "summary.md").read_text()
    assert "### Controls (known-bad stacks the run must fail)" in summary
    assert (
        f"| `{w2['name']}` | FAIL | fidelity | " in summary
        and f"| `{w8['name']}` | PASS | fidelity | - | NO: fidelity |" in summary
    )
    from mlflow import MlflowClient

    state = json.loads((out / "tracking.json").read_text())
    runs = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_runs([state["experiment_id"]])
    tags = {r.info.run_name: r.data.tags for r in runs}
    assert tags[w2["name"]]["qualgate.control"] == "caught" and tags[w8["name"]]["qualgate.control"] == "missed"
    assert yaml.safe_load(path.read_text())["controls"] == controls


def test_must_fail_names_the_label_findings_carry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode path's findings are fidelity's (decode_kl_mean, shape_kl): a control requiring
    `decode_path` could never be caught, so it is refused with the name to use."""
    monkeypatch.chdir(REPO)
    w2 = {"kind": "weight_quant", "method": "rtn", "bits": 2}
    path = pipeline_file(
        tmp_path, {"w2": w2}, serving=True, controls=[{"layers": ["w2"], "must_fail": ["decode_path"]}]
    )
    with pytest.raises(
        ConfigError, match="must_fail names 'decode_path', whose findings are fidelity's; name fidelity"
    ):
        load_pipeline(path)


def test_without_must_fail_only_a_finding_measured_past_fail_catches_it() -> None:
    """Not the stack's gated verdict: an inconclusive finding counted as fail, or an error (a NaN), is
    no sighting of the damage."""
    inconclusive = {**_finding("judge", "inconclusive"), "gated": "fail"}
    assert judge_control(_stack("fail", inconclusive, _finding("fidelity", "error")), [])["control"]["missed"] == [
        "any instrument"
    ]
