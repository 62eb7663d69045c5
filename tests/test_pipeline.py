"""`qualgate run` end to end on the bundled models: verdicts, exit codes, outputs, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import REPO
from helpers import pipeline_file as _pipeline
from helpers import run_pipeline as _run

from qualgate.cli import main
from qualgate.devices import resolve
from qualgate.report_model import REPORT_VERSION


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # pipelines name repository-relative paths, as users run them


@pytest.mark.slow
def test_two_bit_weights_fail_and_say_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _pipeline(tmp_path, {"w2": {"kind": "weight_quant", "method": "rtn", "bits": 2}})
    assert _run(path, tmp_path / "run") == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["verdict"] == "fail" and report["report_version"] == REPORT_VERSION == 2
    assert any(r.startswith("w2g128: fidelity.kl_mean upper bound") for r in report["reasons"])
    w2 = next(s for s in report["stacks"] if s["name"] == "w2g128")
    assert w2["verdict"] == "fail" and w2["layers"] == [
        {"name": "w2", "kind": "weight_quant", "method": "rtn", "bits": 2}
    ]
    kl = next(f for f in w2["findings"] if f["metric"] == "kl_mean")
    assert kl["status"] == "fail" and kl["fail"] == 0.05 and kl["high"] > 0.05 and kl["low"] <= kl["value"]
    assert any("kl_mean upper bound" in r and "crosses fail 0.05" in r for r in w2["reasons"])
    assert "FAIL w2g128: fidelity.kl_mean upper bound" in capsys.readouterr().out
    base = next(s for s in report["stacks"] if s["role"] == "baseline")
    assert base["verdict"] == "pass", "the baseline against its own golden passes"
    junit = (tmp_path / "run" / "junit.xml").read_text()
    assert junit.count("<testcase") == sum(len(s["findings"]) for s in report["stacks"]) and "<failure" in junit
    markdown = (tmp_path / "run" / "summary.md").read_text()
    assert "| `w2g128` | FAIL |" in markdown
    # The flat fixture target keeps over 20% of its mass outside its top-64: the golden's tail draws make
    # KL an estimate (the bound, a quarter lower here, is a diagnostic), so no "lower bound" note.
    fidelity = w2["instruments"]["fidelity"]
    assert fidelity["reference_tail_mass"] > 0.2
    assert fidelity["kl_estimator"]["kind"] == "sampled-tail" and fidelity["kl_estimator"]["tail_samples"] == 16
    assert fidelity["kl_bound"]["value"] < 0.9 * fidelity["kl_mean"]["value"]
    assert "is a lower bound" not in markdown


@pytest.mark.slow
def test_eight_bit_passes_with_a_compound_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    path = _pipeline(
        tmp_path,
        {
            "w8": {"kind": "weight_quant", "method": "rtn", "bits": 8},
            "kv": {"kind": "kv_quant", "method": "fp8"},
            "spec": {"kind": "speculation", "method": "ngram"},
        },
    )
    assert _run(path, tmp_path / "run") == 0
    first = (tmp_path / "run" / "report.json").read_text()
    report = json.loads(first)
    assert report["verdict"] == "pass"
    assert report["provenance"]["golden"]["n_tokens"] == 4080
    device = report["provenance"]["device"]  # where the in-process model ran, and on what torch
    assert device["device"] == str(resolve("auto")) and device["torch"] == torch.__version__
    assert _run(path, tmp_path / "run") == 0, "a rerun reuses every record"
    assert (tmp_path / "run" / "report.json").read_text() == first, "and reports the same, byte for byte"
    assert [s["name"] for s in report["stacks"]] == [
        "base",
        "w8g128",
        "w8g128+kv-fp8-e4m3",
        "w8g128+kv-fp8-e4m3+spec-ngram4",
        "kv-fp8-e4m3",
        "spec-ngram4",
    ]
    ladder = report["compound"]["ladder"]
    assert [row["step"] for row in ladder] == [1, 2, 3]
    step2 = ladder[1]["kl_mean"]
    assert step2["vs_baseline"] == pytest.approx(step2["vs_previous"] + ladder[0]["kl_mean"]["vs_baseline"])
    assert step2["interaction"] == pytest.approx(step2["vs_baseline"] - step2["sum_of_singles"])
    assert ladder[2]["kl_mean"]["vs_previous"] == 0, "speculation does not change the distribution"
    spec = report["stacks"][3]["instruments"]["equivalence"]
    assert spec["real_divergences"] == 0 and spec["reference"] == "w8g128+kv-fp8-e4m3"
    assert "qualgate: t" in summary.read_text()


@pytest.mark.slow
def test_lossy_speculation_fails_on_equivalence(tmp_path: Path) -> None:
    path = _pipeline(tmp_path, {"typical": {"kind": "speculation", "method": "draft_model_typical"}})
    assert _run(path, tmp_path / "run") == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    stack = report["stacks"][1]
    assert stack["verdict"] == "fail" and any("real_divergences" in r for r in stack["reasons"])
    assert stack["instruments"]["fidelity"]["kl_mean"]["value"] < 1e-6, "fidelity cannot see speculation"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"colour": "red"}, "unknown field 'colour'"),
        ({"tracking": {"experimnt": "x"}}, "unknown field 'tracking.experimnt'"),
        ({"version": 2}, "field 'version' must be 1"),
        ({"layers": {"w": {"kind": "weight_quant", "method": "rtn", "bits": "four"}}}, "layers.w"),
        ({"layers": {"w": {"kind": "weight_quant", "method": "rnt"}}}, "did you mean 'rtn'"),
        ({"stacks": [{"layers": ["w9"]}]}, "stacks[0].layers names 'w9'"),
        ({"instruments": {"fidelity": {"golden": "golden/missing"}}}, "file 'golden/missing' does not exist"),
        ({"gate": {"kl_means": {"fail": 0.1}}}, "did you mean 'kl_mean'"),
        ({"gate": {"kl_mean": {"fail": 1e-12}}}, "below the noise floor"),
        ({"gate": {"kl_mean": {"warn": 1e-12, "fail": 0.05}}}, "kl_mean threshold 1e-12 is below the noise floor"),
    ],
)
def test_malformed_pipelines_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict[str, Any], message: str
) -> None:
    path = _pipeline(tmp_path, {"w": {"kind": "weight_quant", "method": "rtn"}})
    data = {**yaml.safe_load(path.read_text()), **edit}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert _run(path, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and str(path) in err


def test_missing_and_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: [unclosed\n")
    assert main(["validate", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_bundled_pipelines_validate(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("demo", "pre-deploy", "nightly", "known-bad", "judge-local"):
        assert main(["validate", f"pipelines/{name}.yaml"]) == 0
    out = capsys.readouterr().out
    assert "pipelines/demo.yaml: valid; 3 stacks: base, deploy, w2g128 (control)" in out
    assert "base, w4g64, w4g64+kv-int4-residual_length32, " in out  # the nightly's ladder


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_report(tmp_path: Path) -> None:
    path = _pipeline(
        tmp_path,
        {
            "w4": {"kind": "weight_quant", "method": "rtn", "bits": 4},
            "kv": {"kind": "kv_quant", "method": "fp8"},
            "spec": {"kind": "speculation", "method": "ngram"},
        },
    )
    clean = tmp_path / "clean"
    # WARN, exit 0: 4-bit RTN (w4g128) keeps 94.85% [94.17%, 95.53%] of top-1 tokens on the bundled golden
    # (qualgate fidelity), under warn 0.95 and above fail 0.90; FP8 KV and n-gram speculation pass.
    assert _run(path, clean) == 0
    assert json.loads((clean / "report.json").read_text())["verdict"] == "warn"
    killed = tmp_path / "killed"
    env = {**os.environ, "CI": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qualgate", "run", str(path), "--out", str(killed)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "records").glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((killed / "records").glob("*.json")))
    assert finished >= 2 and not (killed / "report.json").exists(), "killed mid-run"
    assert main(["run", str(path), "--out", str(killed), "--resume"]) == 0
    assert (killed / "report.json").read_text() == (clean / "report.json").read_text()
    assert main(["report", str(killed)]) == main(["report", str(clean)]) == 0


def test_resume_needs_an_earlier_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _pipeline(tmp_path, {"w": {"kind": "weight_quant", "method": "rtn"}})
    assert _run(path, tmp_path / "empty", "--resume") == 2
    assert "holds no earlier run" in capsys.readouterr().err
