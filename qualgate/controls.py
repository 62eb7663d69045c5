"""Control stacks: known-bad stacks a run must fail, so a pass means the instruments could have failed.

A gate that passes every stack says nothing when its instruments are blind: a judge that answers "tie"
to everything, a benchmark whose tasks the model never gets right, thresholds set too loose for this
model. A control is a stack built to be broken (2-bit weights, a draft accepted without verification),
listed under `controls:` with the instruments that must each fail it:

    controls:
      - {layers: [w2], must_fail: [fidelity, judge]}

It is measured like any stack, then judged the other way round: it is *caught* when its own verdict is
fail and every instrument in `must_fail` has a failing finding on it (any instrument, when the list is
empty). A caught control counts as pass in the run's verdict; a missed one fails the run (exit 1)
naming the instrument that did not see the damage. Its layers stay out of `stacks: auto`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qualgate.errors import ConfigError
from qualgate.registry import did_you_mean


class Control(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, description="the stack's name in the report (default: from its layers)")
    layers: list[str] = Field(min_length=1, description="layers of the pipeline, as in stacks")
    must_fail: list[str] = Field(
        default_factory=list, description="instruments that must each fail it (default: any one)"
    )


def check_controls(
    controls: list[Control],
    layers: dict[str, Any],
    stacks: list[tuple[str, ...]],
    instruments: dict[str, str | None],
    where: str,
) -> None:
    """Every control names known layers and instruments the pipeline runs (a `must_fail` on an
    instrument that never measures would be a control that can never be caught), and is no stack the
    run also gates (one stack cannot be both expected to pass and to fail)."""
    seen: dict[tuple[str, ...], int] = {}
    for i, control in enumerate(controls):
        chosen = tuple(control.layers)
        if chosen in stacks or chosen in seen:
            other = f"controls[{seen[chosen]}]" if chosen in seen else "a stack in stacks"
            raise ConfigError(
                f"{where}: controls[{i}].layers {list(chosen)} is also {other}; a control is a stack of its own "
                "(expected to fail): give it layers no other stack has"
            )
        seen[chosen] = i
        for name in control.layers:
            if name not in layers:
                raise ConfigError(
                    f"{where}: controls[{i}].layers names '{name}', which is not in layers; "
                    f"{did_you_mean(name, list(layers))}"
                )
        for name in control.must_fail:
            if name not in instruments:
                raise ConfigError(
                    f"{where}: controls[{i}].must_fail names '{name}', which this pipeline does not run; "
                    f"{did_you_mean(name, list(instruments))}"
                )
            label = instruments[name]
            if label is None:
                raise ConfigError(
                    f"{where}: controls[{i}].must_fail names '{name}', which gates nothing (it has no findings "
                    "to fail); name an instrument with gated metrics"
                )
            if label != name:
                raise ConfigError(
                    f"{where}: controls[{i}].must_fail names '{name}', whose findings are {label}'s; name {label}"
                )


def _family(finding: dict[str, Any]) -> str:
    """The instrument a finding belongs to (`benchmarks.qg_cloze` is the benchmarks instrument's)."""
    return str(finding["instrument"]).split(".", 1)[0]


def judge_control(stack: dict[str, Any], must_fail: list[str]) -> dict[str, Any]:
    """A finished control stack (verdict and findings as for any stack) judged as a control: its
    `verdict` becomes what it counts in the run (pass when caught, fail when missed); what it measured
    moves to `control.measured`."""
    # Measured past a fail tier: an inconclusive finding counted as fail by policy is no sighting.
    failed = [f for f in stack["findings"] if f["status"] == "fail"]
    failing = sorted({_family(f) for f in failed})
    measured = stack["verdict"]
    missed = [name for name in must_fail if name not in failing]
    if not must_fail and not failing:
        missed = ["any instrument"]
    caught = not missed
    if caught:
        reasons = []
    else:
        who = ", ".join(missed)
        reasons = [
            f"control.{who} did not fail this known-bad stack (measured {measured.upper()}): the instrument "
            "cannot see damage of this size at these thresholds, so its passes elsewhere in this run prove "
            "nothing; tighten its thresholds or enlarge its sample"
        ]
    return {
        **stack,
        "verdict": "pass" if caught else "fail",
        "measured": "pass" if caught else "fail",
        "inconclusive": [],
        "reasons": reasons,
        "control": {
            "expect": "fail",
            "caught": caught,
            "measured": measured,
            "must_fail": must_fail,
            "failed_by": failing,
            "missed": missed,
            "failing_reasons": [f"{f['instrument']}.{f['reason']}" for f in failed],
        },
    }


def control_label(stack: dict[str, Any]) -> str | None:
    """How a control's verdict reads in the tables (None: not a control)."""
    control = stack.get("control")
    if not control:
        return None
    return "FAIL as expected" if control["caught"] else f"MISSED ({control['measured'].upper()}, expected FAIL)"


def summary_lines(report: dict[str, Any]) -> list[str]:
    rows = [s for s in report["stacks"] if s.get("control")]
    if not rows:
        return []
    lines = [
        "",
        "### Controls (known-bad stacks the run must fail)",
        "",
        "| control | measured | must fail | failed by | caught |",
        "| --- | --- | --- | --- | --- |",
    ]
    for stack in rows:
        c = stack["control"]
        lines.append(
            f"| `{stack['name']}` | {c['measured'].upper()} | {', '.join(c['must_fail']) or 'any instrument'} | "
            f"{', '.join(c['failed_by']) or '-'} | {'yes' if c['caught'] else 'NO: ' + ', '.join(c['missed'])} |"
        )
    return lines


__all__ = ["Control", "check_controls", "control_label", "judge_control", "summary_lines"]
