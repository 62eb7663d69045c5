"""Publishing a report (qualgate/report.py): the verdict label, summary.md, junit.xml, the files `write`
puts down (and $GITHUB_STEP_SUMMARY, cut at its limit) and the terminal lines, on small report dicts built
by hand in the shape Runner.run returns. Every expected string is written out by hand. No model, no
fixture beyond pytest's own (fast; mutation-tested)."""

from __future__ import annotations

import json
import locale
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest

from qualgate import report
from qualgate.errors import ConfigError
from qualgate.gate import Finding, Policy, judge
from qualgate.instruments import Benchmarks, DecodePath, Equivalence, Fidelity, Judge
from qualgate.instruments.fidelity import instrument as fidelity_instrument
from qualgate.report_model import REPORT_VERSION

PIPELINE = "nightly"
NAN = float("nan")


def judged(finding: Finding, warn: float | None, fail: float | None, policy: Policy = "warn") -> dict[str, Any]:
    return judge(finding, warn, fail, policy).as_dict()


# The findings below, with what judge makes of them (tests/test_gate.py works these out).
# kl_mean 0.015 past warn 0.01, its bound 0.025 past fail 0.02: fail
KL_FAIL = judged(Finding("fidelity", "kl_mean", 0.015, 0.01, 0.025, n=16, unit="chunks"), 0.01, 0.02)
KL_FAIL_REASON = "kl_mean upper bound 0.025 crosses fail 0.02"
TOP1_PASS = judged(Finding("fidelity", "same_top1", 0.95, 0.94, 0.96, n=1000, unit="tokens"), 0.9, 0.8)
# recovery 0.97 within warn 0.95, its bound 0.93 past it: inconclusive, 50 * (0.04 / 0.02)^2 = 200
REC_INC_REASON = (
    "recovery 0.97 within thresholds, but its lower bound 0.93 crosses warn 0.95 for lack of samples "
    "(n_needed 200; have 50 documents)"
)
PPL_WARN = judged(Finding("fidelity", "ppl_ratio", 1.03, 1.01, 1.04, n=16, unit="chunks"), 1.02, 1.05)
PPL_WARN_REASON = "ppl_ratio upper bound 1.04 crosses warn 1.02"
DECODE_ERROR = judged(
    Finding("fidelity", "decode_kl_mean", NAN, NAN, NAN, n=8, unit="prompts", cause="no tokens decoded"), 0.05, 0.1
)
DECODE_ERROR_REASON = "decode_kl_mean value is nan: no tokens decoded; a gated value must be finite"
# kl_mean 0.00812345 within warn 0.01, its bound 0.012 past it: inconclusive,
# 16 * ((0.012 - 0.00812345) / (0.01 - 0.00812345))^2 = 16 * (0.00387655 / 0.00187655)^2 = 16 * 4.26747 = 68.28 -> 69
KL_INC_REASON = (
    "kl_mean 0.00812345 within thresholds, but its upper bound 0.012 crosses warn 0.01 for lack of samples "
    "(n_needed 69; have 16 chunks)"
)


def rec_inc(policy: Policy = "warn") -> dict[str, Any]:
    return judged(Finding("benchmarks.gsm8k", "recovery", 0.97, 0.93, 1.01, n=50, unit="documents"), 0.95, 0.9, policy)


def kl_inc(policy: Policy = "warn") -> dict[str, Any]:
    return judged(Finding("fidelity", "kl_mean", 0.00812345, 0.004, 0.012, n=16, unit="chunks"), 0.01, 0.02, policy)


def stack(
    name: str,
    findings: list[dict[str, Any]],
    verdict: str,
    measured: str,
    inconclusive: list[str],
    role: str = "candidate",
    step: int = 1,
) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "step": step,
        "verdict": verdict,
        "measured": measured,
        "inconclusive": inconclusive,
        "findings": findings,
        "reasons": [f"{f['instrument']}.{f['reason']}" for f in findings if f["status"] != "pass"],
        "instruments": {},
        "layers": [],
        "lossless": False,
    }


def make_report(
    stacks: list[dict[str, Any]], verdict: str, measured: str, inconclusive: int, policy: Policy = "warn"
) -> dict[str, Any]:
    return {
        "report_version": REPORT_VERSION,
        "pipeline": PIPELINE,
        "verdict": verdict,
        "measured": measured,
        "inconclusive": inconclusive,
        "gate_policy": {"inconclusive": policy},
        "reasons": [f"{s['name']}: {r}" for s in stacks for r in s["reasons"]],
        "stacks": stacks,
        "compound": {"metrics": ["kl_mean"], "baseline": {}, "ladder": [], "singles": []},
        "provenance": {"qualgate": "0.0.0"},
    }


def q4_report() -> dict[str, Any]:
    """One stack with a finding of every status (policy warn)."""
    findings = [KL_FAIL, TOP1_PASS, rec_inc(), PPL_WARN, DECODE_ERROR]
    return make_report(
        [stack("q4", findings, "fail", "fail", ["benchmarks.gsm8k.recovery"])], "fail", "fail", 1, "warn"
    )


def test_fixture_findings_have_the_statuses_the_tests_rely_on() -> None:
    assert (KL_FAIL["status"], KL_FAIL["reason"]) == ("fail", KL_FAIL_REASON)
    assert (TOP1_PASS["status"], TOP1_PASS["gated"]) == ("pass", "pass")
    assert (rec_inc()["status"], rec_inc()["gated"], rec_inc()["reason"]) == ("inconclusive", "warn", REC_INC_REASON)
    assert (rec_inc("fail")["gated"], rec_inc("pass")["gated"]) == ("fail", "pass")
    assert (PPL_WARN["status"], PPL_WARN["reason"]) == ("warn", PPL_WARN_REASON)
    assert (DECODE_ERROR["status"], DECODE_ERROR["gated"], DECODE_ERROR["reason"]) == (
        "error",
        "fail",
        DECODE_ERROR_REASON,
    )
    assert (kl_inc()["status"], kl_inc()["n_needed"], kl_inc()["reason"]) == ("inconclusive", 69, KL_INC_REASON)


# -- verdict_label -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("result", "label"),
    [
        ({"verdict": "pass"}, "PASS"),
        ({"verdict": "warn"}, "WARN"),
        ({"verdict": "fail"}, "FAIL"),
        ({"verdict": "fail", "measured": "fail", "inconclusive": []}, "FAIL"),
        ({"verdict": "warn", "measured": "warn", "inconclusive": 0}, "WARN"),
        ({"verdict": "pass", "inconclusive": None}, "PASS"),
        # the warn came only from an inconclusive finding: a lack of samples, not measured degradation
        ({"verdict": "warn", "measured": "pass", "inconclusive": ["benchmarks.gsm8k.recovery"]}, "WARN (inconclusive)"),
        ({"verdict": "fail", "measured": "warn", "inconclusive": ["judge.net_loss"]}, "FAIL (inconclusive)"),
        # measured as bad as the verdict: the inconclusive ones are counted beside it
        ({"verdict": "warn", "measured": "warn", "inconclusive": ["a.b"]}, "WARN (1 inconclusive)"),
        ({"verdict": "pass", "measured": "pass", "inconclusive": ["a.b", "c.d"]}, "PASS (2 inconclusive)"),
        # no "measured" (an older report): the verdict stands for it
        ({"verdict": "fail", "inconclusive": ["a.b", "c.d", "e.f"]}, "FAIL (3 inconclusive)"),
        # the report level counts its inconclusive findings as an int
        ({"verdict": "warn", "measured": "pass", "inconclusive": 2}, "WARN (inconclusive)"),
        ({"verdict": "pass", "measured": "pass", "inconclusive": 3}, "PASS (3 inconclusive)"),
        ({"verdict": "fail", "measured": "fail", "inconclusive": 1}, "FAIL (1 inconclusive)"),
    ],
)
def test_verdict_label(result: dict[str, Any], label: str) -> None:
    assert report.verdict_label(result) == label


# -- junit ---------------------------------------------------------------------------------------------
def parse_junit(xml: str) -> ET.Element:
    assert xml.startswith("<?xml version='1.0' encoding='utf-8'?>\n<testsuites>")
    root = ET.fromstring(xml)
    assert root.tag == "testsuites"
    assert len(root) == 1
    return root[0]


