"""The compound table: how each ladder step degrades against the baseline and the previous step, each
layer alone, and the interaction term (a stack's degradation minus the sum of its layers' singles)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qualgate.plan import PlannedStack

COMPOUND_METRICS: dict[str, Callable[[dict[str, Any]], float]] = {
    "kl_mean": lambda f: f["kl_mean"]["value"],
    "ln_ppl_ratio": lambda f: f["ln_ppl_ratio"]["value"],
    "top1_loss": lambda f: 1.0 - f["same_top1"]["value"],
}


def compound_table(planned: list[PlannedStack], stacks: list[dict[str, Any]]) -> dict[str, Any]:
    """Degradation of every ladder step against the baseline and the previous step, of each layer alone,
    and the interaction term: a stack's degradation minus the sum of its layers' single degradations."""
    by_layers = {p.layer_names: s for p, s in zip(planned, stacks, strict=True)}

    def metric(layer_names: tuple[str, ...], name: str) -> float | None:
        stack = by_layers.get(layer_names)
        if stack is None or "fidelity" not in stack["instruments"]:
            return None
        return COMPOUND_METRICS[name](stack["instruments"]["fidelity"])

    baseline = {name: metric((), name) for name in COMPOUND_METRICS}
    rows = []
    previous: dict[str, float | None] = baseline
    for p in planned:
        if p.role != "ladder":
            continue
        row: dict[str, Any] = {"stack": by_layers[p.layer_names]["name"], "step": p.step, "layers": list(p.layer_names)}
        values = {}
        for name in COMPOUND_METRICS:
            value = metric(p.layer_names, name)
            base = baseline[name]
            vs_base = None if value is None or base is None else value - base
            prev = previous.get(name)
            singles = [metric((layer,), name) for layer in p.layer_names]
            single_sum = (
                None
                if any(v is None for v in singles) or base is None
                else sum(v - base for v in singles if v is not None)
            )
            row[name] = {
                "value": value,
                "vs_baseline": vs_base,
                "vs_previous": None if value is None or prev is None else value - prev,
                "sum_of_singles": single_sum,
                "interaction": None if vs_base is None or single_sum is None else vs_base - single_sum,
            }
            values[name] = value
        rows.append(row)
        previous = values
    singles_rows = [
        {
            "stack": by_layers[p.layer_names]["name"],
            "layer": p.layer_names[0],
            **{name: metric(p.layer_names, name) for name in COMPOUND_METRICS},
        }
        for p in planned
        if len(p.layer_names) == 1
    ]
    return {
        "metrics": list(COMPOUND_METRICS),
        "baseline": baseline,
        "ladder": rows,
        "singles": singles_rows,
        "note": "vs_baseline and interaction use the metric minus its baseline value; ln_ppl_ratio adds "
        "across layers, KL and top-1 loss approximately",
    }
