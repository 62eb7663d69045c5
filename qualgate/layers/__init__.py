"""Optimization layers. Built-in methods register on import; plug-ins are named by "module:Class"."""

from qualgate.layers import engine, kv_quant, kv_rotated, prefix_cache, speculation, weight_quant
from qualgate.layers.base import (
    KIND_BASES,
    LAYER_KINDS,
    LAYERS,
    KVQuantLayer,
    Layer,
    LayerKind,
    LayerParams,
    PrefixCacheLayer,
    PrefixCacheParams,
    Proposer,
    SpeculationLayer,
    SpeculationParams,
    WeightQuantLayer,
    build_layer,
    register_layer,
)

__all__ = [
    "KIND_BASES",
    "LAYERS",
    "LAYER_KINDS",
    "KVQuantLayer",
    "Layer",
    "LayerKind",
    "LayerParams",
    "PrefixCacheLayer",
    "PrefixCacheParams",
    "Proposer",
    "SpeculationLayer",
    "SpeculationParams",
    "WeightQuantLayer",
    "build_layer",
    "engine",
    "kv_quant",
    "kv_rotated",
    "prefix_cache",
    "register_layer",
    "speculation",
    "weight_quant",
]
