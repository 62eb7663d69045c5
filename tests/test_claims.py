"""Published claims checked against a run: holds / refuted / inconclusive with the sample that would
decide, by hand; pooled paired benchmark drops; one-line errors; the example pipeline validates."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO, pipeline_file

from qualgate.claims import Claim, judge_claim, judge_claims, measured, mlflow_metrics, summary_lines
from qualgate.cli import main
from qualgate.instruments.benchmarks.paired import paired_difference


def _claim(**kw: Any) -> Claim:
    return Claim(**{"stack": "s", "metric": "kl_mean", **kw})


def test_verdicts_by_hand() -> None:
    found = {"value": 0.004, "low": 0.003, "high": 0.005, "n": 16, "unit": "chunks", "interval": "normal"}
    assert judge_claim(_claim(max=0.006), found)["verdict"] == "holds"
    assert judge_claim(_claim(max=0.002), found)["verdict"] == "refuted"
    assert judge_claim(_claim(max=0.005), found)["verdict"] == "holds", "the bound itself is within"
    # The interval straddles 0.0045 with the estimate inside: to hold, the upper end (0.001 above the
    # value) must come within 0.0005 of it: n x (0.001 / 0.0005)^2 = 64 chunks.
    row = judge_claim(_claim(max=0.0045), found)
    assert row["verdict"] == "inconclusive" and row["n_needed"] == 64 and "have 16 chunks" in row["reason"]
    # ... with the estimate past it: to refute, the lower end must leave it: 16 x (0.001 / 0.0002)^2 = 400.
    assert judge_claim(_claim(max=0.0038), found)["n_needed"] == 400
    # min: claims (same-top-1 at least 0.95) mirror it.
    top1 = {"value": 0.96, "low": 0.95, "high": 0.97, "n": 4000, "unit": "tokens", "interval": "normal"}
    assert judge_claim(_claim(metric="same_top1", min=0.94), top1)["verdict"] == "holds"
    assert judge_claim(_claim(metric="same_top1", min=0.98), top1)["verdict"] == "refuted"
    assert judge_claim(_claim(metric="same_top1", min=0.955), top1)["n_needed"] == 16000
    # A count without an interval: the value decides.
    assert judge_claim(_claim(metric="real_divergences", max=0), {"value": 0.0})["verdict"] == "holds"
    assert judge_claim(_claim(metric="real_divergences", max=0), {"value": 2.0})["verdict"] == "refuted"
    missing = judge_claim(_claim(max=1), None)
    assert missing["verdict"] == "inconclusive" and "not measured" in missing["reason"]
    nan = judge_claim(_claim(max=1), {"value": math.nan, "low": None, "high": None})
    assert nan["verdict"] == "inconclusive" and "not finite" in nan["reason"]


def _section(*tasks: tuple[str, int, int, int, float]) -> dict[str, Any]:
    return {
        "tasks": [
            {"task": t, "flips_b": b, "flips_c": c, "n": n, "accuracy_baseline": {"value": acc}}
            for t, b, c, n, acc in tasks
        ]
    }


def test_benchmark_drops_are_pooled_paired_over_tasks() -> None:
    stack = {"name": "s", "instruments": {"benchmarks": _section(("a", 30, 10, 1000, 0.9), ("b", 5, 5, 200, 0.5))}}
    pooled = paired_difference(35, 15, 1200)  # candidate minus baseline
    base = (0.9 * 1000 + 0.5 * 200) / 1200
    drop = measured(stack, _claim(metric="benchmark_accuracy_drop", max=0.01))
    assert drop is not None and drop["value"] == pytest.approx(-pooled.value) and drop["n"] == 1200
    assert (drop["low"], drop["high"]) == pytest.approx((-pooled.high, -pooled.low))
    relative = measured(stack, _claim(metric="benchmark_relative_drop", max=0.01))
    assert relative is not None and relative["value"] == pytest.approx(-pooled.value / base)
    recovery = measured(stack, _claim(metric="recovery", min=0.99, task="b"))
    assert recovery is not None and recovery["value"] == pytest.approx(1.0) and recovery["n"] == 200
    # No flips at all: the exact zero-event bound, and the sample it would take to decide shrinks as 1/n.
    clean = {"name": "s", "instruments": {"benchmarks": _section(("a", 0, 0, 100, 0.9))}}
    row = judge_claims([_claim(metric="benchmark_accuracy_drop", max=0.01)], [clean])[0]
    assert str(row["measured"]["value"]) == "0.0", "never -0.0"
    assert row["measured"]["interval"] == "zero-events" and row["verdict"] == "inconclusive"
    assert 360 <= row["n_needed"] <= 370, "about 3.7 / 0.01 documents without a flip"


def test_summary_and_mlflow_rows() -> None:
    found = {"value": 0.004, "low": 0.003, "high": 0.005}
    rows = [
        judge_claim(_claim(max=0.006, source="vendor", statement="near-lossless"), found),
        judge_claim(_claim(max=0.002), found),
    ]
    lines = summary_lines(rows)
    assert lines[1] == "### Claims checked on this domain"
    assert "| near-lossless: kl_mean <= 0.006 | vendor | `s` | 0.004 [0.003, 0.005] | **holds** | - |" in lines
    assert "**refuted**" in lines[-1]
    metrics = dict(mlflow_metrics(rows))
    assert metrics["claims/0_kl_mean/verdict"] == 1 and metrics["claims/1_kl_mean/verdict"] == -1
    assert metrics["claims/1_kl_mean/high"] == 0.005


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ([{"stack": "w8g12", "metric": "kl_mean", "max": 0.01}], "claims[0].stack 'w8g12' is not a stack of this run"),
        ([{"stack": "w8g128", "metric": "kl_maen", "max": 0.01}], "claims[0].metric 'kl_maen' is not measured"),
        ([{"stack": "w8g128", "metric": "kl_mean", "max": 0.01, "task": "x"}], "claims[0].task is for benchmark"),
        ([{"stack": "w8g128", "metric": "kl_mean", "max": 0.01, "min": 0.0}], "give exactly one of max or min"),
        ([{"stack": "w8g128", "metric": "kl_mean"}], "give exactly one of max or min"),
        ([{"stack": "w8g128", "metric": "kl_mean", "max": 0.1, "sauce": "x"}], "sauce"),
    ],
)
def test_bad_claims_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], claims: Any, message: str
) -> None:
    path = pipeline_file(tmp_path, {"w8": {"kind": "weight_quant", "method": "rtn", "bits": 8}}, claims=claims)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err
    if "w8g12'" in message:
        assert "did you mean 'w8g128'" in err


def test_the_example_pipelines_validate(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The examples on the bundled models (those for real checkpoints: tests/test_examples.py)."""
    monkeypatch.chdir(REPO)
    for name in ("kv-methods", "turboquant-vs-awq"):
        assert main(["validate", str(REPO / "pipelines" / "examples" / f"{name}.yaml")]) == 0, capsys.readouterr().err
    example = yaml.safe_load((REPO / "pipelines" / "examples" / "turboquant-vs-awq.yaml").read_text())
    assert {c["stack"] for c in example["claims"]} >= {"kv-turboquant3", "w4g128"}
