"""Copying and rewinding transformers KV caches without assuming their storage format."""

from __future__ import annotations

import copy
from typing import Any


def snapshot_cache(cache: Any) -> Any:
    """An independent copy of a cache's state, cheap enough to take before every verification step.

    Cache layers never write into their tensors in place (they concatenate, reassign or slice), so
    copying each layer's attributes is enough. This also works for quantized states (quanto
    QTensors), which refuse `copy.deepcopy`.
    """
    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers]
    return clone


def croppable(cache: Any) -> bool:
    from transformers.cache_utils import BaseQuantizedLayer, DynamicLayer

    # transformers marks its quantized layers croppable, but cropping them only trims the
    # full-precision residual and leaves the quantized part (and the length) as it was.
    return all(isinstance(layer, DynamicLayer) and not isinstance(layer, BaseQuantizedLayer) for layer in cache.layers)
