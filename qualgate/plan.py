"""Which stacks a pipeline evaluates: the ladder of cumulative steps plus each layer alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qualgate.layers import Layer
from qualgate.stack import Stack


@dataclass(frozen=True)
class PlannedStack:
    stack: Stack
    layer_names: tuple[str, ...]
    role: str  # "baseline", "ladder" (cumulative step), "single" (one layer alone), "stack" or "control"
    step: int  # position on the ladder (0 = baseline); singles carry the step of their layer
    must_fail: tuple[str, ...] = ()  # a control's instruments that must each fail it (qualgate/controls.py)


def plan(pipeline: Any, layers: dict[str, Layer[Any]]) -> list[PlannedStack]:
    """`stacks: auto`: base, +L1, +L1+L2, ... in the given order, then each layer alone (when not
    already on the ladder); layers that controls name stay out of it. Explicit stacks are evaluated as
    given, after the baseline. The controls come last."""
    model = pipeline.model
    planned = [PlannedStack(Stack(model=model), (), "baseline", 0)]
    seen: set[tuple[str, ...]] = {()}
    controls = [
        PlannedStack(
            Stack(model=model, layers=tuple(layers[n] for n in c.layers), name=c.name or ""),
            tuple(c.layers),
            "control",
            len(c.layers),
            tuple(c.must_fail),
        )
        for c in pipeline.controls
    ]
    if pipeline.stacks == "auto":
        only_controls = {n for c in pipeline.controls for n in c.layers}
        names = [n for n in layers if n not in only_controls]
        for i in range(1, len(names) + 1):
            chosen = tuple(names[:i])
            planned.append(
                PlannedStack(Stack(model=model, layers=tuple(layers[n] for n in chosen)), chosen, "ladder", i)
            )
            seen.add(chosen)
        for i, name in enumerate(names, start=1):
            if (name,) not in seen:
                planned.append(PlannedStack(Stack(model=model, layers=(layers[name],)), (name,), "single", i))
                seen.add((name,))
        return planned + controls
    rung: tuple[str, ...] = ()  # the last ladder step: a stack adding one layer to it is the next step
    for entry in pipeline.stacks:
        chosen = tuple(entry.layers)
        if chosen in seen:
            continue
        seen.add(chosen)
        stack = Stack(model=model, layers=tuple(layers[n] for n in chosen), name=entry.name or "")
        if chosen[:-1] == rung:
            planned.append(PlannedStack(stack, chosen, "ladder", len(chosen)))
            rung = chosen
        else:
            planned.append(PlannedStack(stack, chosen, "single" if len(chosen) == 1 else "stack", len(chosen)))
    return planned + controls
