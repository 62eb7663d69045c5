"""What a finished run looks like in MLflow, computed from report.json alone (no MLflow import here).
Each instrument says how its section is logged (Instrument.mlflow_metrics and mlflow_params).

One parent run per `qualgate run`, one child per stack. Metric names use `/` (`fidelity/kl_mean`,
`equivalence/real_divergences`, `compound/kl_mean_vs_baseline`): MLflow's UI groups charts by the part
before the first `/`, which dots would not give. Every interval is logged as `<name>_low`/`<name>_high`
beside its value. A stack's metrics are logged at step = its ladder position, and the parent carries
the ladder series (`ladder/...` at steps 0..n), so MLflow's line charts draw compound degradation.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from qualgate.claims import mlflow_metrics as claim_metrics
from qualgate.instruments.base import Instrument, numeric_leaves, publishers

# MLflow limits: keys <= 250 chars, param values <= 6,000, tag values kept well under that.
MAX_VALUE = 5000
COMPOUND_PARTS = ("vs_baseline", "vs_previous", "interaction", "sum_of_singles")
VERDICT_LEVEL = {"pass": 0, "warn": 1, "fail": 2}


@dataclass
class RunSpec:
    name: str
    tags: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)
    # (key, value, step); NaN/inf are dropped: MLflow stores them but its charts and filters choke.
    metrics: list[tuple[str, float, int]] = field(default_factory=list)

    def metric(self, key: str, value: Any, step: int = 0) -> None:
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(value):
            self.metrics.append((key, float(value), step))


@dataclass
class StackRun:
    spec: RunSpec
    stack: dict[str, Any]


@dataclass
class RunLayout:
    parent: RunSpec
    stacks: list[StackRun]


def short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def layer_params(stack: dict[str, Any]) -> dict[str, str]:
    """`layers.<name>.<field>` for every layer field, plus the stack's shape."""
    params = {
        "stack.layers": ",".join(layer["name"] for layer in stack["layers"]) or "(baseline)",
        "stack.role": stack["role"],
        "stack.lossless": str(stack["lossless"]).lower(),
    }
    for layer in stack["layers"]:
        for key, value in sorted(layer.items()):
            if key != "name":
                params[f"layers.{layer['name']}.{key}"] = short(value)
    return params


def stack_spec(
    stack: dict[str, Any],
    compound_row: dict[str, Any] | None,
    common: dict[str, str],
    instruments: list[type[Instrument[Any]]] | None = None,
) -> RunSpec:
    step = int(stack["step"])
    spec = RunSpec(
        name=stack["name"],
        tags={
            **common,
            "qualgate.kind": "stack",
            "qualgate.stack": stack["name"],
            "qualgate.verdict": stack["verdict"],
            # What was measured without the inconclusive findings, and those by name.
            "qualgate.measured": stack.get("measured", stack["verdict"]),
            "qualgate.inconclusive": short(", ".join(stack.get("inconclusive", [])) or "-"),
            "qualgate.reasons": short("; ".join(stack["reasons"]) or "-"),
        },
        params=layer_params(stack),
    )
    if stack.get("control"):  # a known-bad stack: its verdict above is what it counts in the run
        control = stack["control"]
        spec.tags["qualgate.control"] = "caught" if control["caught"] else "missed"
        spec.tags["qualgate.control.measured"] = control["measured"]
        spec.tags["qualgate.control.missed"] = ", ".join(control["missed"]) or "-"
    known = {cls.name: cls for cls in (publishers({}) if instruments is None else instruments)}
    for name, section in stack["instruments"].items():
        kind = known.get(name)
        # A section no instrument here can read (a plug-in that no longer imports): its numbers, plainly.
        pairs = kind.mlflow_metrics(section) if kind else numeric_leaves(name, section)
        for key, value in pairs:
            spec.metric(key, value, step)
        for key, value in (kind.mlflow_params(section) if kind else {}).items():
            spec.params[key] = short(value)
    if compound_row:
        for metric in ("kl_mean", "ln_ppl_ratio", "top1_loss"):
            for part in COMPOUND_PARTS:
                spec.metric(f"compound/{metric}_{part}", compound_row[metric].get(part), step)
    for row in stack.get("budgets", []):
        spec.metric(f"budget/{row['layer']}/{row['metric']}", row["increment"]["value"], step)
        spec.metric(f"budget/{row['layer']}/{row['metric']}_high", row["increment"].get("high"), step)
    spec.metric("gate/level", VERDICT_LEVEL[stack["verdict"]], step)
    spec.metric("gate/findings_failed", sum(f["status"] == "fail" for f in stack["findings"]), step)
    spec.metric("gate/findings_warned", sum(f["status"] == "warn" for f in stack["findings"]), step)
    spec.metric("gate/findings_inconclusive", sum(f["status"] == "inconclusive" for f in stack["findings"]), step)
    spec.metric("gate/findings_error", sum(f["status"] == "error" for f in stack["findings"]), step)
    for f in stack["findings"]:
        if f.get("n_needed") is not None:
            spec.metric(f"gate/n_needed/{f['instrument']}.{f['metric']}", f["n_needed"], step)
    return spec


