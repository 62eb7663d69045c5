"""MLflow layout of the gate's statuses: inconclusive and error findings are visible apart from
degradation (tags, counts, n_needed), built from a hand-made report without any server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qualgate.gate import Finding, judge, verdict
from qualgate.tracking.layout import stack_spec


def _stack(findings: list[Finding]) -> dict[str, Any]:
    return {
        "name": "spec",
        "step": 3,
        "role": "ladder",
        "layers": [],
        "lossless": False,
        "instruments": {},
        "findings": [f.as_dict() for f in findings],
        "reasons": [f"{f.instrument}.{f.reason}" for f in findings if f.status != "pass"],
        **verdict(findings),
    }


def test_an_inconclusive_recovery_is_tagged_counted_and_its_n_needed_logged() -> None:
    # 192 flip-free documents at baseline accuracy 0.1875: lower bound 1 - (1 - 0.025^(1/192)) / 0.1875
    low = 1 - (1 - 0.025 ** (1 / 192)) / 0.1875
    recovery = judge(
        Finding("benchmarks.qg_next_name", "recovery", 1.0, low, 1.0, n=192, unit="documents", interval="zero-events"),
        0.9,
        0.8,
    )
    nan = judge(Finding("judge", "net_loss", float("nan"), float("nan"), float("nan"), cause="all unparsed"), 0.05, 0.1)
    spec = stack_spec(_stack([recovery, nan]), None, {"qualgate.run_uid": "u"})
    assert spec.tags["qualgate.verdict"] == "fail" and spec.tags["qualgate.measured"] == "fail"
    assert spec.tags["qualgate.inconclusive"] == "benchmarks.qg_next_name.recovery"
    metrics = {key: value for key, value, step in spec.metrics if step == 3}
    assert metrics["gate/findings_inconclusive"] == 1.0
    assert metrics["gate/findings_error"] == 1.0
    assert metrics["gate/findings_failed"] == 0.0  # the error is counted as an error, not as a failure
    # ln(0.025) / ln(1 - 0.1 * 0.1875) = 194.9 -> 195 documents
    assert metrics["gate/n_needed/benchmarks.qg_next_name.recovery"] == 195.0


def test_a_stack_warned_only_for_lack_of_samples_says_so_in_its_tags() -> None:
    kl = judge(Finding("fidelity", "kl_mean", 0.008, 0.004, 0.012, n=16, unit="chunks"), 0.01, 0.05)
    spec = stack_spec(_stack([kl]), None, {})
    assert (spec.tags["qualgate.verdict"], spec.tags["qualgate.measured"]) == ("warn", "pass")
    metrics = {key: value for key, value, _ in spec.metrics}
    assert metrics["gate/n_needed/fidelity.kl_mean"] == 64.0  # 16 x (0.004 / 0.002)^2


def test_a_ladder_without_fidelity_numbers_draws_no_waterfall_and_a_single_step_has_no_interaction(
    tmp_path: Path,
) -> None:
    from qualgate.tracking import plots

    row = {"stack": "w2", "step": 1, "layers": ["w2"]}
    empty = {"vs_baseline": None, "vs_previous": None, "interaction": None, "sum_of_singles": None}
    report = {"pipeline": "p", "compound": {"baseline": {"kl_mean": None}, "ladder": [{**row, "kl_mean": empty}]}}
    assert not plots.waterfall(report, "kl_mean", tmp_path / "none.png")  # no fidelity: nothing to draw
    assert not (tmp_path / "none.png").exists()
    scored = {"vs_baseline": 0.01, "vs_previous": 0.01, "interaction": None, "sum_of_singles": None}
    report = {"pipeline": "p", "compound": {"baseline": {"kl_mean": 0.0}, "ladder": [{**row, "kl_mean": scored}]}}
    assert plots.waterfall(report, "kl_mean", tmp_path / "one.png") and (tmp_path / "one.png").stat().st_size > 0
