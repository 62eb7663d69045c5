"""Which stacks a pipeline evaluates (plan.py): the `stacks: auto` ladder and singles, and explicit
stacks with their roles. Layers are built from their configuration (nothing is loaded until a session
opens); the pipeline is a stand-in with the two fields plan() reads. Fast; mutation-tested."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from qualgate.config import StackConfig
from qualgate.errors import ConfigError
from qualgate.layers import Layer, build_layer
from qualgate.models import ModelSpec
from qualgate.plan import PlannedStack, plan

MODEL = ModelSpec(path="bundled:target", dtype="float32")


@pytest.fixture
def layers() -> dict[str, Layer[Any]]:
    """Four layers of four kinds, in ladder order."""
    specs: dict[str, dict[str, Any]] = {
        "w4": {"kind": "weight_quant", "method": "rtn", "bits": 4, "group_size": 64},
        "kv": {"kind": "kv_quant", "method": "fp8"},
        "spec": {"kind": "speculation", "method": "ngram"},
        "prefix": {"kind": "prefix_cache", "method": "block", "block_size": 16},
    }
    return {name: build_layer({**spec, "name": name}) for name, spec in specs.items()}


def _rows(planned: list[PlannedStack]) -> list[tuple[tuple[str, ...], str, int, str]]:
    return [(p.layer_names, p.role, p.step, p.stack.name) for p in planned]


def _explicit(*stacks: tuple[list[str], str | None]) -> SimpleNamespace:
    explicit = [StackConfig(layers=names, name=name) for names, name in stacks]
    return SimpleNamespace(model=MODEL, controls=[], stacks=explicit)


def test_auto_is_the_ladder_then_each_layer_alone(layers: dict[str, Layer[Any]]) -> None:
    planned = plan(SimpleNamespace(model=MODEL, controls=[], stacks="auto"), layers)
    assert _rows(planned) == [
        ((), "baseline", 0, "base"),
        (("w4",), "ladder", 1, "w4"),
        (("w4", "kv"), "ladder", 2, "w4+kv"),
        (("w4", "kv", "spec"), "ladder", 3, "w4+kv+spec"),
        (("w4", "kv", "spec", "prefix"), "ladder", 4, "w4+kv+spec+prefix"),
        # the first layer alone is already the ladder's first step; the others carry their ladder step
        (("kv",), "single", 2, "kv"),
        (("spec",), "single", 3, "spec"),
        (("prefix",), "single", 4, "prefix"),
    ]
    for p in planned:
        assert p.stack.model is MODEL
        assert p.stack.layers == tuple(layers[n] for n in p.layer_names), "the pipeline's own layer objects"


def test_auto_follows_the_order_of_the_layers(layers: dict[str, Layer[Any]]) -> None:
    reordered = {name: layers[name] for name in ("prefix", "kv")}
    planned = plan(SimpleNamespace(model=MODEL, controls=[], stacks="auto"), reordered)
    assert _rows(planned) == [
        ((), "baseline", 0, "base"),
        (("prefix",), "ladder", 1, "prefix"),
        (("prefix", "kv"), "ladder", 2, "prefix+kv"),
        (("kv",), "single", 2, "kv"),
    ]


def test_auto_without_layers_is_the_baseline_alone() -> None:
    assert _rows(plan(SimpleNamespace(model=MODEL, controls=[], stacks="auto"), {})) == [((), "baseline", 0, "base")]


def test_explicit_stacks_keep_their_order_dedupe_and_detect_the_ladder(layers: dict[str, Layer[Any]]) -> None:
    pipeline = _explicit(
        (["w4"], None),  # () + w4: the ladder's first step
        (["w4", "kv"], None),  # the previous step + kv: the next step
        (["kv"], "kv only"),  # not one layer more than the last step: a single
        (["w4", "kv"], "again"),  # already planned: skipped, even under another name
        (["w4", "kv", "spec"], "full"),  # still one layer on top of the last step
        (["spec", "prefix"], None),  # two layers off the ladder: a stack
        ([], None),  # the baseline: always there once
        (["w4", "kv", "spec", "prefix"], None),
    )
    planned = plan(pipeline, layers)
    assert _rows(planned) == [
        ((), "baseline", 0, "base"),
        (("w4",), "ladder", 1, "w4"),
        (("w4", "kv"), "ladder", 2, "w4+kv"),
        (("kv",), "single", 1, "kv only"),
        (("w4", "kv", "spec"), "ladder", 3, "full"),
        (("spec", "prefix"), "stack", 2, "spec+prefix"),
        (("w4", "kv", "spec", "prefix"), "ladder", 4, "w4+kv+spec+prefix"),
    ]
    for p in planned:
        assert p.stack.model is MODEL and p.stack.layers == tuple(layers[n] for n in p.layer_names)


def test_explicit_stacks_off_the_ladder(layers: dict[str, Layer[Any]]) -> None:
    pipeline = _explicit((["kv", "spec"], None), (["spec"], None), (["kv", "spec", "w4"], None), (["w4"], None))
    assert _rows(plan(pipeline, layers)) == [
        ((), "baseline", 0, "base"),
        (("kv", "spec"), "stack", 2, "kv+spec"),  # two layers at once: not a step from the baseline
        (("spec",), "ladder", 1, "spec"),  # one layer on the baseline: the ladder starts here
        (("kv", "spec", "w4"), "stack", 3, "kv+spec+w4"),  # builds on kv+spec, which is not the last step
        (("w4",), "single", 1, "w4"),  # the ladder has moved on to spec
    ]


def test_a_stack_with_two_layers_of_one_kind_is_refused(layers: dict[str, Layer[Any]]) -> None:
    other = build_layer({"kind": "weight_quant", "method": "rtn", "bits": 8, "name": "w8"})
    with pytest.raises(ConfigError, match="both weight_quant"):
        plan(_explicit((["w4", "w8"], None)), {**layers, "w8": other})


def test_controls_stay_out_of_the_auto_ladder_and_come_last(layers: dict[str, Layer[Any]]) -> None:
    from qualgate.controls import Control

    controls = [Control(layers=["prefix"], must_fail=["equivalence"]), Control(name="bad", layers=["w4", "kv"])]
    planned = plan(SimpleNamespace(model=MODEL, controls=controls, stacks="auto"), layers)
    assert [(p.layer_names, p.role, p.step, p.stack.name, p.must_fail) for p in planned] == [
        ((), "baseline", 0, "base", ()),
        (("spec",), "ladder", 1, "spec", ()),  # w4, kv and prefix are named by controls: off the ladder
        (("prefix",), "control", 1, "prefix", ("equivalence",)),
        (("w4", "kv"), "control", 2, "bad", ()),
    ]
    assert planned[-1].stack.layers == (layers["w4"], layers["kv"])
    explicit = SimpleNamespace(model=MODEL, controls=controls[:1], stacks=[StackConfig(layers=["w4", "kv"])])
    assert [(p.layer_names, p.role) for p in plan(explicit, layers)] == [
        ((), "baseline"),
        (("w4", "kv"), "stack"),
        (("prefix",), "control"),
    ]
