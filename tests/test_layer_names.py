"""Default layer names say what a layer measures: every non-default parameter shows, and a plug-in
never takes a built-in's name. No model is loaded: names come from the configuration alone."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pytest

from qualgate import build_layer, build_stack
from qualgate.fixtures import bundled_model_path
from qualgate.layers import LAYER_KINDS, LAYERS, LayerKind, register_layer
from qualgate.layers.base import is_builtin
from qualgate.layers.speculation import DraftModel

# Safe in a stack name (joined with '+'), a Markdown table cell, an MLflow run name and a YAML key.
NAME = re.compile(r"[A-Za-z0-9._:-]+")

# The names pipelines, README and tests refer to: unchanged while every parameter is at its default.
DEFAULT_NAMES = {
    ("weight_quant", "rtn"): "w4g128",
    ("weight_quant", "quanto"): "quanto-int8",
    ("weight_quant", "torchao"): "torchao-int8",
    ("weight_quant", "gguf"): "gguf-q4_k_m",
    ("weight_quant", "vllm"): "w-fp8",
    ("weight_quant", "checkpoint"): "ckpt-target",
    ("weight_quant", "mixed"): "w4g128-keep1-full-34e900",
    ("weight_quant", "gguf_dequant"): "gguf-q4_k_m-sim",
    ("kv_quant", "quanto"): "kv-int4",
    ("kv_quant", "fp8"): "kv-fp8-e4m3",
    ("kv_quant", "ggml"): "kv-q8_0",
    ("kv_quant", "turboquant"): "kv-turboquant3",
    ("kv_quant", "kivi"): "kv-kivi2",
    ("kv_quant", "rtn"): "kv-k4v4",
    ("speculation", "draft_model"): "spec-draft4",
    ("speculation", "ngram"): "spec-ngram4",
    ("speculation", "draft_model_typical"): "spec-typical4",
    ("prefix_cache", "block"): "prefix-cache",
}
# No default to fall back on (a checkpoint directory must hold a config.json).
REQUIRED = {
    ("weight_quant", "vllm"): {"quantization": "fp8"},
    ("weight_quant", "checkpoint"): {"path": str(bundled_model_path("target"))},
    ("weight_quant", "mixed"): {"base": {"method": "rtn"}, "modules": ["model.layers.0.mlp.down_proj"]},
}

# One valid non-default value for every parameter of every built-in.
ALTERNATIVES: dict[tuple[str, str], dict[str, Any]] = {
    ("weight_quant", "rtn"): {"bits": 3, "group_size": 64, "symmetric": True, "include_lm_head": True},
    ("weight_quant", "quanto"): {"weights": "int4", "include_lm_head": True},
    ("weight_quant", "torchao"): {"bits": 4, "group_size": 32, "symmetric": False, "include_lm_head": True},
    ("weight_quant", "gguf"): {"type": "Q8_0", "quantize_output": False},
    ("weight_quant", "vllm"): {"quantization": "awq", "checkpoint": "/models/llama-awq"},
    ("weight_quant", "checkpoint"): {"path": str(bundled_model_path("draft"))},
    ("weight_quant", "gguf_dequant"): {"type": "Q8_0", "quantize_output": False, "cache_dir": "/tmp/gguf"},
    ("weight_quant", "mixed"): {
        "base": {"method": "rtn", "bits": 3},
        "keep": {"method": "rtn", "bits": 8},
        "modules": ["model.layers.1.mlp.down_proj"],
    },
    ("kv_quant", "quanto"): {"bits": 2, "q_group_size": 32, "residual_length": 32, "axis_key": -1, "axis_value": -1},
    ("kv_quant", "fp8"): {"format": "e5m2", "scale": 0.002},
    ("kv_quant", "ggml"): {"type_k": "q4_0", "type_v": "f16"},
    ("kv_quant", "turboquant"): {"bits": 2.5, "qjl": True, "seed": 1},
    ("kv_quant", "kivi"): {"bits": 4, "group_size": 16, "residual_length": 64},
    ("kv_quant", "rtn"): {"bits_k": 2, "bits_v": None, "group_size": 16},
    ("speculation", "draft_model"): {"num_speculative_tokens": 2, "draft": "bundled:other", "draft_device": "cpu"},
    ("speculation", "ngram"): {"num_speculative_tokens": 2, "prompt_lookup_max": 5, "prompt_lookup_min": 2},
    ("speculation", "draft_model_typical"): {
        "num_speculative_tokens": 2,
        "draft": "bundled:other",
        "draft_device": "cpu",
        "posterior_threshold": 0.2,
        "posterior_alpha": 0.5,
    },
    ("prefix_cache", "block"): {"block_size": 32, "max_entries": 8},
}


def layer_name(kind: str, method: str, **params: Any) -> str:
    spec = {"kind": kind, "method": method, **REQUIRED.get((kind, method), {}), **params}
    return build_layer(spec).name


def builtins() -> list[tuple[LayerKind, str]]:
    return [(kind, method) for kind in LAYER_KINDS for method in LAYERS[kind].names()]


def test_the_tables_cover_every_builtin_and_parameter() -> None:
    """A new method or parameter must be added here, so the checks below cover it."""
    assert sorted(DEFAULT_NAMES) == sorted(builtins()) == sorted(ALTERNATIVES)
    for kind, method in builtins():
        fields = set(LAYERS[kind].get(method).Params.model_fields)
        assert set(ALTERNATIVES[kind, method]) == fields, (kind, method)


@pytest.mark.parametrize(("kind", "method"), sorted(DEFAULT_NAMES))
def test_default_parameters_keep_the_established_names(kind: str, method: str) -> None:
    assert layer_name(kind, method) == DEFAULT_NAMES[kind, method]


def test_names_of_configurations_the_pipelines_use() -> None:
    assert layer_name("weight_quant", "rtn", bits=4, group_size=64) == "w4g64"
    assert layer_name("weight_quant", "rtn", bits=8) == "w8g128"
    assert layer_name("weight_quant", "rtn", bits=2, group_size=None) == "w2"
    assert layer_name("speculation", "ngram", num_speculative_tokens=4, prompt_lookup_max=3) == "spec-ngram4"
    assert layer_name("kv_quant", "ggml", type_k="q8_0", type_v="q8_0") == "kv-q8_0"
    assert layer_name("kv_quant", "quanto", bits=4, residual_length=32) == "kv-int4-residual_length32"
    assert layer_name("prefix_cache", "block", block_size=32) == "prefix-cache-block_size32"


def test_a_non_default_scale_shows_in_the_fp8_name() -> None:
    assert layer_name("kv_quant", "fp8", scale=0.002) == "kv-fp8-e4m3-scale0.002"
    assert layer_name("kv_quant", "fp8", format="e5m2", scale=0.5) == "kv-fp8-e5m2-scale0.5"


def test_a_non_default_group_size_shows_in_int4_names() -> None:
    assert layer_name("weight_quant", "rtn", bits=4, group_size=32) == "w4g32"
    assert layer_name("weight_quant", "rtn", bits=4, group_size=None) == "w4"
    assert layer_name("weight_quant", "torchao", bits=4, group_size=64) == "torchao-int4g64"
    assert layer_name("kv_quant", "quanto", bits=4, q_group_size=32) == "kv-int4-q_group_size32"


def test_value_formats() -> None:
    assert layer_name("weight_quant", "rtn", symmetric=True, include_lm_head=True) == "w4g128-symmetric-include_lm_head"
    assert layer_name("weight_quant", "gguf", quantize_output=False) == "gguf-q4_k_m-no_quantize_output"
    assert layer_name("kv_quant", "quanto", axis_key=-1) == "kv-int4-axis_key-1"
    assert layer_name("kv_quant", "fp8", scale=1e7) == "kv-fp8-e4m3-scale1e07", "no '+': it joins stack names"
    # :g keeps 6 significant digits; values it would merge keep their full repr
    assert layer_name("kv_quant", "fp8", scale=0.1234567) == "kv-fp8-e4m3-scale0.1234567"
    assert layer_name("kv_quant", "fp8", scale=0.1234568) == "kv-fp8-e4m3-scale0.1234568"


@pytest.mark.parametrize(("kind", "method"), sorted(ALTERNATIVES))
def test_every_parameter_changes_the_name(kind: str, method: str) -> None:
    default = layer_name(kind, method)
    for key, value in ALTERNATIVES[kind, method].items():
        name = layer_name(kind, method, **{key: value})
        assert name != default, (kind, method, key)
        assert NAME.fullmatch(name), name
    everything = layer_name(kind, method, **ALTERNATIVES[kind, method])
    assert everything != default and NAME.fullmatch(everything), everything


def test_text_parameters_are_made_name_safe_and_stay_distinct() -> None:
    one = layer_name("speculation", "draft_model", draft="/models/draft v2")
    other = layer_name("speculation", "draft_model", draft="/models/draft_v2")
    assert one.startswith("spec-draft4-draft_models_draft_v2_") and NAME.fullmatch(one), one
    assert one != other, "same safe characters, different paths: the hash keeps them apart"
    long = layer_name("weight_quant", "vllm", checkpoint="/data/checkpoints/" + "x" * 80 + "/llama-awq")
    assert len(long) < 60 and long.startswith("w-fp8-checkpoint_") and NAME.fullmatch(long), long


def test_a_plugin_subclass_with_default_parameters_is_not_named_like_the_builtin() -> None:
    builtin = build_layer({"kind": "speculation", "method": "draft_model"})
    plugin = build_layer({"kind": "speculation", "method": "plugin_layers:TopTwoDraft"})
    assert type(plugin).method == "draft_model" and plugin.params == builtin.params, "same method and parameters"
    assert builtin.name == "spec-draft4" and is_builtin(type(builtin))
    assert plugin.name == "TopTwoDraft-spec-draft4" and not is_builtin(type(plugin))
    assert plugin.name not in DEFAULT_NAMES.values()


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ({"kind": "speculation", "method": "plugin_layers:LossyTop2Ngram"}, "LossyTop2Ngram-spec-ngram4"),
        ({"kind": "kv_quant", "method": "plugin_layers:DecodeSaturatingFp8"}, "DecodeSaturatingFp8-kv-fp8-e4m3"),
        (
            {"kind": "prefix_cache", "method": "plugin_layers:PartialKeyPrefixCache"},
            "PartialKeyPrefixCache-prefix-cache",
        ),
        (
            {"kind": "weight_quant", "method": "plugin_layers:WrongScaleRTN", "bits": 4, "group_size": 64},
            "WrongScaleRTN-w4g64",
        ),
        (
            {"kind": "weight_quant", "method": "plugin_layers:ScaleMLPWeights", "factor": 0.5},
            "ScaleMLPWeights-weight_quant:scale_mlp-factor0.5",
        ),
    ],
)
def test_plugins_are_prefixed_with_their_class(spec: dict[str, Any], name: str) -> None:
    assert build_layer(spec).name == name


def test_a_plugin_that_registers_its_own_method_is_still_a_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = LAYERS["speculation"]
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))  # registered for this test only

    @register_layer
    class MyDraft(DraftModel):
        method: ClassVar[str] = "my_draft"

    layer = build_layer({"kind": "speculation", "method": "my_draft"})
    assert type(layer) is MyDraft and layer.name == "MyDraft-spec-draft4"


def test_an_explicit_name_wins() -> None:
    plugin = build_layer({"kind": "speculation", "method": "plugin_layers:TopTwoDraft", "name": "top2"})
    fp8 = build_layer({"kind": "kv_quant", "method": "fp8", "scale": 0.002, "name": "kv"})
    assert (plugin.name, fp8.name) == ("top2", "kv")


def test_stack_names_split_back_into_their_layers() -> None:
    layers: list[dict[str, Any]] = [
        {"kind": "weight_quant", "method": "rtn", "bits": 4, "group_size": 64},
        {"kind": "kv_quant", "method": "fp8", "scale": 1e7},
        {"kind": "speculation", "method": "plugin_layers:TopTwoDraft", "draft": "bundled:draft+v2"},
    ]
    stack = build_stack({"path": "bundled:target"}, layers)
    assert stack.name.split("+") == [layer.name for layer in stack.layers]
    assert stack.name.startswith("w4g64+kv-fp8-e4m3-scale1e07+TopTwoDraft-spec-draft4-draft_bundled_draft_v2_")
