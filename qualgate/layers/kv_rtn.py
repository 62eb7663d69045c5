"""Round-to-nearest KV cache with separate bits for keys and values: what the K-vs-V sweep varies.

Each token's K (and V) is quantized on its own, in groups of `group_size` consecutive channels with an
asymmetric minimum and scale (kept in float16), as it is written to the cache; every later token reads
the rounded values back. A null bit width leaves that side in full precision, so `bits_k: 4, bits_v:
null` is the K-only variant of a 4-bit cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, model_validator

from qualgate.layers.base import KVQuantLayer, LayerParams, register_layer
from qualgate.layers.kv_quant import layer_count
from qualgate.layers.kv_rotated import check_group_size

if TYPE_CHECKING:
    import torch
    from transformers import Cache, PretrainedConfig


class RTNKVParams(LayerParams):
    bits_k: int | None = Field(4, ge=2, le=8, description="bits per key element; null: keys in full precision")
    bits_v: int | None = Field(4, ge=2, le=8, description="bits per value element; null: values in full precision")
    group_size: int = Field(32, ge=2, description="consecutive channels of one token sharing a minimum and scale")

    @model_validator(mode="after")
    def _something_quantized(self) -> RTNKVParams:
        if self.bits_k is None and self.bits_v is None:
            raise ValueError("bits_k and bits_v are both null: nothing would be quantized")
        return self


def _rtn_layer_class() -> type[Any]:
    from transformers.cache_utils import DynamicLayer

    from qualgate.quant.kivi import per_token

    class RTNKVLayer(DynamicLayer):  # type: ignore[misc]
        def __init__(self, bits_k: int | None, bits_v: int | None, group: int) -> None:
            super().__init__()
            self.bits_k, self.bits_v, self.group = bits_k, bits_v, group

        def _round(self, states: torch.Tensor, bits: int | None) -> torch.Tensor:
            return states if bits is None else per_token(states, bits, self.group)

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self._round(key_states, self.bits_k), self._round(value_states, self.bits_v)
            return super().update(keys, values)  # type: ignore[no-any-return]

    return RTNKVLayer


@register_layer
class RTNKV(KVQuantLayer[RTNKVParams]):
    """Per-token group round-to-nearest K and V, each with its own bit width (or none)."""

    method: ClassVar[str] = "rtn"
    Params = RTNKVParams
    stem_params: ClassVar[tuple[str, ...]] = ("bits_k", "bits_v")

    def name_stem(self) -> str:
        p = self.params
        return f"kv-k{p.bits_k or 'fp'}v{p.bits_v or 'fp'}"

    def make_cache(self, config: PretrainedConfig) -> Cache:
        from transformers import Cache

        p = self.params
        check_group_size(config, p.group_size, "rtn")
        layer_class = _rtn_layer_class()
        return Cache(layers=[layer_class(p.bits_k, p.bits_v, p.group_size) for _ in range(layer_count(config))])

    def storage_bits(self, config: PretrainedConfig, float_bits: int) -> dict[str, float]:
        from qualgate.quant.kivi import storage_bits

        p = self.params
        keys = storage_bits(p.bits_k, p.group_size) if p.bits_k else float(float_bits)
        values = storage_bits(p.bits_v, p.group_size) if p.bits_v else float(float_bits)
        return {"keys": keys, "values": values, "mean": (keys + values) / 2}
