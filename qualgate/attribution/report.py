"""An attribution written out: attribution.json, a Markdown table with the plan, and a bar chart of KL
per unit (sorted, with intervals and the threshold)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qualgate.fsio import atomic_write_text

CHART = "kl_by_unit.png"
TABLE_ROWS = 12  # the Markdown table shows the worst units; the JSON keeps every one


def mixed_layer(stack_layer: dict[str, Any], keep: dict[str, Any] | None, modules: list[str]) -> dict[str, Any]:
    """The layer that deploys a plan: paste it into the pipeline's `layers:`."""
    return {"kind": "weight_quant", "method": "mixed", "base": stack_layer, "keep": keep, "modules": modules}


def units_table(units: list[dict[str, Any]]) -> Any:
    """The per-unit rows as a pandas DataFrame (the MLflow table)."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "unit": row["unit"],
                "kl_mean": row["kl_mean"]["value"],
                "kl_low": row["kl_mean"]["low"],
                "kl_high": row["kl_mean"]["high"],
                "share": row["share"],
                "same_top1": row["same_top1"],
                "sqnr_db": row["sqnr_db"],
                "output_cosine": row["output_cosine"],
            }
            for row in units
        ]
    )


def headline_metrics(result: dict[str, Any]) -> dict[str, float]:
    """What an attribution logs as MLflow metrics."""
    plan = result["plan"]
    metrics = {
        "attribution/whole_kl": result["whole"]["kl_mean"]["value"],
        "attribution/sum_of_singles": result["sum_of_singles"],
        "attribution/interaction": result["interaction"],
        "attribution/sweep_seconds": result["sweep_seconds"],
        "attribution/kept": float(len(plan.get("kept", []))),
    }
    if plan["found"]:
        metrics["attribution/plan_kl"] = plan["verified"]["kl_mean"]["value"]
    return metrics


def write(out: Path, result: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "attribution.json", json.dumps(result, indent=2, allow_nan=True) + "\n")
    chart(result, out / CHART)
    atomic_write_text(out / "attribution.md", "\n".join(markdown(result, CHART)) + "\n")
    return [out / "attribution.json", out / "attribution.md", out / CHART]


def _interval(kl: dict[str, float]) -> str:
    return f"{kl['value']:.2e} [{kl['low']:.2e}, {kl['high']:.2e}]"


def markdown(result: dict[str, Any], chart_name: str | None = None) -> list[str]:
    plan, whole = result["plan"], result["whole"]
    lines = [
        f"## Where the loss of `{result['stack']}` comes from ({result['layer_name']}, per {result['granularity']})",
        "",
        f"{len(result['units'])} units, each quantized alone and scored on {len(result['chunks'])} golden chunks "
        f"({result['n_tokens']} tokens) in {result['sweep_seconds']:.0f} s.",
        "",
    ]
    if chart_name:
        lines += [f"![KL per {result['granularity']}]({chart_name})", ""]
    lines += [
        "| unit | KL [95% CI] | share | same top-1 | weight SQNR (dB) | output cosine |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["units"][:TABLE_ROWS]:
        lines.append(
            f"| `{row['unit']}` | {_interval(row['kl_mean'])} | {row['share']:.1%} | {row['same_top1']:.4f} "
            f"| {row['sqnr_db']:.1f} | {row['output_cosine']:.6f} |"
        )
    if len(result["units"]) > TABLE_ROWS:
        lines.append(f"| ... {len(result['units']) - TABLE_ROWS} more in attribution.json | | | | | |")
    lines += [
        "",
        f"Whole stack on the same chunks: KL {_interval(whole['kl_mean'])}; sum of the singles "
        f"{result['sum_of_singles']:.2e}; interaction (whole - sum) {result['interaction']:+.2e}.",
        "",
    ]
    threshold = result["threshold"]
    if not plan["found"]:
        lines.append(
            f"**No plan**: even with every unit at {plan['keep_name']}, the KL's upper bound stays above "
            f"{threshold:g} (steps: "
            + ", ".join(f"{s['kept']} kept: {s['high']:.2e}" for s in plan["steps"])
            + "). Use a better `keep` quantizer or a different base."
        )
        return lines
    verified = plan["verified"]
    lines += [
        f"**Plan**: keep {len(plan['kept'])} of {len(result['units'])} units at {plan['keep_name']} to bring the KL's "
        f"upper bound under {threshold:g}: " + ", ".join(f"`{n}`" for n in plan["kept"]) + "."
        if plan["kept"]
        else f"**Plan**: nothing to keep: the stack's KL upper bound is already under {threshold:g}.",
        "",
        f"Measured on all {verified['n_chunks']} golden chunks: KL {_interval(verified['kl_mean'])} "
        f"({'passes' if verified['passes'] else 'does NOT pass'} {threshold:g}), same top-1 "
        f"{verified['same_top1']:.4f}, PPL ratio {verified['ppl_ratio']:.4f}.",
        "",
        "Steps (units kept: KL upper bound): " + ", ".join(f"{s['kept']}: {s['high']:.2e}" for s in plan["steps"]),
    ]
    if plan["kept"]:
        lines += ["", "The mixed stack, for the pipeline's `layers:`:", "", "```yaml", *_yaml(plan["layer"]), "```"]
    return lines


def _yaml(layer: dict[str, Any]) -> list[str]:
    import yaml

    return str(yaml.safe_dump({"mixed": layer}, sort_keys=False, default_flow_style=None, width=100)).splitlines()


def chart(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars of KL per unit, worst at the top, with the interval and the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["units"]
    names = [row["unit"] for row in rows][::-1]
    values = [row["kl_mean"]["value"] for row in rows][::-1]
    errors = [
        [max(r["kl_mean"]["value"] - r["kl_mean"]["low"], 0) for r in rows][::-1],
        [max(r["kl_mean"]["high"] - r["kl_mean"]["value"], 0) for r in rows][::-1],
    ]
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.28 * len(rows)))
    axes.barh(names, values, xerr=errors, color="#4878a8", ecolor="#333333", capsize=2)
    axes.axvline(result["threshold"], color="#c0392b", linestyle="--", label=f"threshold {result['threshold']:g}")
    axes.set_xlabel("KL to the golden when only this unit is quantized (95% CI)")
    axes.set_title(f"{result['stack']}: KL per {result['granularity']}", fontsize=10)
    axes.tick_params(axis="y", labelsize=7)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
