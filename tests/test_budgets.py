"""Per-layer quality budgets: what each layer adds, paired per token, gated against its budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import pipeline_file, run_pipeline

from qualgate.cli import main

LAYERS = {
    "w4": {"kind": "weight_quant", "method": "rtn", "bits": 4, "group_size": 64},
    "kv": {"kind": "kv_quant", "method": "quanto", "bits": 2, "residual_length": 16},
}


def _with_budgets(tmp_path: Path, budgets: Any) -> Path:
    path = pipeline_file(tmp_path, LAYERS, tracking={"enabled": False})
    data = yaml.safe_load(path.read_text())
    data["gate"] = {"kl_mean": {"warn": 0.5, "fail": 1.0}, "budgets": budgets}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("budgets", "message"),
    [
        ({"kvv": {"kl_mean": 0.01}}, "gate.budgets.kvv names no layer; did you mean 'kv'?"),
        ({"kv": {"kl_maen": 0.01}}, "gate.budgets.kv.kl_maen cannot be budgeted; did you mean 'kl_mean'?"),
        ({"kv": {"kl_mean": -1}}, "gate.budgets.kv.kl_mean must be a number >= 0"),
    ],
)
def test_bad_budgets_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], budgets: Any, message: str
) -> None:
    assert main(["validate", str(_with_budgets(tmp_path, budgets))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err


@pytest.mark.slow
def test_an_exhausted_budget_names_the_layer_that_spent_it(tmp_path: Path) -> None:
    path = _with_budgets(tmp_path, {"w4": {"kl_mean": 1.0}, "kv": {"kl_mean": 1e-4, "same_top1": 0.5}})
    data = yaml.safe_load(path.read_text())
    data["claims"] = [  # claims ride along in the same run: they are reported, never gated
        {"stack": "w4g64", "metric": "kl_mean", "max": 1.0, "source": "vendor"},
        {"stack": "kv-int2-residual_length16", "metric": "same_top1", "min": 0.9999},
        {"stack": "w4g64", "metric": "benchmark_accuracy_drop", "max": 0.01},
    ]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "run"
    assert run_pipeline(path, out) == 1
    report = json.loads((out / "report.json").read_text())
    stacks = {s["name"]: s for s in report["stacks"]}
    step = stacks["w4g64+kv-int2-residual_length16"]
    assert step["verdict"] == "fail" and any(r.startswith("budget.kv.kl_mean upper bound") for r in step["reasons"])
    # Bits per stored element beside the layer's configuration (quanto: a scale and a zero point in
    # float32 per group of 64), whole in the report (a field named like a credential would be redacted).
    assert step["layers"][1]["storage_bits"] == {"keys": 3.0, "values": 3.0, "mean": 3.0, "full_precision_tokens": 16.0}
    rows = {row["metric"]: row for row in step["budgets"]}
    kl = rows["kl_mean"]
    assert kl["against"] == "w4g64" and kl["status"] == "fail"
    # Paired per token over the same tokens: the mean of the differences is the difference of the means.
    fidelity = {name: s["instruments"]["fidelity"]["kl_mean"]["value"] for name, s in stacks.items()}
    assert kl["increment"]["value"] == pytest.approx(fidelity["w4g64+kv-int2-residual_length16"] - fidelity["w4g64"])
    assert kl["increment"]["low"] < kl["increment"]["value"] < kl["increment"]["high"]
    alone = stacks["kv-int2-residual_length16"]["budgets"][0]
    assert alone["against"] == "base" and alone["layer"] == "kv"
    assert kl["single"]["value"] == pytest.approx(alone["increment"]["value"])
    assert kl["interaction"] == pytest.approx(kl["increment"]["value"] - kl["single"]["value"])
    assert rows["same_top1"]["status"] == "pass", "a generous budget is kept"
    w4 = stacks["w4g64"]["budgets"][0]
    assert w4["layer"] == "w4" and w4["against"] == "base" and w4["status"] == "pass"
    summary = (out / "summary.md").read_text()
    assert "### Layer budgets" in summary and "| `kv` | kl_mean | 0.0001 |" in summary
    junit = (out / "junit.xml").read_text()
    assert 'name="budget.kv.kl_mean"' in junit or "budget.kv.kl_mean" in junit
    from qualgate.tracking.layout import build_layout

    layout = build_layout(report, "uid")
    metrics = {s.stack["name"]: {key for key, _, _ in s.spec.metrics} for s in layout.stacks}
    assert {"budget/kv/kl_mean", "budget/kv/kl_mean_high"} <= metrics["w4g64+kv-int2-residual_length16"]
    claims = report["claims"]
    assert [c["verdict"] for c in claims] == ["holds", "refuted", "inconclusive"]
    assert claims[0]["measured"]["value"] == pytest.approx(fidelity["w4g64"]) and claims[0]["source"] == "vendor"
    assert "not measured" in claims[2]["reason"], "benchmarks are off in this pipeline"
    assert "### Claims checked on this domain" in summary and "**refuted**" in summary
    parent = {key: value for key, value, _ in layout.parent.metrics}
    assert parent["claims/0_kl_mean/verdict"] == 1 and parent["claims/1_same_top1/verdict"] == -1
    assert layout.parent.tags["qualgate.claims"] == "1 holds, 1 refuted, 1 inconclusive"
