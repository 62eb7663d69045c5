"""Per-layer quality budgets: how much each layer may cost, gated on what it adds.

`gate.budgets: {w4: {kl_mean: 0.006}, kv: {kl_mean: 0.003}, spec: {real_divergences: 0}}` gives a layer
a maximum for what it adds to a metric: on the ladder, a step against the step before it (the layer's
increment in the stack it joins); alone, the layer's single stack against the baseline. Both are paired
per token over the golden's chunks, so each increment carries a chunk-clustered interval, and a budget
is kept when the interval's pessimistic end is within it (as every gated value). The interaction term
(the increment on the ladder minus the layer's single cost) is reported beside it: a layer that costs
more in company than alone spends its budget there, and the finding names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qualgate.errors import ConfigError
from qualgate.gate import Finding
from qualgate.registry import did_you_mean
from qualgate.stats import clustered_mean

# metric -> what is budgeted, per token where there is an interval
BUDGET_METRICS = {
    "kl_mean": "increase of the mean KL divergence to the golden",
    "same_top1": "drop of same-top-1 agreement with the golden",
    "real_divergences": "real greedy divergences of a lossless layer (a count)",
}


def check_budgets(budgets: Mapping[str, Mapping[str, float]], layers: Mapping[str, Any], where: str) -> None:
    for layer, metrics in budgets.items():
        if layer not in layers:
            raise ConfigError(f"{where}: gate.budgets.{layer} names no layer; {did_you_mean(layer, list(layers))}")
        for metric, value in metrics.items():
            if metric not in BUDGET_METRICS:
                raise ConfigError(
                    f"{where}: gate.budgets.{layer}.{metric} cannot be budgeted; "
                    f"{did_you_mean(metric, list(BUDGET_METRICS))}"
                )
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{where}: gate.budgets.{layer}.{metric} must be a number >= 0 (got {value!r})")


def _per_token(run_dir: Path, stack: dict[str, Any]) -> dict[str, np.ndarray] | None:
    fidelity = stack["instruments"].get("fidelity")
    if not fidelity or not fidelity.get("per_token"):
        return None
    with np.load(run_dir / fidelity["per_token"]) as data:
        return {key: data[key] for key in ("chunk", "kl", "same_top1", "target")}


def _increment(metric: str, now: dict[str, np.ndarray], before: dict[str, np.ndarray] | None) -> Any:
    """The paired per-token increment of `metric` from `before` (None: nothing, the baseline's zero)."""
    if metric == "kl_mean":
        diff = now["kl"] - (before["kl"] if before is not None else 0.0)
    else:  # same_top1: the drop
        diff = (before["same_top1"].astype(float) if before is not None else 1.0) - now["same_top1"].astype(float)
    return clustered_mean(np.asarray(diff, dtype=np.float64), now["chunk"])


def budget_rows(
    budgets: Mapping[str, Mapping[str, float]],
    added: str,
    stack: dict[str, Any],
    before: dict[str, Any] | None,
    single: dict[str, Any] | None,
    run_dir: Path,
) -> list[dict[str, Any]]:
    """The budget rows of a stack that adds layer `added` to `before` (None: to the baseline)."""
    rows = []
    now = _per_token(run_dir, stack)
    prior = _per_token(run_dir, before) if before is not None else None
    alone = _per_token(run_dir, single) if single is not None and single is not stack else None
    for metric, budget in budgets.get(added, {}).items():
        against = before["name"] if before is not None else "base"
        row: dict[str, Any] = {"layer": added, "metric": metric, "budget": float(budget), "against": against}
        if metric == "real_divergences":
            equivalence = stack["instruments"].get("equivalence")
            if not equivalence:
                continue
            row["increment"] = {"value": float(equivalence["real_divergences"]), "low": None, "high": None}
        else:
            if now is None or (before is not None and prior is None):
                continue
            if prior is not None and not np.array_equal(prior["target"], now["target"]):
                raise ConfigError(f"budget {added}.{metric}: the two stacks were scored on different tokens")
            row["increment"] = _increment(metric, now, prior).as_dict()
            if alone is not None:
                row["single"] = _increment(metric, alone, None).as_dict()
                row["interaction"] = row["increment"]["value"] - row["single"]["value"]
        rows.append(row)
    return rows


def budget_finding(row: dict[str, Any], n: int | None) -> Finding:
    """A row as a finding the gate judges against its budget (a fail threshold)."""
    inc = row["increment"]
    return Finding(
        instrument="budget",
        metric=f"{row['layer']}.{row['metric']}",
        value=inc["value"],
        low=inc.get("low"),
        high=inc.get("high"),
        n=n if inc.get("high") is not None else None,
        unit="chunks" if inc.get("high") is not None else "",
        cause=f"what layer '{row['layer']}' adds against {row['against']}",
    )