def build_layout(report: dict[str, Any], run_uid: str, placement: dict[str, Any] | None = None) -> RunLayout:
    """`placement`: where each stack ran (the run directory's executor.json), tagged on the runs."""
    provenance = report["provenance"]
    git = provenance.get("git") or {}
    golden = provenance.get("golden") or {}
    common = {"qualgate.run_uid": run_uid, "qualgate.pipeline": report["pipeline"]}
    parent = RunSpec(
        name=f"{report['pipeline']} {run_uid[:8]}",
        tags={
            **common,
            "qualgate.kind": "run",
            "qualgate.verdict": report["verdict"],
            "qualgate.measured": report.get("measured", report["verdict"]),
            "qualgate.inconclusive_policy": str(report.get("gate_policy", {}).get("inconclusive", "warn")),
            "qualgate.reasons": short("; ".join(report["reasons"]) or "-"),
            "qualgate.version": str(provenance.get("qualgate")),
            "git.commit": str(git.get("commit")),
            "git.dirty": str(git.get("dirty")).lower(),
            "model.path": str(provenance["model"].get("path")),
            "model.sha256": digest(provenance.get("model_files")),
            "golden.sha256": digest(golden) if golden else "-",
            "report.sha256": digest(report),
        },
        params={
            "pipeline": report["pipeline"],
            "backend": str(provenance.get("backend")),
            "model.path": str(provenance["model"].get("path")),
            "model.dtype": str(provenance["model"].get("dtype")),
            "stacks": str(len(report["stacks"])),
        },
    )
    if git.get("commit"):
        parent.tags["mlflow.source.git.commit"] = str(git["commit"])  # shown by MLflow's run page
    if golden:
        parent.params["golden.top_k"] = str(golden.get("fidelity", {}).get("top_k"))
        parent.params["golden.n_tokens"] = str(golden.get("n_tokens"))
    compound = report.get("compound") or {}
    rows = {row["stack"]: row for row in compound.get("ladder", [])}
    baseline = compound.get("baseline") or {}
    for metric, value in baseline.items():
        parent.metric(f"ladder/{metric}", value, 0)
    for row in compound.get("ladder", []):
        for metric in ("kl_mean", "ln_ppl_ratio", "top1_loss"):
            parent.metric(f"ladder/{metric}", row[metric]["vs_baseline"], row["step"])
            parent.metric(f"ladder/{metric}_interaction", row[metric]["interaction"], row["step"])
    for verdict in VERDICT_LEVEL:
        parent.metric(f"stacks/{verdict}", sum(s["verdict"] == verdict for s in report["stacks"]))
    parent.metric("gate/level", VERDICT_LEVEL[report["verdict"]])
    parent.metric("gate/findings_inconclusive", report.get("inconclusive", 0))
    claims = report.get("claims", [])
    for key, value in claim_metrics(claims):
        parent.metric(key, value)
    if claims:
        counts = {v: sum(c["verdict"] == v for c in claims) for v in ("holds", "refuted", "inconclusive")}
        parent.tags["qualgate.claims"] = ", ".join(f"{n} {v}" for v, n in counts.items())
    instruments = publishers(report)
    stacks = [
        StackRun(stack_spec(stack, rows.get(stack["name"]), common, instruments), stack) for stack in report["stacks"]
    ]
    if placement:
        parent.tags["qualgate.executor"] = str(placement.get("executor"))
        for run in stacks:
            run.spec.tags["qualgate.executor"] = str(placement.get("executor"))
            where = placement.get("stacks", {}).get(run.spec.name, {})
            node = " ".join(str(where[k]) for k in ("node", "host") if k in where)
            run.spec.tags["qualgate.node"] = short(node or "-")
    return RunLayout(parent, stacks)
