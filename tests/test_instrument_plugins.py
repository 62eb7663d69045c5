"""An instrument added from outside qualgate (tests/plugin_instruments.py, named by its path) is
configured, gated, reported in report.json, summary.md and JUnit, and logged to MLflow like a built-in."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO, run_pipeline

from qualgate.config import load_pipeline
from qualgate.errors import ConfigError
from qualgate.report_model import load

PLUGIN = "plugin_instruments:FirstToken"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def _pipeline(tmp_path: Path, **extra: Any) -> Path:
    data = {
        "version": 1,
        "name": "plugin",
        "model": {"path": "bundled:target"},
        # 2-bit RTN moves first tokens; the lossless n-gram speculation must not add any change of its own.
        "layers": {"w2": {"kind": "weight_quant", "method": "rtn", "bits": 2}},
        "instruments": {PLUGIN: {"prompts": "evals/prompts/general.jsonl"}},
        **extra,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_plugin_instrument_is_gated_reported_and_logged(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = run_pipeline(_pipeline(tmp_path), out)
    report = load(out / "report.json").model_dump()  # the typed report model accepts its section
    stack = next(s for s in report["stacks"] if s["name"] == "w2g128")
    section = stack["instruments"]["first_token"]
    assert section["prompts"] == 12 and 0 <= section["agreement"]["value"] < 1
    (finding,) = stack["findings"]
    # Gated with the plug-in's own default tiers, in the plug-in's direction (smaller is worse).
    assert (finding["instrument"], finding["metric"]) == ("first_token", "first_token_agreement")
    assert (finding["warn"], finding["fail"]) == (0.9, 0.8)
    assert finding["pessimistic"] == finding["low"] and finding["status"] == "fail"
    assert code == 1 and report["verdict"] == "fail"
    assert report["provenance"]["plugins"] == {"first_token": PLUGIN}
    assert "first_token" not in next(s for s in report["stacks"] if s["role"] == "baseline")["instruments"]
    summary = (out / "summary.md").read_text()
    assert "### First token (greedy, vs the baseline)" in summary and "| `w2g128` |" in summary
    assert 'name="first_token.first_token_agreement"' in (out / "junit.xml").read_text()
    # Logged on the stack's MLflow run under the plug-in's own keys.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    state = json.loads((out / "tracking.json").read_text())
    runs = client.search_runs([state["experiment_id"]], filter_string="tags.`qualgate.stack` = 'w2g128'")
    metrics = runs[0].data.metrics
    assert metrics["first_token/agreement"] == pytest.approx(section["agreement"]["value"])
    assert metrics["first_token/agreement_low"] == pytest.approx(section["agreement"]["low"])
    # A second run reuses the plug-in's records (its units were keyed through the run context).
    assert run_pipeline(_pipeline(tmp_path), out) == 1
    assert load(out / "report.json").model_dump()["stacks"] == report["stacks"]


def test_the_gate_accepts_a_plugin_metric_and_still_refuses_unknown_ones(tmp_path: Path) -> None:
    tiers = {"first_token_agreement": {"warn": 0.5, "fail": 0.1}}
    pipeline = load_pipeline(_pipeline(tmp_path, gate=tiers))
    assert pipeline.gate["first_token_agreement"].fail == 0.1
    with pytest.raises(ConfigError, match=r"gate.first_token_agreemnt is not a gated metric; did you mean"):
        load_pipeline(_pipeline(tmp_path, gate={"first_token_agreemnt": {"fail": 0.1}}))
    # Warn above fail is the right order for a smaller-is-worse metric; the reverse is refused.
    with pytest.raises(ConfigError, match=r"warn 0.1 must be above fail 0.5"):
        load_pipeline(_pipeline(tmp_path, gate={"first_token_agreement": {"warn": 0.1, "fail": 0.5}}))


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("plugin_instruments:Nope", r"has no attribute 'Nope'"),
        ("plugin_instruments:FirstTokenConfig", r"is not an instrument; a plug-in must subclass qualgate.Instrument"),
        ("fidelty", r"unknown field 'instruments.fidelty'; did you mean 'fidelity'\?"),
    ],
)
def test_a_wrong_instrument_name_is_one_clear_error(tmp_path: Path, key: str, message: str) -> None:
    path = _pipeline(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["instruments"] = {key: {"prompts": "evals/prompts/general.jsonl"}}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path)


def test_a_plugin_section_is_checked_by_its_own_config(tmp_path: Path) -> None:
    path = _pipeline(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["instruments"][PLUGIN] = {"promts": "x"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"unknown field 'instruments.{PLUGIN}.promts'; did you mean 'prompts'"):
        load_pipeline(path)