def counts(suite: ET.Element) -> tuple[str | None, ...]:
    return tuple(suite.get(k) for k in ("name", "tests", "failures", "errors", "skipped"))


def test_junit_one_case_per_finding_under_its_status() -> None:
    suite = parse_junit(report.junit(q4_report()))
    assert suite.tag == "testsuite"
    # 5 findings: fail -> failure, pass -> nothing, inconclusive (counted as warn) -> skipped,
    # warn -> system-out, error -> error
    assert counts(suite) == ("qualgate.nightly", "5", "1", "1", "1")
    cases = list(suite)
    assert [c.tag for c in cases] == ["testcase"] * 5
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("qualgate.nightly.q4", "fidelity.kl_mean"),
        ("qualgate.nightly.q4", "fidelity.same_top1"),
        ("qualgate.nightly.q4", "benchmarks.gsm8k.recovery"),
        ("qualgate.nightly.q4", "fidelity.ppl_ratio"),
        ("qualgate.nightly.q4", "fidelity.decode_kl_mean"),
    ]
    kl_case, top1_case, rec_case, ppl_case, decode_case = cases

    assert [child.tag for child in kl_case] == ["failure"]
    assert kl_case[0].attrib == {"message": f"FAIL: {KL_FAIL_REASON}"}
    assert json.loads(kl_case[0].text or "") == KL_FAIL

    assert len(top1_case) == 0 and top1_case.text is None

    assert [child.tag for child in rec_case] == ["skipped"]
    assert rec_case[0].attrib == {"message": f"INCONCLUSIVE: {REC_INC_REASON}"}
    assert rec_case[0].text is None

    assert [child.tag for child in ppl_case] == ["system-out"]
    assert ppl_case[0].attrib == {}
    assert ppl_case[0].text == f"WARN: {PPL_WARN_REASON}"

    assert [child.tag for child in decode_case] == ["error"]
    assert decode_case[0].attrib == {"message": f"ERROR: {DECODE_ERROR_REASON}"}
    carried = json.loads(decode_case[0].text or "")
    assert (carried["metric"], carried["status"], carried["gated"], carried["reason"]) == (
        "decode_kl_mean",
        "error",
        "fail",
        DECODE_ERROR_REASON,
    )


def test_junit_inconclusive_counted_as_fail_is_a_failure() -> None:
    findings = [rec_inc("fail"), TOP1_PASS]
    doc = make_report(
        [stack("kv8", findings, "fail", "pass", ["benchmarks.gsm8k.recovery"])], "fail", "pass", 1, "fail"
    )
    suite = parse_junit(report.junit(doc))
    assert counts(suite) == ("qualgate.nightly", "2", "1", "0", "0")
    rec_case = suite[0]
    assert (rec_case.get("classname"), rec_case.get("name")) == ("qualgate.nightly.kv8", "benchmarks.gsm8k.recovery")
    assert [child.tag for child in rec_case] == ["failure"]
    # the message keeps the finding's own status: a lack of samples, counted as fail by the policy
    assert rec_case[0].get("message") == f"INCONCLUSIVE: {REC_INC_REASON}"
    assert json.loads(rec_case[0].text or "")["gated"] == "fail"


def test_junit_inconclusive_counted_as_pass_is_still_skipped() -> None:
    doc = make_report(
        [stack("kv8", [rec_inc("pass")], "pass", "pass", ["benchmarks.gsm8k.recovery"])], "pass", "pass", 1
    )
    suite = parse_junit(report.junit(doc))
    assert counts(suite) == ("qualgate.nightly", "1", "0", "0", "1")
    assert [child.tag for child in suite[0]] == ["skipped"]
    assert suite[0][0].get("message") == f"INCONCLUSIVE: {REC_INC_REASON}"


def test_junit_counts_across_stacks() -> None:
    stacks = [
        stack("baseline", [], "pass", "pass", [], role="baseline", step=0),
        stack("q4", [KL_FAIL, TOP1_PASS], "fail", "fail", []),
        stack("q8", [KL_FAIL, DECODE_ERROR, DECODE_ERROR, rec_inc(), PPL_WARN], "fail", "fail", ["x.y"]),
    ]
    suite = parse_junit(report.junit(make_report(stacks, "fail", "fail", 1)))
    # 2 + 5 findings; failures: 2 kl_mean; errors: 2 decode; skipped: 1 recovery
    assert counts(suite) == ("qualgate.nightly", "7", "2", "2", "1")
    assert [c.get("classname") for c in suite] == ["qualgate.nightly.q4"] * 2 + ["qualgate.nightly.q8"] * 5


def test_junit_fail_status_is_a_failure_whatever_it_is_counted_as() -> None:
    # a finding built by hand with status fail but the default gated "pass", and one from an older report
    # without "gated": junit still reports both as failures
    by_hand = Finding("equivalence", "checks", 2.0, None, None, status="fail", reason="2 problems").as_dict()
    assert by_hand["gated"] == "pass"
    older = {k: v for k, v in KL_FAIL.items() if k != "gated"}
    older_warn = {k: v for k, v in PPL_WARN.items() if k != "gated"}
    doc = make_report([stack("q4", [by_hand, older, older_warn], "fail", "fail", [])], "fail", "fail", 0)
    suite = parse_junit(report.junit(doc))
    assert counts(suite) == ("qualgate.nightly", "3", "2", "0", "0")
    assert [[child.tag for child in case] for case in suite] == [["failure"], ["failure"], ["system-out"]]
    assert suite[0][0].get("message") == "FAIL: 2 problems"


def test_junit_of_a_passing_report_has_no_failures() -> None:
    doc = make_report([stack("baseline", [TOP1_PASS], "pass", "pass", [], role="baseline", step=0)], "pass", "pass", 0)
    suite = parse_junit(report.junit(doc))
    assert counts(suite) == ("qualgate.nightly", "1", "0", "0", "0")
    assert len(suite[0]) == 0


def test_junit_a_reason_with_xml_specials_round_trips() -> None:
    reason = "a < b & c > d, \"double\" and 'single' quotes, ]]> end of CDATA, &amp; literal\nsecond line\tand a tab"
    failed = Finding("equivalence", "checks", 1.0, None, None, None, 0, "fail", reason, gated="fail").as_dict()
    warned = Finding("judge", "net_loss", 0.1, 0.0, 0.2, status="warn", reason=reason, gated="warn").as_dict()
    doc = make_report([stack("odd <&> name", [failed, warned], "fail", "fail", [])], "fail", "fail", 0)
    suite = parse_junit(report.junit(doc))
    assert counts(suite) == ("qualgate.nightly", "2", "1", "0", "0")
    fail_case, warn_case = suite
    assert fail_case.get("classname") == "qualgate.nightly.odd <&> name"
    assert fail_case[0].get("message") == f"FAIL: {reason}"
    assert json.loads(fail_case[0].text or "")["reason"] == reason
    assert warn_case[0].tag == "system-out"
    assert warn_case[0].text == f"WARN: {reason}"


# -- markdown ------------------------------------------------------------------------------------------
TABLE_HEADER = (
    "| stack | verdict | KL mean [95%] | same top-1 [95%] | PPL ratio [95%] | real divergences | "
    "worst recovery [95%] | reasons |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |"
)
INCONCLUSIVE_HEADER = (
    "| stack | finding | value [95%] | warn / fail | sample | n needed at this rate |\n"
    "| --- | --- | --- | --- | --- | --- |"
)


def kv8_findings(policy: Policy) -> list[dict[str, Any]]:
    return [
        kl_inc(policy),
        TOP1_PASS,
        judged(Finding("fidelity", "ppl_ratio", 1.0123456, 1.001, 1.0151, n=16, unit="chunks"), 1.02, 1.05, policy),
        judged(Finding("equivalence", "real_divergences", 0.0, None, None), None, None, policy),
        # two tasks: the worst recovery is the one whose interval reaches lowest (gsm8k 0.951 < arc 0.96)
        judged(Finding("benchmarks.arc", "recovery", 0.99, 0.96, 1.02, n=80, unit="documents"), 0.95, 0.9, policy),
        judged(Finding("benchmarks.gsm8k", "recovery", 0.98, 0.951, 1.009, n=50, unit="documents"), 0.95, 0.9, policy),
    ]


