"""junit.xml: one test case per gated finding, so CI systems list a run's findings as tests."""

from __future__ import annotations

import json
import re
from typing import Any
from xml.etree import ElementTree as ET

from qualgate.fmt import ICON

# XML 1.0 forbids most control characters even escaped; a reason quoting a model's output may hold them.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _XML_INVALID.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _cases(stack: dict[str, Any]) -> list[dict[str, Any]]:
    """A stack's JUnit cases as findings; a control's are whether each required instrument failed it."""
    control = stack.get("control")
    if not control:
        return list(stack["findings"])
    cases = []
    for name in control["must_fail"] or ["any instrument"]:
        caught = name not in control["missed"]
        reason = "failed this known-bad stack, as it must" if caught else "did not fail this known-bad stack"
        cases.append({"instrument": "control", "metric": name, "status": "pass" if caught else "fail",
                      "reason": f"{name} {reason}"})  # fmt: skip
    return cases


def junit(report: dict[str, Any]) -> str:
    """One test case per finding: fail -> <failure>, error (a non-finite gated value) -> <error>,
    inconclusive -> <skipped> (or <failure> when the policy counts it as fail), warn -> system-out.
    A control stack is one case per instrument that must fail it: <failure> when it did not."""
    cases = [(stack, f) for stack in report["stacks"] for f in _cases(stack)]

    def kind(f: dict[str, Any]) -> str:
        status, gated = f["status"], f.get("gated", f["status"])
        if status == "error":
            return "error"
        if status == "fail" or gated == "fail":
            return "failure"
        return "skipped" if status == "inconclusive" else status

    kinds = [kind(f) for _, f in cases]
    suite = ET.Element(
        "testsuite",
        name=_xml_text(f"qualgate.{report['pipeline']}"),
        tests=str(len(cases)),
        failures=str(kinds.count("failure")),
        errors=str(kinds.count("error")),
        skipped=str(kinds.count("skipped")),
    )
    for (stack, finding), what in zip(cases, kinds, strict=True):
        case = ET.SubElement(
            suite,
            "testcase",
            classname=_xml_text(f"qualgate.{report['pipeline']}.{stack['name']}"),
            name=_xml_text(f"{finding['instrument']}.{finding['metric']}"),
        )
        message = _xml_text(f"{ICON[finding['status']]}: {finding['reason']}")
        if what in ("failure", "error"):
            ET.SubElement(case, what, message=message).text = json.dumps(finding)  # ASCII: \u escapes
        elif what == "skipped":
            ET.SubElement(case, "skipped", message=message)
        elif what == "warn":
            ET.SubElement(case, "system-out").text = message
    root = ET.Element("testsuites")
    root.append(suite)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


__all__ = ["junit"]
