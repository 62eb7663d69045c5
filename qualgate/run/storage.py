"""What each KV-cache layer of a stack stores per element, for the report (read from the model's config)."""

from __future__ import annotations

from typing import Any

from qualgate.layers import KVQuantLayer
from qualgate.stack import Stack

FLOAT_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def kv_storage_bits(stack: Stack) -> list[dict[str, float] | None]:
    """Per layer of the stack (in order), its storage_bits when it is a KV layer that reports them;
    all None without a local model directory (an endpoint's model) or transformers."""
    none: list[dict[str, float] | None] = [None] * len(stack.layers)
    if not any(isinstance(layer, KVQuantLayer) for layer in stack.layers):
        return none
    local = stack.model.local_path()
    try:
        from transformers import AutoConfig
    except ImportError:
        return none
    if local is None:
        return none
    config: Any = AutoConfig.from_pretrained(local)
    bits = FLOAT_BITS[stack.model.dtype]
    return [layer.storage_bits(config, bits) if isinstance(layer, KVQuantLayer) else None for layer in stack.layers]
