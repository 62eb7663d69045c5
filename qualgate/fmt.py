"""Numbers as the summary and the terminal table print them (4 significant digits, '-' for none)."""

from __future__ import annotations

from typing import Any

# A status as the tables, logs and JUnit messages print it.
ICON = {"pass": "PASS", "inconclusive": "INCONCLUSIVE", "warn": "WARN", "fail": "FAIL", "error": "ERROR"}


def fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def interval(estimate: dict[str, Any], digits: int = 4) -> str:
    """`value [low, high]` of an estimate."""
    value, low, high = (fmt(estimate.get(part), digits) for part in ("value", "low", "high"))
    return f"{value} [{low}, {high}]"
