"""What a finished run looks like in MLflow, computed from report.json alone (no MLflow import here).

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

# MLflow limits: keys <= 250 chars, param values <= 6,000, tag values kept well under that.
MAX_VALUE = 5000
ESTIMATES = ("kl_mean", "ppl_ratio", "ln_ppl_ratio", "same_top1")
FIDELITY_SCALARS = (
    "ppl_reference",
    "ppl_candidate",
    "dp_rms",
    "nll_correlation",
    "reference_tail_mass",
    "merged_mass",
    "n_tokens",
)
EQUIVALENCE_SCALARS = ("exact_match_rate", "real_divergences", "near_ties", "samples", "max_prefix_logprob_diff")
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


def bucket_key(bucket: str) -> str:
    """`[0.25,0.5)` -> `0.25-0.5`: MLflow keys allow only letters, digits, `_-. /`."""
    return bucket.strip("[]()").replace(",", "-")


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


def _estimates(spec: RunSpec, prefix: str, summary: dict[str, Any], step: int) -> None:
    for name in ESTIMATES:
        estimate = summary.get(name)
        if isinstance(estimate, dict):
            spec.metric(f"{prefix}/{name}", estimate.get("value"), step)
            spec.metric(f"{prefix}/{name}_low", estimate.get("low"), step)
            spec.metric(f"{prefix}/{name}_high", estimate.get("high"), step)


def _numeric_tree(spec: RunSpec, prefix: str, tree: dict[str, Any], step: int) -> None:
    for key, value in sorted(tree.items()):
        if isinstance(value, dict):
            _numeric_tree(spec, f"{prefix}/{key}", value, step)
        else:
            spec.metric(f"{prefix}/{key}", value, step)


def stack_spec(stack: dict[str, Any], compound_row: dict[str, Any] | None, common: dict[str, str]) -> RunSpec:
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
    fidelity = stack["instruments"].get("fidelity")
    if fidelity:
        _estimates(spec, "fidelity", fidelity, step)
        for name in FIDELITY_SCALARS:
            spec.metric(f"fidelity/{name}", fidelity.get(name), step)
        for name, value in fidelity.get("kl_percentiles", {}).items():
            spec.metric(f"fidelity/kl_{name}", value, step)
        for bucket in fidelity.get("kl_by_confidence", []):
            spec.metric(f"fidelity/kl_confidence_{bucket_key(bucket['bucket'])}", bucket["kl_mean"], step)
        spec.params["fidelity.top_k"] = str(fidelity.get("top_k"))
    equivalence = stack["instruments"].get("equivalence")
    if equivalence:
        for name in EQUIVALENCE_SCALARS:
            spec.metric(f"equivalence/{name}", equivalence.get(name), step)
        _numeric_tree(spec, "equivalence", equivalence.get("layer_stats", {}), step)
        _numeric_tree(spec, "equivalence/drift", equivalence.get("prefix_logprob_drift") or {}, step)
        tolerance = equivalence.get("tolerance") or {}
        spec.metric("equivalence/tolerance", equivalence.get("logprob_tolerance"), step)
        noise = (tolerance.get("noise_floor") or {}).get("logprob_delta") or {}
        _numeric_tree(spec, "equivalence/noise_floor", noise, step)
        if tolerance.get("source"):
            spec.params["equivalence.tolerance_source"] = str(tolerance["source"])
        coverage = equivalence.get("coverage") or {}
        spec.metric("equivalence/prefix_coverage", coverage.get("crossed_differing_block"), step)
        for group, stats in (equivalence.get("groups") or {}).items():
            _numeric_tree(spec, f"equivalence/group/{group.replace(':', '_')}", stats, step)
        spec.params["equivalence.reference"] = short(equivalence.get("reference"))
    decode = stack["instruments"].get("decode_path")
    if decode:
        for name in ("decode_kl_mean", "decode_same_top1"):
            for part, suffix in (("value", ""), ("low", "_low"), ("high", "_high")):
                spec.metric(f"decode_path/{name.removeprefix('decode_')}{suffix}", decode[name].get(part), step)
        spec.metric("decode_path/kl_max", decode.get("decode_kl_max"), step)
        spec.metric("decode_path/exact_match_rate", decode.get("exact_match_rate"), step)
        spec.metric("decode_path/first_divergence_median", decode["first_divergence"].get("median"), step)
        shape = decode.get("shape")
        if shape:
            for part, suffix in (("value", ""), ("low", "_low"), ("high", "_high")):
                spec.metric(f"decode_path/shape_kl{suffix}", shape["shape_kl"].get(part), step)
            _numeric_tree(spec, "decode_path/shape_logprob_delta", shape.get("logprob_delta") or {}, step)
    benchmarks = stack["instruments"].get("benchmarks")
    for task in (benchmarks or {}).get("tasks", []):
        prefix = f"benchmarks/{task['task']}"
        for name in ("accuracy_baseline", "accuracy_candidate", "difference", "recovery"):
            if name in task:
                spec.metric(f"{prefix}/{name}", task[name].get("value"), step)
                spec.metric(f"{prefix}/{name}_low", task[name].get("low"), step)
                spec.metric(f"{prefix}/{name}_high", task[name].get("high"), step)
        for name in ("flips_b", "flips_c", "flip_rate", "mcnemar_p", "holm_p", "n"):
            spec.metric(f"{prefix}/{name}", task.get(name), step)
    judged = stack["instruments"].get("judge")
    if judged:
        pairwise = judged.get("pairwise", {})
        for name in ("win", "tie", "loss", "unparsed", "position_consistency", "length_delta"):
            spec.metric(f"judge/{name}", pairwise.get(name), step)
        if "net_loss" in pairwise:
            for part, suffix in (("value", ""), ("low", "_low"), ("high", "_high")):
                spec.metric(f"judge/net_loss{suffix}", pairwise["net_loss"][part], step)
        for kind in ("single", "reference"):
            if kind in judged:
                spec.metric(f"judge/{kind}_mean_delta", judged[kind]["mean_delta"]["value"], step)
                spec.metric(f"judge/{kind}_wilcoxon_p", judged[kind]["wilcoxon_p"], step)
        if "control" in judged:
            spec.metric("judge/control_valid", judged["control"]["valid"], step)
            spec.metric("judge/control_net_loss", judged["control"]["net_loss"]["value"], step)
        if "validity" in judged:
            spec.metric("judge/valid", judged["validity"]["valid"], step)
        spec.params["judge.model"] = short(judged["judge"]["model"])
        spec.params["judge.template"] = short(judged["judge"]["template"])
    if compound_row:
        for metric in ("kl_mean", "ln_ppl_ratio", "top1_loss"):
            for part in COMPOUND_PARTS:
                spec.metric(f"compound/{metric}_{part}", compound_row[metric].get(part), step)
    spec.metric("gate/level", VERDICT_LEVEL[stack["verdict"]], step)
    spec.metric("gate/findings_failed", sum(f["status"] == "fail" for f in stack["findings"]), step)
    spec.metric("gate/findings_warned", sum(f["status"] == "warn" for f in stack["findings"]), step)
    spec.metric("gate/findings_inconclusive", sum(f["status"] == "inconclusive" for f in stack["findings"]), step)
    spec.metric("gate/findings_error", sum(f["status"] == "error" for f in stack["findings"]), step)
    for f in stack["findings"]:
        if f.get("n_needed") is not None:
            spec.metric(f"gate/n_needed/{f['instrument']}.{f['metric']}", f["n_needed"], step)
    return spec


def build_layout(report: dict[str, Any], run_uid: str) -> RunLayout:
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
    stacks = [StackRun(stack_spec(stack, rows.get(stack["name"]), common), stack) for stack in report["stacks"]]
    return RunLayout(parent, stacks)