def kv8_report(policy: Policy) -> dict[str, Any]:
    verdict = "pass" if policy == "pass" else policy
    stacks = [
        stack("baseline", [], "pass", "pass", [], role="baseline", step=0),
        stack("kv8", kv8_findings(policy), verdict, "pass", ["fidelity.kl_mean"]),
    ]
    return make_report(stacks, verdict, "pass", 1, policy)


# the cells of kv8 at 4 significant digits: 0.00812345 -> 0.008123, 1.0123456 -> 1.012, 1.0151 -> 1.015
KV8_CELLS = "0.008123 [0.004, 0.012] | 0.95 [0.94, 0.96] | 1.012 [1.001, 1.015] | 0 | gsm8k 0.98 [0.951, 1.009]"


@pytest.mark.parametrize(
    ("policy", "label"),
    [
        ("warn", "WARN (inconclusive)"),  # the warn came from the inconclusive finding alone
        ("pass", "PASS (1 inconclusive)"),  # counted as pass, shown beside it
    ],
)
def test_markdown_labels_a_verdict_that_came_from_an_inconclusive_finding(policy: Policy, label: str) -> None:
    expected = "\n".join(
        [
            f"## qualgate: nightly — {label}",
            "",
            TABLE_HEADER,
            "| `baseline` | PASS | - | - | - | - | - | - |",
            f"| `kv8` | {label} | {KV8_CELLS} | fidelity.{KL_INC_REASON} |",
            "",
            f"### Inconclusive: not enough samples to clear a threshold (counted as {policy})",
            "",
            INCONCLUSIVE_HEADER,
            "| `kv8` | fidelity.kl_mean | 0.008123 [0.004, 0.012] | 0.01 / 0.02 | 16 chunks | 69 |",
            "",
        ]
    )
    assert report.markdown(kv8_report(policy)) == expected


def test_markdown_inconclusive_policy_defaults_to_warn_and_unknown_sizes_show_a_dash() -> None:
    # no sample size: no n_needed either
    unknown = judged(Finding("judge", "net_loss", 0.05, -0.01, 0.12), 0.1, 0.2)
    assert (unknown["status"], unknown["n"], unknown["n_needed"]) == ("inconclusive", None, None)
    doc = make_report([stack("spec", [unknown], "warn", "pass", ["judge.net_loss"])], "warn", "pass", 1)
    del doc["gate_policy"]
    lines = report.markdown(doc).split("\n")
    assert "### Inconclusive: not enough samples to clear a threshold (counted as warn)" in lines
    assert lines[-2] == "| `spec` | judge.net_loss | 0.05 [-0.01, 0.12] | 0.1 / 0.2 | -  | - |"
    assert lines[4] == (
        "| `spec` | WARN (inconclusive) | - | - | - | - | - | judge.net_loss 0.05 within thresholds, but its upper "
        "bound 0.12 crosses warn 0.1 for lack of samples (n_needed unknown; no sample size recorded) |"
    )


def test_markdown_of_a_failing_stack_lists_its_reasons_and_no_inconclusive_section_without_one() -> None:
    findings = [KL_FAIL, TOP1_PASS, PPL_WARN]
    doc = make_report([stack("q4", findings, "fail", "fail", [])], "fail", "fail", 0)
    expected = "\n".join(
        [
            "## qualgate: nightly — FAIL",
            "",
            TABLE_HEADER,
            "| `q4` | FAIL | 0.015 [0.01, 0.025] | 0.95 [0.94, 0.96] | 1.03 [1.01, 1.04] | - | - | "
            f"fidelity.{KL_FAIL_REASON}; fidelity.{PPL_WARN_REASON} |",
            "",
        ]
    )
    assert report.markdown(doc) == expected


def test_markdown_inconclusive_row_of_a_finding_without_a_unit() -> None:
    older = {k: v for k, v in kl_inc().items() if k != "unit"}
    doc = make_report([stack("kv8", [older], "warn", "pass", ["fidelity.kl_mean"])], "warn", "pass", 1)
    lines = report.markdown(doc).split("\n")
    assert lines[-2] == "| `kv8` | fidelity.kl_mean | 0.008123 [0.004, 0.012] | 0.01 / 0.02 | 16  | 69 |"


def test_markdown_ladder_section() -> None:
    def deltas(vs_baseline: float | None, vs_previous: float | None, interaction: float | None) -> dict[str, Any]:
        return {
            "value": None,
            "vs_baseline": vs_baseline,
            "vs_previous": vs_previous,
            "sum_of_singles": None,
            "interaction": interaction,
        }

    ladder = [
        {
            "stack": "q4",
            "step": 1,
            "layers": ["q4"],
            "kl_mean": deltas(0.0123456, 0.0123456, None),
            "ln_ppl_ratio": deltas(0.0301, 0.0301, None),
            "top1_loss": deltas(0.05, 0.05, None),
        },
        {
            "stack": "q4+kv8",
            "step": 2,
            "layers": ["q4", "kv8"],
            "kl_mean": deltas(0.02, 0.0076544, -0.001),
            "ln_ppl_ratio": deltas(None, None, None),
            "top1_loss": deltas(0.07, 0.02, 0.005),
        },
    ]
    doc = make_report([stack("q4", [KL_FAIL], "fail", "fail", [])], "fail", "fail", 0)
    doc["compound"]["ladder"] = ladder
    expected = "\n".join(
        [
            "## qualgate: nightly — FAIL",
            "",
            TABLE_HEADER,
            f"| `q4` | FAIL | 0.015 [0.01, 0.025] | - | - | - | - | fidelity.{KL_FAIL_REASON} |",
            "",
            "### Compound degradation (ladder)",
            "",
            "| step | stack | KL vs base | KL vs previous | KL interaction | ln PPL ratio vs base | "
            "top-1 loss vs base |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            # 4 significant digits: 0.0123456 -> 0.01235, 0.0076544 -> 0.007654
            "| 1 | `q4` | 0.01235 | 0.01235 | - | 0.0301 | 0.05 |",
            "| 2 | `q4+kv8` | 0.02 | 0.007654 | -0.001 | - | 0.07 |",
            "",
        ]
    )
    assert report.markdown(doc) == expected


# -- write and read ------------------------------------------------------------------------------------
def test_write_puts_down_the_three_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    doc = kv8_report("warn")
    out = tmp_path / "run" / "nested"
    report.write(doc, out)
    assert sorted(p.name for p in out.iterdir()) == ["junit.xml", "report.json", "summary.md"]
    text = (out / "report.json").read_text(encoding="utf-8")
    assert json.loads(text) == doc
    # sorted keys, indented by two, one trailing newline
    assert text.startswith('{\n  "compound": {\n    "baseline": {},\n')
    assert text.endswith('\n  "verdict": "warn"\n}\n')
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert summary.startswith("## qualgate: nightly — WARN (inconclusive)\n\n| stack |")
    assert summary == report.markdown(doc)
    xml = (out / "junit.xml").read_text(encoding="utf-8")
    assert xml.endswith("</testsuites>\n")
    suite = parse_junit(xml)
    # 6 kv8 findings, the inconclusive kl_mean skipped
    assert counts(suite) == ("qualgate.nightly", "6", "0", "0", "1")
    assert report.read(out) == doc


def test_write_into_an_existing_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    (tmp_path / "report.json").write_text("stale", encoding="utf-8")
    report.write(q4_report(), tmp_path)
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))["verdict"] == "fail"


