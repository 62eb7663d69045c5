"""Publish a report: report.json, summary.md (and $GITHUB_STEP_SUMMARY), junit.xml, a terminal table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from qualgate import report_model
from qualgate.claims import summary_lines as claim_lines
from qualgate.controls import control_label
from qualgate.controls import summary_lines as control_lines
from qualgate.errors import ConfigError
from qualgate.fmt import ICON, fmt, interval
from qualgate.fsio import atomic_write_text, write_failure
from qualgate.instruments.base import publishers
from qualgate.junit import junit

GITHUB_SUMMARY_LIMIT = 1 << 20  # GitHub drops step summaries over 1 MiB


def verdict_label(result: dict[str, Any]) -> str:
    """A report's or a stack's verdict, with what came only from inconclusive findings said apart:
    "WARN (inconclusive)" is a lack of samples under the policy, not measured degradation."""
    control = control_label(result)
    if control is not None:
        return control
    label = ICON[result["verdict"]]
    inconclusive = result.get("inconclusive") or []
    count = inconclusive if isinstance(inconclusive, int) else len(inconclusive)
    if not count:
        return label
    if result.get("measured", result["verdict"]) != result["verdict"]:
        return f"{label} (inconclusive)"
    return f"{label} ({count} inconclusive)"


def _metric_cell(finding: dict[str, Any]) -> str:
    interval = "" if finding["low"] is None else f" [{fmt(finding['low'])}, {fmt(finding['high'])}]"
    return f"{fmt(finding['value'])}{interval}"


def _worst_recovery(stack: dict[str, Any]) -> str:
    """The benchmark task whose recovery interval reaches lowest, as `task value [low, high]`."""
    found = [f for f in stack["findings"] if f["metric"] == "recovery"]
    if not found:
        return "-"
    worst = min(found, key=lambda f: f["pessimistic"])
    return f"{worst['instrument'].removeprefix('benchmarks.')} {_metric_cell(worst)}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"## qualgate: {report['pipeline']} — {verdict_label(report)}", ""]
    lines += [
        "| stack | verdict | KL mean [95%] | same top-1 [95%] | PPL ratio [95%] | real divergences | "
        "worst recovery [95%] | reasons |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stack in report["stacks"]:
        cells = {f["metric"]: _metric_cell(f) for f in stack["findings"]}
        lines.append(
            f"| `{stack['name']}` | {verdict_label(stack)} | {cells.get('kl_mean', '-')} | "
            f"{cells.get('same_top1', '-')} | {cells.get('ppl_ratio', '-')} | "
            f"{cells.get('real_divergences', '-')} | {_worst_recovery(stack)} | {'; '.join(stack['reasons']) or '-'} |"
        )
    compound = report["compound"]
    if compound["ladder"]:
        lines += [
            "",
            "### Compound degradation (ladder)",
            "",
            "| step | stack | KL vs base | KL vs previous | KL interaction | ln PPL ratio vs base | "
            "top-1 loss vs base |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in compound["ladder"]:
            lines.append(
                f"| {row['step']} | `{row['stack']}` | {fmt(row['kl_mean']['vs_baseline'])} | "
                f"{fmt(row['kl_mean']['vs_previous'])} | {fmt(row['kl_mean']['interaction'])} | "
                f"{fmt(row['ln_ppl_ratio']['vs_baseline'])} | {fmt(row['top1_loss']['vs_baseline'])} |"
            )
    lines += _budget_lines(report)
    lines += control_lines(report)
    lines += claim_lines(report.get("claims", []))
    lines += _inconclusive_lines(report)
    for instrument in publishers(report):
        lines += instrument.summary_lines(report)
    lines.append("")
    return "\n".join(lines)


def _budget_lines(report: dict[str, Any]) -> list[str]:
    """Each layer's budget against what it added: on the ladder (vs the step before) and alone."""
    rows = [(s["name"], row) for s in report["stacks"] for row in s.get("budgets", [])]
    if not rows:
        return []
    lines = [
        "",
        "### Layer budgets (what each layer adds, paired per token)",
        "",
        "| layer | metric | budget | stack | against | added [95%] | alone | interaction | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows:
        inc = row["increment"]
        added = fmt(inc["value"]) if inc.get("high") is None else interval(inc)
        alone = interval(row["single"]) if "single" in row else "-"
        lines.append(
            f"| `{row['layer']}` | {row['metric']} | {fmt(row['budget'])} | `{name}` | `{row['against']}` | "
            f"{added} | {alone} | {fmt(row.get('interaction'))} | {row['status']} |"
        )
    return lines


def _inconclusive_lines(report: dict[str, Any]) -> list[str]:
    """Findings whose point estimate is within the thresholds but whose interval is too wide to say so."""
    # A control's findings count only as caught or missed (the Controls table), never as warn.
    stacks = [s for s in report["stacks"] if not s.get("control")]
    rows = [(s["name"], f) for s in stacks for f in s["findings"] if f["status"] == "inconclusive"]
    if not rows:
        return []
    policy = report.get("gate_policy", {}).get("inconclusive", "warn")
    lines = [
        "",
        f"### Inconclusive: not enough samples to clear a threshold (counted as {policy})",
        "",
        "| stack | finding | value [95%] | warn / fail | sample | n needed at this rate |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in rows:
        lines.append(
            f"| `{name}` | {f['instrument']}.{f['metric']} | {_metric_cell(f)} | {fmt(f['warn'])} / "
            f"{fmt(f['fail'])} | {fmt(f.get('n'))} {f.get('unit', '')} | {fmt(f.get('n_needed'))} |"
        )
    return lines


def _finite(value: Any) -> Any:
    """The report with every non-finite number as null: JSON has no NaN, and a reader must not get one
    (the finding that holds it is an `error` whose reason says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


OUTPUTS = ("report.json", "summary.md", "junit.xml")


def write(report: dict[str, Any], out_dir: Path) -> None:
    """report.json, summary.md and junit.xml, each replaced atomically (never a torn or half-new set:
    report.json, the file that says the run finished, is written last)."""
    report = _finite(report)
    # A report qualgate built wrong is a bug (exit 4) and is never written: every report is valid.
    report_model.Report.model_validate(report)
    text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"
    for instrument in publishers(report):
        instrument.charts(report, out_dir)  # before summary.md, which links them
    summary = markdown(report)
    atomic_write_text(out_dir / "summary.md", summary)
    atomic_write_text(out_dir / "junit.xml", junit(report) + "\n")
    atomic_write_text(out_dir / "report.json", text)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        # GitHub's limit is in bytes, for the whole file: what earlier steps wrote counts too.
        path = Path(step_summary)
        room = max(0, GITHUB_SUMMARY_LIMIT - (path.stat().st_size if path.is_file() else 0))
        data = summary.encode("utf-8")[:room].decode("utf-8", errors="ignore")  # never half a character
        try:
            with open(step_summary, "a", encoding="utf-8") as fh:
                fh.write(data)
        except OSError as exc:
            raise write_failure(path, exc, len(data)) from None


def supersede(out_dir: Path) -> None:
    """Remove a previous run's outputs before this one measures: a run that dies must not leave the
    last run's PASS for `qualgate report` or a CI step to read as its own."""
    for name in OUTPUTS:
        try:
            (out_dir / name).unlink(missing_ok=True)
        except OSError as exc:
            raise write_failure(out_dir / name, exc) from None


def read(run_dir: Path) -> dict[str, Any]:
    """A finished run's report (through the typed model: any known version), or exit 2 naming the file
    and what to do."""
    path = run_dir / "report.json"
    if not path.is_file():
        if (run_dir / "records").is_dir():
            raise ConfigError(
                f"{path} does not exist: the run in {run_dir} has not finished (in progress, interrupted or "
                "failed); rerun the same qualgate run command to finish it"
            )
        raise ConfigError(f"{path} does not exist; run qualgate run --out {run_dir} first")
    data = report_model.load(path).model_dump()
    if data.get("claims") is None:
        del data["claims"]  # a pipeline without claims writes none; read back what was written
    return data


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Names and reasons are user text (a stack `awq[int4]`, a reason quoting `[/INST]`): never markup.
    table = Table(
        "stack",
        "role",
        "verdict",
        "KL mean [95%]",
        "same top-1 [95%]",
        "PPL ratio [95%]",
        "real div.",
        "worst recovery [95%]",
        title=Text(f"qualgate {report['pipeline']}: {verdict_label(report)}"),
    )
    for stack in report["stacks"]:
        cells = {f["metric"]: _metric_cell(f) for f in stack["findings"]}
        row = (
            stack["name"],
            stack["role"],
            verdict_label(stack),
            cells.get("kl_mean", "-"),
            cells.get("same_top1", "-"),
            cells.get("ppl_ratio", "-"),
            cells.get("real_divergences", "-"),
            _worst_recovery(stack),
        )
        table.add_row(*(Text(cell) for cell in row))
    console = Console(width=200)
    console.print(table)
    # Each finding under its own status, one line each (never wrapped: CI logs are grepped line by line):
    # an inconclusive recovery must not read as the stack's FAIL.
    for stack in report["stacks"]:
        if stack.get("control"):  # a known-bad stack: its fail is expected; one line says whether it came
            c = stack["control"]
            line = f"CONTROL {stack['name']}: {control_label(stack)}, failed by {', '.join(c['failed_by']) or 'none'}"
            line += "".join(f"; {r}" for r in stack["reasons"])
            console.print(line, markup=False, highlight=False, soft_wrap=True)
            continue
        for f in stack["findings"]:
            if f["status"] != "pass":
                line = f"{ICON[f['status']]} {stack['name']}: {f['instrument']}.{f['reason']}"
                console.print(line, markup=False, highlight=False, soft_wrap=True)
