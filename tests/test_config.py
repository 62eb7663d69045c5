"""Layer and stack configuration: registry lookups, plug-ins and the errors users see."""

from __future__ import annotations

import re

import pytest

from qualgate import ConfigError, ModelSpec, build_layer, build_stack
from qualgate.layers import LAYER_KINDS, LAYERS


def test_every_kind_has_builtin_methods_with_the_right_lossless_flag() -> None:
    expected = {"weight_quant": False, "kv_quant": False, "speculation": True, "prefix_cache": True}
    deliberately_lossy = {("speculation", "draft_model_typical")}  # typical acceptance, documented as lossy
    for kind in LAYER_KINDS:
        assert LAYERS[kind].names(), kind
        for method in LAYERS[kind].names():
            cls = LAYERS[kind].get(method)
            lossless = expected[kind] and (kind, method) not in deliberately_lossy
            assert cls.kind == kind and cls.lossless is lossless, (kind, method)


def test_layers_build_with_defaults_and_names() -> None:
    layer = build_layer({"kind": "weight_quant", "method": "rtn", "bits": 3, "group_size": 64})
    assert layer.name == "w3g64" and not layer.lossless
    identity = layer.identity()
    assert identity["code"]["class"] == "qualgate.layers.weight_quant:RoundToNearest"
    assert {k: v for k, v in identity.items() if k != "code"} == {
        "kind": "weight_quant",
        "method": "rtn",
        "params": {"bits": 3, "group_size": 64, "symmetric": False, "include_lm_head": False},
    }
    named = build_layer({"kind": "speculation", "method": "ngram", "name": "lookup"})
    assert named.name == "lookup" and named.lossless


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "weight_quant", "method": "rnt"}, "unknown weight_quant method 'rnt'; did you mean 'rtn'"),
        ({"kind": "weight_qaunt", "method": "rtn"}, "unknown layer kind 'weight_qaunt'; did you mean 'weight_quant'"),
        ({"kind": "weight_quant"}, "needs 'kind' and 'method'"),
        ({"kind": "weight_quant", "method": "rtn", "bits": 1}, "field 'bits'"),
        ({"kind": "weight_quant", "method": "rtn", "bits": 9}, "field 'bits'"),
        (
            {"kind": "weight_quant", "method": "rtn", "bitz": 4},
            "unknown field 'bitz'; did you mean 'bits'? (valid fields here: bits",
        ),
        ({"kind": "kv_quant", "method": "quanto", "bits": 3}, "field 'bits'"),
        ({"kind": "kv_quant", "method": "fp8", "format": "e3m4"}, "field 'format'"),
        (
            {"kind": "speculation", "method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2},
            "prompt_lookup_min must not exceed",
        ),
        ({"kind": "prefix_cache", "method": "block", "block_size": 0}, "field 'block_size'"),
        ({"kind": "weight_quant", "method": "plugin_layers:Missing"}, "has no attribute 'Missing'"),
        ({"kind": "weight_quant", "method": "no_such_module:X"}, "cannot import module 'no_such_module'"),
        (
            {"kind": "weight_quant", "method": "plugin_layers:NotALayer"},
            "must subclass qualgate.layers.WeightQuantLayer",
        ),
        ({"kind": "kv_quant", "method": "plugin_layers:ScaleMLPWeights"}, "must subclass qualgate.layers.KVQuantLayer"),
    ],
)
def test_bad_layer_configs_fail_with_a_clear_message(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        build_layer(spec, where="pipelines/x.yaml: layers[0]")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("pipelines/x.yaml: layers[0]"), "the message names where the layer is"


def test_plugin_layer_loads_by_module_path() -> None:
    layer = build_layer({"kind": "weight_quant", "method": "plugin_layers:ScaleMLPWeights", "factor": 0.5})
    assert type(layer).__name__ == "ScaleMLPWeights" and layer.params.factor == 0.5  # type: ignore[attr-defined]


def test_a_stack_holds_one_layer_per_kind() -> None:
    with pytest.raises(ConfigError, match="both weight_quant"):
        build_stack(
            {"path": "bundled:target"},
            [{"kind": "weight_quant", "method": "rtn"}, {"kind": "weight_quant", "method": "quanto"}],
        )


def test_stack_names_identity_and_reference() -> None:
    stack = build_stack(
        {"path": "bundled:target"},
        [
            {"kind": "weight_quant", "method": "rtn", "bits": 4},
            {"kind": "speculation", "method": "ngram"},
        ],
    )
    assert stack.name == "w4g128+spec-ngram4" and not stack.lossless
    reference = stack.without("speculation")
    assert reference.name == "w4g128" and reference.identity_hash() != stack.identity_hash()
    assert build_stack({"path": "bundled:target"}).name == "base"
    files = stack.identity()["model"]["files"]
    assert "model.safetensors" in files and "tokenizer.json" in files


@pytest.mark.parametrize(
    ("path", "message"),
    [("bundled:nope", "no bundled model 'nope'"), ("./missing-model", "does not exist"), ("/tmp", "no config.json")],
)
def test_bad_model_paths(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelSpec(path=path).local_path()


def test_unknown_backend_suggests_the_right_name() -> None:
    from qualgate import get_backend

    with pytest.raises(ConfigError, match="did you mean 'hf'"):
        get_backend("hff")