def test_write_appends_to_the_github_step_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = tmp_path / "step_summary.md"
    step.write_text("earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    doc = kv8_report("warn")
    report.write(doc, tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert len(summary) > 100
    assert step.read_text(encoding="utf-8") == "earlier step\n" + summary
    # a second run in the same job keeps both
    report.write(doc, tmp_path / "out2")
    assert step.read_text(encoding="utf-8") == "earlier step\n" + summary + summary


def test_write_cuts_the_step_summary_at_the_limit_in_bytes_for_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = tmp_path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    monkeypatch.setattr(report, "GITHUB_SUMMARY_LIMIT", 100)
    report.write(kv8_report("warn"), tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert len(summary) > 100  # summary.md itself is whole
    appended = step.read_bytes()
    # GitHub counts bytes: the title's em dash is 3 of them, so 100 bytes are 98 characters here
    assert len(appended) == 100 and appended == summary.encode("utf-8")[:100]
    assert len(appended.decode("utf-8")) == 98
    report.write(kv8_report("warn"), tmp_path / "out")  # the file is full: a second step adds nothing
    assert step.read_bytes() == appended


def test_write_counts_what_earlier_steps_wrote_and_never_cuts_a_character(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = tmp_path / "step_summary.md"
    step.write_bytes(b"x" * 14)  # 14 bytes already there: 6 left of 20
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    monkeypatch.setattr(report, "GITHUB_SUMMARY_LIMIT", 20)
    report.write(kv8_report("warn"), tmp_path / "out")
    assert step.read_bytes() == b"x" * 14 + b"## qua"
    step.write_bytes(b"x" * 10)
    monkeypatch.setattr(report, "GITHUB_SUMMARY_LIMIT", 33)  # 23 left: the em dash would be bytes 22-24
    report.write(kv8_report("warn"), tmp_path / "out")
    assert step.read_bytes() == b"x" * 10 + b"## qualgate: nightly "


def test_write_leaves_a_short_summary_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = tmp_path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    report.write(q4_report(), tmp_path / "out")
    assert step.read_text(encoding="utf-8") == (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")


def test_write_without_a_step_summary_writes_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    report.write(q4_report(), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", "")
    report.write(q4_report(), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_does_not_depend_on_the_locale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # summary.md (its title's dash), junit.xml (a stack name) and the step summary are not ASCII: under
    # LC_CTYPE=C they are still written as UTF-8
    step = tmp_path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    doc = make_report([stack("q4-ü", [KL_FAIL], "fail", "fail", [])], "fail", "fail", 0)
    previous = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
    except locale.Error:
        pytest.skip("no C locale")
    try:
        report.write(doc, tmp_path / "out")
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)
    summary = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert summary.startswith("## qualgate: nightly — FAIL\n")
    assert step.read_text(encoding="utf-8") == summary
    suite = parse_junit((tmp_path / "out" / "junit.xml").read_text(encoding="utf-8"))
    assert suite[0].get("classname") == "qualgate.nightly.q4-ü"
    assert report.read(tmp_path / "out")["stacks"][0]["name"] == "q4-ü"


def test_the_github_summary_limit_is_one_mebibyte() -> None:
    assert report.GITHUB_SUMMARY_LIMIT == 1024 * 1024


def test_read_of_a_missing_report_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as raised:
        report.read(missing)
    assert str(raised.value) == f"{missing / 'report.json'} does not exist; run qualgate run --out {missing} first"


# -- print_report --------------------------------------------------------------------------------------
@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich writes plain text to a captured stdout unless the environment forces a terminal."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


def table_rows(lines: list[str]) -> list[list[str]]:
    """The header and body rows of rich's table, cell by cell."""
    return [
        [cell.strip() for cell in line.split(sep)[1:-1]] for line in lines for sep in ("┃", "│") if line.startswith(sep)
    ]


def print_report_stacks() -> list[dict[str, Any]]:
    return [
        stack("baseline", [], "pass", "pass", [], role="baseline", step=0),
        stack("q4", [KL_FAIL, TOP1_PASS, rec_inc(), PPL_WARN, DECODE_ERROR], "fail", "fail", ["x.y"]),
        stack("kv8", kv8_findings("warn"), "warn", "pass", ["fidelity.kl_mean"], role="ladder", step=2),
    ]


@pytest.mark.usefixtures("plain")
def test_print_report_names_each_finding_under_its_own_status(capsys: pytest.CaptureFixture[str]) -> None:
    report.print_report(make_report(print_report_stacks(), "fail", "fail", 2))
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    assert lines[0].strip() == "qualgate nightly: FAIL (2 inconclusive)"
    # the stack's FAIL does not swallow the inconclusive recovery under it: each line says its own status
    assert lines[-5:] == [
        f"FAIL q4: fidelity.{KL_FAIL_REASON}",
        f"INCONCLUSIVE q4: benchmarks.gsm8k.{REC_INC_REASON}",
        f"WARN q4: fidelity.{PPL_WARN_REASON}",
        f"ERROR q4: fidelity.{DECODE_ERROR_REASON}",
        f"INCONCLUSIVE kv8: fidelity.{KL_INC_REASON}",
    ]
    # passing findings get no line of their own
    assert not any("within thresholds" in line and "same_top1" in line for line in lines)
    assert not any(line.startswith("PASS") for line in lines)
    assert table_rows(lines[:-5]) == [
        [
            "stack",
            "role",
            "verdict",
            "KL mean [95%]",
            "same top-1 [95%]",
            "PPL ratio [95%]",
            "real div.",
            "worst recovery [95%]",
        ],
        ["baseline", "baseline", "PASS", "-", "-", "-", "-", "-"],
        [
            "q4",
            "candidate",
            "FAIL (1 inconclusive)",
            "0.015 [0.01, 0.025]",
            "0.95 [0.94, 0.96]",
            "1.03 [1.01, 1.04]",
            "-",
            "gsm8k 0.97 [0.93, 1.01]",
        ],
        ["kv8", "ladder", "WARN (inconclusive)", *KV8_CELLS.split(" | ")],
    ]


def test_print_report_finding_lines_stay_plain_on_a_colour_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a forced colour terminal styles the table, never the finding lines (numbers are not highlighted)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    report.print_report(make_report(print_report_stacks(), "fail", "fail", 2))
    lines = capsys.readouterr().out.splitlines()
    assert any("\x1b[" in line for line in lines[:-5])
    assert lines[-5:] == [
        f"FAIL q4: fidelity.{KL_FAIL_REASON}",
        f"INCONCLUSIVE q4: benchmarks.gsm8k.{REC_INC_REASON}",
        f"WARN q4: fidelity.{PPL_WARN_REASON}",
        f"ERROR q4: fidelity.{DECODE_ERROR_REASON}",
        f"INCONCLUSIVE kv8: fidelity.{KL_INC_REASON}",
    ]


@pytest.mark.usefixtures("plain")
def test_print_report_of_a_passing_report_prints_only_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    doc = make_report([stack("baseline", [TOP1_PASS], "pass", "pass", [], role="baseline", step=0)], "pass", "pass", 0)
    report.print_report(doc)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].strip() == "qualgate nightly: PASS"
    assert table_rows(lines)[1:] == [["baseline", "baseline", "PASS", "-", "0.95 [0.94, 0.96]", "-", "-", "-"]]
    assert lines[-1].startswith("└")  # the table is the last thing printed


def test_junit_control_characters_are_shown_not_written() -> None:
    # XML 1.0 cannot carry \x1b even escaped: a reason quoting terminal output must still parse
    finding = judged(Finding("fidelity", "kl_mean", 0.03, 0.02, 0.04, cause="x"), 0.01, 0.02)
    finding["reason"] = "kl_mean \x1b[31mred\x1b[0m"
    doc = make_report([stack("st\x07ack", [finding], "fail", "fail", [])], "fail", "fail", 0)
    suite = parse_junit(report.junit(doc))
    case = suite.find("testcase")
    assert case is not None and case.get("classname") == "qualgate.nightly.st\\x07ack"
    failure = case.find("failure")
    assert failure is not None and failure.get("message") == "FAIL: kl_mean \\x1b[31mred\\x1b[0m"


def test_print_report_never_reads_names_or_reasons_as_markup(capsys: pytest.CaptureFixture[str]) -> None:
    finding = judged(Finding("fidelity", "kl_mean", 0.03, 0.02, 0.04), 0.01, 0.02)
    finding["reason"] = "kl_mean quoting [/INST] and [bold]x[/bold] " + "y" * 200
    doc = make_report([stack("awq[int4]", [finding], "fail", "fail", [])], "fail", "fail", 0)
    report.print_report(doc)
    out = capsys.readouterr().out
    assert "awq[int4]" in out
    # one line, unwrapped, markup kept as text
    assert f"FAIL awq[int4]: fidelity.kl_mean quoting [/INST] and [bold]x[/bold] {'y' * 200}\n" in out


# -- instrument sections of summary.md -----------------------------------------------------------------
# Each stack's `instruments` dict below is built by hand in the shape Runner.run stores it (pipeline.py):
# fidelity is _fidelity_view of the fidelity summary, benchmarks the Runner.benchmarks dict (its tasks
# TaskComparison.summary, or only accuracy_baseline for the unoptimized model), judge run_judge's summary,
# equivalence EquivalenceResult.summary and decode_path decode_path.summary. Only the keys the report reads
# (and a few neighbours) are filled in. Values carry more digits than the cells show, so the digit count of
# every cell is pinned: 4 significant digits by default, 2 for drift, tolerance, noise and decode KL, 3 for
# the median first divergence.
def estimate(value: float, low: float, high: float, se: float = 0.01) -> dict[str, float]:
    return {"value": value, "se": se, "low": low, "high": high}


def with_instruments(s: dict[str, Any], **instruments: Any) -> dict[str, Any]:
    s["instruments"] = instruments
    return s


def passing(name: str, role: str = "candidate") -> dict[str, Any]:
    return stack(name, [], "pass", "pass", [], role=role, step=0 if role == "baseline" else 1)


def task_summary(
    task: str,
    metric: str,
    n: int,
    baseline: float,
    candidate: float,
    recovery: dict[str, float],
    b: int,
    c: int,
    mcnemar_p: float,
    holm_p: float | None,
) -> dict[str, Any]:
    return {
        "task": task,
        "metric": metric,
        "n": n,
        "accuracy_baseline": estimate(baseline, baseline - 0.05, baseline + 0.05),
        "accuracy_candidate": estimate(candidate, candidate - 0.05, candidate + 0.05),
        "difference": estimate(candidate - baseline, -0.05, 0.05),
        "recovery": recovery,
        "flips_b": b,
        "flips_c": c,
        "flip_rate": (b + c) / n,
        "mcnemar_p": mcnemar_p,
        "holm_p": holm_p,
    }


# the unoptimized model's own benchmark entry: accuracy only, no recovery (never a row)
BASELINE_BENCH = {
    "samples": "samples/benchmarks.base.json",
    "tasks": [{"task": "gsm8k", "metric": "exact_match", "n": 250, "accuracy_baseline": estimate(0.564, 0.5, 0.6)}],
    "flips": {},
}
Q4_BENCH = {
    "samples": "samples/benchmarks.q4.json",
    "tasks": [
        # 0.548 / 0.564 = 0.971631... -> 0.9716; 0.93512345 -> 0.9351; 1.0082345 -> 1.008
        task_summary(
            "gsm8k",
            "exact_match",
            250,
            0.564,
            0.548,
            estimate(0.9716312, 0.93512345, 1.0082345),
            9,
            5,
            0.42395996,
            0.84791992,
        ),
        # nothing flipped: p = 1 (shown as 1), no Holm p yet (-)
        task_summary("arc", "acc_norm", 1172, 0.5, 0.5, estimate(1.0, 0.97, 1.03), 0, 0, 1.0, None),
    ],
    "flips": {"gsm8k": {}, "arc": {}},
}
BENCH_HEADER = [
    "",
    "### Benchmarks (paired with the baseline, per document)",
    "",
    "| stack | task | accuracy baseline -> candidate | recovery [95%] | flips b / c | McNemar p (Holm) |",
    "| --- | --- | --- | --- | --- | --- |",
]
Q4_BENCH_ROWS = [
    "| `q4` | gsm8k (exact_match, n=250) | 0.564 -> 0.548 | 0.9716 [0.9351, 1.008] | 9 / 5 | 0.424 (0.8479) |",
    "| `q4` | arc (acc_norm, n=1172) | 0.5 -> 0.5 | 1 [0.97, 1.03] | 0 / 0 | 1 (-) |",
]


def test_benchmark_lines_one_row_per_compared_task() -> None:
    stacks = [
        with_instruments(passing("baseline", "baseline"), benchmarks=BASELINE_BENCH),
        with_instruments(passing("q4"), benchmarks=Q4_BENCH),
        with_instruments(passing("kv8"), fidelity={"top_k": 20}),  # no benchmarks at all
        with_instruments(passing("spec"), benchmarks={"samples": "x", "flips": {}}),  # no tasks list
        passing("empty"),
    ]
    del stacks[-1]["instruments"]  # a stack without an instruments entry
    assert Benchmarks.summary_lines(make_report(stacks, "pass", "pass", 0)) == BENCH_HEADER + Q4_BENCH_ROWS


def test_benchmark_lines_of_several_stacks_keep_their_order() -> None:
    q8_bench = {
        "tasks": [
            # 0.99999 -> 1; 0.123456789 -> 0.1235; 1e-05 -> 1e-05
            task_summary(
                "mmlu",
                "acc",
                14042,
                0.6543219,
                0.6543211,
                estimate(0.99999, 0.98765432, 1.0123456),
                120,
                121,
                1e-05,
                0.123456789,
            ),
        ]
    }
    stacks = [
        with_instruments(passing("q4"), benchmarks=Q4_BENCH),
        with_instruments(passing("q8"), benchmarks=q8_bench),
    ]
    assert Benchmarks.summary_lines(make_report(stacks, "pass", "pass", 0)) == [
        *BENCH_HEADER,
        *Q4_BENCH_ROWS,
        "| `q8` | mmlu (acc, n=14042) | 0.6543 -> 0.6543 | 1 [0.9877, 1.012] | 120 / 121 | 1e-05 (0.1235) |",
    ]


def test_benchmark_lines_without_any_compared_task_are_no_section() -> None:
    stacks = [with_instruments(passing("baseline", "baseline"), benchmarks=BASELINE_BENCH), passing("q4")]
    assert Benchmarks.summary_lines(make_report(stacks, "pass", "pass", 0)) == []
    assert Benchmarks.summary_lines(make_report([], "pass", "pass", 0)) == []


def pairwise(
    win: int, tie: int, loss: int, net: dict[str, float], consistency: float, length_delta: float
) -> dict[str, Any]:
    return {
        "n": win + tie + loss,
        "win": win,
        "tie": tie,
        "loss": loss,
        "unparsed": 0,
        "net_loss": net,
        "position_consistency": consistency,
        "length_delta": length_delta,
    }


def grades(mean_delta: dict[str, float], wilcoxon_p: float) -> dict[str, Any]:
    return {
        "n": 40,
        "unparsed": 0,
        "mean_baseline": 7.1,
        "mean_candidate": 7.0,
        "mean_delta": mean_delta,
        "wilcoxon_p": wilcoxon_p,
    }


CONTROL_REASON = "the baseline against its own words scrambled: net loss 0 [-0.1, 0.1] does not exclude 0"
CONSISTENCY_REASON = "position consistency 0.55 < 0.7: the verdicts follow the order"
# a judge that measured the answers: both protocols, a control it saw the damage in
SPEC_JUDGE = {
    "judge": {"model": "judge-7b"},
    "n_prompts": 40,
    # net loss (7 - 6) / 40 = 0.025; length delta -3.125 characters
    "pairwise": pairwise(6, 27, 7, estimate(0.025, -0.1, 0.15), 0.875, -3.125),
    "single": grades(estimate(-0.1, -0.3, 0.1), 0.31731051),
    "control": {**pairwise(0, 2, 38, estimate(0.95, 0.875, 1.0), 1.0, 0.0), "valid": True, "reason": "sees"},
    "unparseable": 0,
    "validity": {"valid": True, "reasons": []},
}
# a judge that follows the order, blind to its control's scrambled answers: the finding is void
BAD_JUDGE = {
    "judge": {"model": "judge-1b"},
    "n_prompts": 40,
    "pairwise": pairwise(2, 30, 8, estimate(0.15, 0.05, 0.25), 0.55123, 12.0),
    "control": {
        **pairwise(5, 30, 5, estimate(0.0, -0.1, 0.1), 0.6, 0.0),
        "valid": False,
        "reason": CONTROL_REASON,
    },
    "unparseable": 3,
    "validity": {"valid": False, "reasons": [CONTROL_REASON, CONSISTENCY_REASON]},
}
# single grades only, from a report written before validity was recorded
BARE_JUDGE = {"judge": {"model": "judge-7b"}, "n_prompts": 10, "single": grades(estimate(0.5, 0.1, 0.9), 1.0)}
JUDGE_HEADER = [
    "",
    "### Judge (pairwise in both orders; an order-dependent verdict is a tie)",
    "",
    "| stack | win / tie / loss | net loss [95%] | position consistency | length delta | single-grade delta "
    "(Wilcoxon p) | control / validity |",
    "| --- | --- | --- | --- | --- | --- | --- |",
]
JUDGE_ROWS = [
    "| `spec` | 6 / 27 / 7 | 0.025 [-0.1, 0.15] | 0.875 | -3.125 | -0.1 (0.3173) | sees damage |",
    "| `bad` | 2 / 30 / 8 | 0.15 [0.05, 0.25] | 0.5512 | 12 | - | BLIND — finding INVALID: "
    f"{CONTROL_REASON}; {CONSISTENCY_REASON} |",
    "| `bare` | - / - / - | - [-, -] | - | - | 0.5 (1) | - |",
]


def test_judge_lines_show_the_control_and_an_invalid_finding() -> None:
    stacks = [
        with_instruments(passing("baseline", "baseline")),
        with_instruments(passing("spec"), judge=SPEC_JUDGE),
        with_instruments(passing("bad"), judge=BAD_JUDGE),
        with_instruments(passing("q4"), fidelity={"top_k": 20}),
        with_instruments(passing("bare"), judge=BARE_JUDGE),
        passing("empty"),
    ]
    del stacks[-1]["instruments"]
    assert Judge.summary_lines(make_report(stacks, "pass", "pass", 0)) == JUDGE_HEADER + JUDGE_ROWS


def test_judge_lines_an_invalid_finding_without_a_control_and_with_one_reason() -> None:
    judge = {
        "pairwise": pairwise(0, 0, 0, estimate(NAN, NAN, NAN), NAN, NAN),
        "validity": {"valid": False, "reasons": ["position consistency nan < 0.7: the verdicts follow the order"]},
    }
    stacks = [with_instruments(passing("spec"), judge=judge)]
    assert Judge.summary_lines(make_report(stacks, "pass", "pass", 0)) == [
        *JUDGE_HEADER,
        "| `spec` | 0 / 0 / 0 | nan [nan, nan] | nan | nan | - | - — finding INVALID: position consistency nan < "
        "0.7: the verdicts follow the order |",
    ]


def test_judge_lines_without_a_judge_are_no_section() -> None:
    stacks = [with_instruments(passing("q4"), fidelity={"top_k": 20}), passing("kv8")]
    assert Judge.summary_lines(make_report(stacks, "pass", "pass", 0)) == []


NOISE_FLOOR = {
    "positions": 4096,
    "shapes": ["block 16", "block 64"],
    "logprob_delta": {"p50": 0.0004, "p99": 0.0021, "p99.9": 0.0030864, "max": 0.0042},
    "kl": None,
    "max_by_shape": {},
}
# a calibrated prefix-cache check: 29 of 30 runs exact, one near-tie; 12 of 30 lookups crossed a block
PREFIX_EQ = {
    "reference": "base",
    "candidate": "prefix",
    "samples": 30,
    "exact_match_rate": 29 / 30,
    "real_divergences": 0,
    "near_ties": 1,
    "prefix_logprob_drift": {"p50": 0.00012345, "p99": 0.0021234, "max": 0.0029876},
    "logprob_tolerance": 0.0123456,
    "tolerance": {
        "value": 0.0123456,
        "source": "calibrated",
        "factor": 4.0,
        "floor": 0.01,
        "noise_margin": 0.0084,
        "noise_floor": NOISE_FLOOR,
    },
    "coverage": {"block_size": 16, "lookups": 30, "crossed_differing_block": 12},
    "problems": [],
    "passed": True,
}
# the pipeline's own tolerance, no noise measured, no drift (no logprobs), no prefix cache
SPEC_EQ = {
    "reference": "base",
    "candidate": "spec",
    "samples": 8,
    "exact_match_rate": 1.0,
    "real_divergences": 0,
    "near_ties": 0,
    "prefix_logprob_drift": None,
    "logprob_tolerance": 0.05,
    "tolerance": {
        "value": 0.05,
        "source": "pipeline",
        "factor": 4.0,
        "floor": 0.01,
        "noise_margin": 0.1,
        "noise_floor": None,
    },
    "coverage": {},
}
# a report written before tolerance, drift and coverage were recorded
OLD_EQ = {"reference": "ref", "exact_match_rate": 0.5, "real_divergences": 3, "near_ties": 2, "logprob_tolerance": 0.1}
EQ_HEADER = [
    "",
    "### Lossless layers (greedy equivalence)",
    "",
    "| stack | reference | exact | real div. | near-ties | noise floor p99.9 | tolerance (source) | "
    "drift p50 / p99 / max | prefix coverage |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
EQ_ROWS = [
    # 29/30 = 96.67%; p99.9 0.0030864 -> 0.0031; 0.0123456 -> 0.012; drift 0.00012, 0.0021, 0.003
    "| `prefix` | `base` | 96.7% | 0 | 1 | 0.0031 | 0.012 (calibrated) | 0.00012 / 0.0021 / 0.003 | 12/30 |",
    "| `spec` | `base` | 100.0% | 0 | 0 | - | 0.05 (pipeline) | - | - |",
    "| `old` | `ref` | 50.0% | 3 | 2 | - | 0.1 (pipeline) | - | - |",
]


def test_equivalence_lines_tolerance_drift_and_coverage() -> None:
    stacks = [
        with_instruments(passing("baseline", "baseline")),
        with_instruments(passing("prefix"), equivalence=PREFIX_EQ),
        with_instruments(passing("q4"), fidelity={"top_k": 20}),
        with_instruments(passing("spec"), equivalence=SPEC_EQ),
        with_instruments(passing("old"), equivalence=OLD_EQ),
    ]
    assert Equivalence.summary_lines(make_report(stacks, "pass", "pass", 0)) == EQ_HEADER + EQ_ROWS


def test_equivalence_lines_a_noise_floor_without_logprob_deltas_and_a_tolerance_of_none() -> None:
    partial = {**OLD_EQ, "tolerance": {"source": "calibrated", "noise_floor": {"positions": 0}}}
    unset = {**OLD_EQ, "tolerance": None, "prefix_logprob_drift": {}, "coverage": None}
    stacks = [with_instruments(passing("a"), equivalence=partial), with_instruments(passing("b"), equivalence=unset)]
    assert Equivalence.summary_lines(make_report(stacks, "pass", "pass", 0)) == [
        *EQ_HEADER,
        "| `a` | `ref` | 50.0% | 3 | 2 | - | 0.1 (calibrated) | - | - |",
        "| `b` | `ref` | 50.0% | 3 | 2 | - | 0.1 (pipeline) | - | - |",
    ]


def test_equivalence_lines_without_an_equivalence_check_are_no_section() -> None:
    stacks = [with_instruments(passing("q4"), fidelity={"top_k": 20}), with_instruments(passing("kv8"))]
    assert Equivalence.summary_lines(make_report(stacks, "pass", "pass", 0)) == []


def decode_summary(
    kl: dict[str, float], same: float, exact: float, median: float | None, shape: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "prompts": 8,
        "steps": 512,
        "decode_kl_mean": kl,
        "decode_kl_max": 0.9,
        "decode_kl_by_step": [0.01, 0.02],
        "decode_same_top1": estimate(same, same - 0.01, min(same + 0.01, 1.0)),
        "exact_match_rate": exact,
        "first_divergence": {"diverged": 3, "min": 4, "median": median},
        "scoring": "serve: prefill prompt + decode 1",
        "shape": shape,
    }


# a KV layer with its shape dependence measured; median of an odd count of first divergences
KV8_DECODE = decode_summary(
    estimate(0.0123456, 0.0098765, 0.0154321),
    0.97123,
    0.625,
    1027.0,
    {**NOISE_FLOOR, "shape_kl": estimate(0.00123456, 0.00098765, 0.0015432)},
)
# a weight quantization (no KV layer: no shape), median of an even count
Q4_DECODE = decode_summary(estimate(0.25, 0.125, 0.375), 0.8, 0.0, 12.5, None)
# nothing diverged: no median
Q8_DECODE = decode_summary(estimate(0.0, 0.0, 0.0), 1.0, 1.0, None, None)
DECODE_HEADER = [
    "",
    "### Decode path (greedy continuations, one token at a time through the cache)",
    "",
    "| stack | per-step KL [95%] | same top-1 | exact continuations | first divergence (median) | shape KL [95%] |",
    "| --- | --- | --- | --- | --- | --- |",
]
DECODE_ROWS = [
    # 2 digits: 0.0123456 -> 0.012, 0.0098765 -> 0.0099, 0.0154321 -> 0.015; median 1027 at 3 digits -> 1.03e+03
    "| `kv8` | 0.012 [0.0099, 0.015] | 97.1% | 62.5% | 1.03e+03 | 0.0012 [0.00099, 0.0015] |",
    "| `q4` | 0.25 [0.12, 0.38] | 80.0% | 0.0% | 12.5 | - |",
    "| `q8` | 0 [0, 0] | 100.0% | 100.0% | - | - |",
]


def test_decode_path_lines_with_and_without_a_shape() -> None:
    stacks = [
        with_instruments(passing("baseline", "baseline")),
        with_instruments(passing("kv8"), decode_path=KV8_DECODE),
        with_instruments(passing("prefix"), equivalence=PREFIX_EQ),
        with_instruments(passing("q4"), decode_path=Q4_DECODE),
        with_instruments(passing("q8"), decode_path=Q8_DECODE),
    ]
    assert DecodePath.summary_lines(make_report(stacks, "pass", "pass", 0)) == DECODE_HEADER + DECODE_ROWS


def test_decode_path_lines_without_a_decode_path_are_no_section() -> None:
    stacks = [with_instruments(passing("prefix"), equivalence=PREFIX_EQ), with_instruments(passing("q4"))]
    assert DecodePath.summary_lines(make_report(stacks, "pass", "pass", 0)) == []


def fidelity(top_k: int, tail: float, kind: str | None, why: str | None = None) -> dict[str, Any]:
    """_fidelity_view's keys the note reads; kind None: a report from before kl_estimator was recorded."""
    view: dict[str, Any] = {"n_tokens": 4096, "top_k": top_k, "reference_tail_mass": tail, "merged_mass": 0.0}
    if kind is not None:
        view["kl_estimator"] = {"kind": kind, "tail_samples": 0 if kind == "bound" else 8, "sampling_se": 0.0}
        if why is not None:
            view["kl_estimator"]["why"] = why
    return view


HTTP_WHY = "the candidate engine returned only its own top-k"
TAIL_NOTE = (
    "of the reference's probability lies outside its top-20, so it may be understated by about that share: "
    "gate it with care, or score the stack in process against a golden with a tail sample."
)


def test_loose_bound_notes_name_every_bounded_stack_and_a_large_tail() -> None:
    stacks = [
        with_instruments(passing("baseline", "baseline")),
        # the first bounded stack gives k, the tail mass and why: 0.0612 -> 6%
        with_instruments(passing("vllm"), fidelity=fidelity(20, 0.0612, "bound", HTTP_WHY)),
        # a sampled tail is an estimate, whatever the tail mass
        with_instruments(passing("kv8"), fidelity=fidelity(5, 0.5, "sampled-tail")),
        with_instruments(passing("old"), fidelity=fidelity(10, 0.01, None)),
        with_instruments(passing("prefix"), equivalence=PREFIX_EQ),
        passing("empty"),
    ]
    del stacks[-1]["instruments"]
    assert Fidelity.summary_lines(make_report(stacks, "pass", "pass", 0)) == [
        "",
        f"> KL of `vllm`, `old` is a lower bound (top-20 plus one tail bucket: {HTTP_WHY}), not an estimate.",
        f"> 6% {TAIL_NOTE}",
    ]


@pytest.mark.parametrize(
    ("tail", "notes"),
    [
        (0.01, []),
        (0.05, []),  # at LOOSE_TAIL_MASS: not above it
        (0.0501, ["> 5% " + TAIL_NOTE]),
        (0.5, ["> 50% " + TAIL_NOTE]),
    ],
)
def test_loose_bound_notes_the_tail_line_only_above_the_loose_tail_mass(tail: float, notes: list[str]) -> None:
    assert fidelity_instrument.LOOSE_TAIL_MASS == 0.05
    # no kl_estimator (an older report): a bound from a golden without a tail sample
    stacks = [with_instruments(passing("q4"), fidelity=fidelity(20, tail, None))]
    assert Fidelity.summary_lines(make_report(stacks, "pass", "pass", 0)) == [
        "",
        "> KL of `q4` is a lower bound (top-20 plus one tail bucket: the golden has no tail sample), not an estimate.",
        *notes,
    ]


def test_loose_bound_notes_a_bound_without_a_why_and_an_estimator_without_a_kind() -> None:
    no_kind = fidelity(20, 0.01, None)
    no_kind["kl_estimator"] = {"tail_samples": 0}
    stacks = [with_instruments(passing("q4"), fidelity=no_kind)]
    assert Fidelity.summary_lines(make_report(stacks, "pass", "pass", 0)) == [
        "",
        "> KL of `q4` is a lower bound (top-20 plus one tail bucket: the golden has no tail sample), not an estimate.",
    ]


def test_loose_bound_notes_without_a_bounded_kl_are_none() -> None:
    stacks = [
        with_instruments(passing("kv8"), fidelity=fidelity(5, 0.5, "sampled-tail")),
        with_instruments(passing("q4"), fidelity={}),  # an empty fidelity view is no fidelity
        with_instruments(passing("prefix"), equivalence=PREFIX_EQ),
    ]
    assert Fidelity.summary_lines(make_report(stacks, "pass", "pass", 0)) == []
    assert Fidelity.summary_lines(make_report([], "pass", "pass", 0)) == []


def recovery(task: str, value: float, low: float, high: float) -> dict[str, Any]:
    return judged(Finding(f"benchmarks.{task}", "recovery", value, low, high, n=100, unit="documents"), 0.9, 0.8)


def test_worst_recovery_is_the_lowest_pessimistic_bound_across_tasks() -> None:
    findings = [
        recovery("arc", 0.99, 0.98, 1.0),
        # the worst: lowest lower bound, though neither the lowest value nor the widest interval
        recovery("gsm8k", 0.97123456, 0.91234567, 1.0345678),
        recovery("mmlu", 0.95, 0.93, 0.97),
        TOP1_PASS,  # not a recovery, though its lower bound is lower
        judged(Finding("benchmarks.hellaswag", "accuracy", 0.5, 0.4, 0.6), None, None),
    ]
    assert report._worst_recovery(stack("q4", findings, "pass", "pass", [])) == "gsm8k 0.9712 [0.9123, 1.035]"
    first = [findings[1], findings[0], findings[2]]
    assert report._worst_recovery(stack("q4", first, "pass", "pass", [])) == "gsm8k 0.9712 [0.9123, 1.035]"
    last = [findings[0], findings[2], findings[1]]
    assert report._worst_recovery(stack("q4", last, "pass", "pass", [])) == "gsm8k 0.9712 [0.9123, 1.035]"


def test_worst_recovery_without_a_recovery_finding_and_without_an_interval() -> None:
    assert report._worst_recovery(stack("q4", [TOP1_PASS, KL_FAIL], "fail", "fail", [])) == "-"
    assert report._worst_recovery(stack("q4", [], "pass", "pass", [])) == "-"
    # no interval: the value is the pessimistic end
    pointwise = [recovery("arc", 0.96, 0.95, 0.97), recovery("gsm8k", 0.955, NAN, NAN)]
    pointwise[1].update(low=None, high=None, pessimistic=0.955)
    assert report._worst_recovery(stack("q4", pointwise, "pass", "pass", [])) == "arc 0.96 [0.95, 0.97]"
    pointwise[1]["pessimistic"] = 0.9
    assert report._worst_recovery(stack("q4", pointwise, "pass", "pass", [])) == "gsm8k 0.955"


def test_markdown_puts_every_section_in_its_place() -> None:
    """The summary of a report with every instrument: the stack table, the ladder, then inconclusive,
    lossless, decode path, benchmarks, judge and the loose-bound note, in that order."""
    stacks = [
        with_instruments(passing("baseline", "baseline"), benchmarks=BASELINE_BENCH),
        with_instruments(
            stack("kv8", kv8_findings("warn"), "warn", "pass", ["fidelity.kl_mean"]),
            fidelity=fidelity(20, 0.0612, "bound", HTTP_WHY),
            decode_path=KV8_DECODE,
            benchmarks=Q4_BENCH,
        ),
        with_instruments(passing("prefix"), equivalence=PREFIX_EQ, judge=SPEC_JUDGE),
    ]
    doc = make_report(stacks, "warn", "pass", 1)
    doc["compound"]["ladder"] = [
        {
            "stack": "kv8",
            "step": 1,
            "layers": ["kv8"],
            "kl_mean": {"vs_baseline": 0.00812345, "vs_previous": 0.00812345, "interaction": None},
            "ln_ppl_ratio": {"vs_baseline": 0.0122701, "vs_previous": 0.0122701, "interaction": None},
            "top1_loss": {"vs_baseline": 0.05, "vs_previous": 0.05, "interaction": None},
        }
    ]
    expected = [
        "## qualgate: nightly — WARN (inconclusive)",
        "",
        TABLE_HEADER,
        "| `baseline` | PASS | - | - | - | - | - | - |",
        f"| `kv8` | WARN (inconclusive) | {KV8_CELLS} | fidelity.{KL_INC_REASON} |",
        "| `prefix` | PASS | - | - | - | - | - | - |",
        "",
        "### Compound degradation (ladder)",
        "",
        "| step | stack | KL vs base | KL vs previous | KL interaction | ln PPL ratio vs base | top-1 loss vs base |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| 1 | `kv8` | 0.008123 | 0.008123 | - | 0.01227 | 0.05 |",
        "",
        "### Inconclusive: not enough samples to clear a threshold (counted as warn)",
        "",
        INCONCLUSIVE_HEADER,
        "| `kv8` | fidelity.kl_mean | 0.008123 [0.004, 0.012] | 0.01 / 0.02 | 16 chunks | 69 |",
        "",
        f"> KL of `kv8` is a lower bound (top-20 plus one tail bucket: {HTTP_WHY}), not an estimate.",
        f"> 6% {TAIL_NOTE}",
        *DECODE_HEADER,
        DECODE_ROWS[0],
        *EQ_HEADER,
        EQ_ROWS[0],
        *BENCH_HEADER,
        *(row.replace("`q4`", "`kv8`") for row in Q4_BENCH_ROWS),
        *JUDGE_HEADER,
        JUDGE_ROWS[0].replace("`spec`", "`prefix`"),
        "",
    ]
    assert report.markdown(doc) == "\n".join(expected)


@pytest.mark.usefixtures("plain")
def test_print_report_table_is_never_wider_than_200_columns(capsys: pytest.CaptureFixture[str]) -> None:
    # CI logs are read at a fixed width: a long stack name is cut short in its cell (the finding line below
    # the table names it whole) instead of widening the table
    name = "awq-int4-" + "x" * 300
    doc = make_report([stack(name, [KL_FAIL], "fail", "fail", [])], "fail", "fail", 0)
    report.print_report(doc)
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line[:1] in "┏┃┡│└"]
    assert len(table) == 5 and {len(line) for line in table} == {200}
    cell = table_rows(table)[1][0]
    assert cell.endswith("…") and name.startswith(cell[:-1]) and len(cell) < 100
    assert lines[-1] == f"FAIL {name}: fidelity.{KL_FAIL_REASON}"


def test_markdown_of_a_stack_without_instruments_skips_every_instrument_section() -> None:
    # an older or hand-made report: a stack without the instruments key is a row, never a KeyError
    bare = {k: v for k, v in stack("bare", [], "pass", "pass", []).items() if k != "instruments"}
    text = report.markdown(make_report([bare], "pass", "pass", 0))
    assert "| `bare` | PASS |" in text
    assert "### Lossless layers" not in text and "### Decode path" not in text


def test_markdown_lists_each_budget_with_what_the_layer_added() -> None:
    step = stack("w4+kv", [], "fail", "fail", [])
    step["budgets"] = [
        {
            "layer": "kv",
            "metric": "kl_mean",
            "budget": 0.003,
            "against": "w4",
            "increment": {"value": 0.004, "low": 0.0035, "high": 0.0045},
            "single": {"value": 0.003, "low": 0.0025, "high": 0.0035},
            "interaction": 0.001,
            "status": "fail",
        },
        {
            "layer": "spec",
            "metric": "real_divergences",
            "budget": 0.0,
            "against": "w4+kv",
            "increment": {"value": 0.0, "low": None, "high": None},
            "status": "pass",
        },
    ]
    lines = report.markdown(make_report([step], "fail", "fail", 0)).split("\n")
    start = lines.index("### Layer budgets (what each layer adds, paired per token)")
    assert lines[start + 2 : start + 6] == [
        "| layer | metric | budget | stack | against | added [95%] | alone | interaction | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| `kv` | kl_mean | 0.003 | `w4+kv` | `w4` | 0.004 [0.0035, 0.0045] | 0.003 [0.0025, 0.0035] | 0.001 | fail |",
        "| `spec` | real_divergences | 0 | `w4+kv` | `w4+kv` | 0 | - | - | pass |",
    ]
    assert "### Layer budgets" not in report.markdown(q4_report()), "no budgets, no section"


def test_markdown_lists_the_claims_after_the_budgets() -> None:
    doc = make_report([stack("w4", [], "pass", "pass", [])], "pass", "pass", 0)
    doc["claims"] = [
        {
            "stack": "w4",
            "metric": "kl_mean",
            "bound": {"max": 0.01},
            "source": "vendor",
            "statement": "near-lossless",
            "measured": {"value": 0.004, "low": 0.003, "high": 0.005},
            "verdict": "holds",
            "n_needed": None,
            "reason": "",
        }
    ]
    lines = report.markdown(doc).split("\n")
    start = lines.index("### Claims checked on this domain")
    row = "| near-lossless: kl_mean <= 0.01 | vendor | `w4` | 0.004 [0.003, 0.005] | **holds** | - |"
    assert lines[start + 4] == row
    assert "### Claims" not in report.markdown(q4_report()), "no claims, no section"


def _control(caught: bool) -> dict[str, Any]:
    """A 2-bit control as the runner leaves it: its measured findings, its verdict as counted in the run."""
    from qualgate.controls import judge_control

    findings = [KL_FAIL, rec_inc()] if caught else [TOP1_PASS]
    measured = "fail" if caught else "pass"
    return judge_control({**stack("w2", findings, measured, measured, []), "role": "control"}, ["fidelity"])


def test_a_control_reads_as_caught_or_missed_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """Its FAIL is the pass the run wants: the tables say FAIL as expected, its inconclusive recovery is
    no warn of the run, and the terminal gives it one CONTROL line instead of its findings' lines."""
    caught, missed = _control(True), {**_control(False), "name": "w8"}
    assert (report.verdict_label(caught), report.verdict_label(missed)) == (
        "FAIL as expected",
        "MISSED (PASS, expected FAIL)",
    )
    doc = make_report([caught], "pass", "pass", 0)
    text = report.markdown(doc)
    assert "| `w2` | FAIL as expected |" in text and "### Inconclusive" not in text
    assert "| `w2` | FAIL | fidelity | fidelity | yes |" in text
    report.print_report(make_report([caught, missed], "fail", "fail", 0))
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    assert lines[-2] == "CONTROL w2: FAIL as expected, failed by fidelity"
    assert lines[-1].startswith("CONTROL w8: MISSED (PASS, expected FAIL), failed by none; control.fidelity did not")
    assert not any(line.startswith(("FAIL w2", "INCONCLUSIVE w2")) for line in lines)
