"""KV-cache quantization layers.

K and V are quantized as they are written to the cache; later tokens attend to the quantized values.
So these layers only act when text is fed through the cache (decoding, or block-wise scoring): a
single forward pass over a whole text never reads the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from qualgate.errors import MissingDependencyError
from qualgate.layers.base import KVQuantLayer, LayerParams, register_layer

if TYPE_CHECKING:
    import torch
    from transformers import Cache, PretrainedConfig


class QuantoKVParams(LayerParams):
    bits: Literal[2, 4] = 4
    q_group_size: int = Field(64, ge=8)
    residual_length: int = Field(128, ge=0, description="most recent tokens kept in full precision")
    axis_key: Literal[0, -1] = 0
    axis_value: Literal[0, -1] = 0


@register_layer
class QuantoKV(KVQuantLayer[QuantoKVParams]):
    """transformers' QuantizedCache with the optimum-quanto backend (KIVI-style, residual window)."""

    method: ClassVar[str] = "quanto"
    Params = QuantoKVParams
    stem_params: ClassVar[tuple[str, ...]] = ("bits",)

    def name_stem(self) -> str:
        return f"kv-int{self.params.bits}"

    def make_cache(self, config: PretrainedConfig) -> Cache:
        from transformers import QuantizedCache

        try:
            import optimum.quanto  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError("optimum-quanto", "kv_quant/quanto", extra="hf") from exc
        p = self.params
        return QuantizedCache(
            backend="quanto",
            config=config,
            nbits=p.bits,
            q_group_size=p.q_group_size,
            residual_length=p.residual_length,
            axis_key=p.axis_key,
            axis_value=p.axis_value,
        )

    def storage_bits(self, config: PretrainedConfig, float_bits: int) -> dict[str, float]:
        # quanto keeps a scale and a zero point per group in the model's float dtype.
        bits = self.params.bits + 2 * float_bits / self.params.q_group_size
        return {"keys": bits, "values": bits, "mean": bits, "full_precision_tokens": float(self.params.residual_length)}


def layer_count(config: PretrainedConfig) -> int:
    """Decoder layers of the model: one cache layer each."""
    return int(config.get_text_config(decoder=True).num_hidden_layers)


def _fp8_layer_class() -> type[Any]:
    """Built lazily so that importing qualgate never imports transformers."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class Fp8KVLayer(DynamicLayer):  # type: ignore[misc]
        """Stores K and V rounded through FP8 with a fixed scale, as an engine's FP8 KV cache does.

        Every token, the current ones included, is read back from the quantized cache: engines like
        vLLM compute attention from the paged (quantized) cache, not from the fresh activations. The
        values are kept dequantized, so cropping and copying work as for an unquantized cache.
        """

        def __init__(self, fp8_dtype: torch.dtype, scale: float) -> None:
            super().__init__()
            self.fp8_dtype = fp8_dtype
            self.scale = scale
            self.fp8_max = torch.finfo(fp8_dtype).max

        def _round_trip(self, states: torch.Tensor) -> torch.Tensor:
            scaled = (states.float() / self.scale).clamp(-self.fp8_max, self.fp8_max)
            return (scaled.to(self.fp8_dtype).float() * self.scale).to(states.dtype)

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return super().update(self._round_trip(key_states), self._round_trip(value_states))  # type: ignore[no-any-return]

    return Fp8KVLayer


class Fp8KVParams(LayerParams):
    format: Literal["e4m3", "e5m2"] = "e4m3"
    scale: float = Field(1.0, gt=0, description="K/V scale; 1.0 is vLLM's default without calibrated scales")


@register_layer
class Fp8KV(KVQuantLayer[Fp8KVParams]):
    method: ClassVar[str] = "fp8"
    batch_invariant: ClassVar[bool] = True  # an elementwise cast with one fixed scale
    Params = Fp8KVParams
    stem_params: ClassVar[tuple[str, ...]] = ("format",)

    def name_stem(self) -> str:
        return f"kv-fp8-{self.params.format}"

    def make_cache(self, config: PretrainedConfig) -> Cache:
        import torch
        from transformers import Cache

        p = self.params
        dtype = torch.float8_e4m3fn if p.format == "e4m3" else torch.float8_e5m2
        layer_class = _fp8_layer_class()
        return Cache(layers=[layer_class(dtype, p.scale) for _ in range(layer_count(config))])

    def storage_bits(self, config: PretrainedConfig, float_bits: int) -> dict[str, float]:
        return {"keys": 8.0, "values": 8.0, "mean": 8.0}  # one scale for the whole cache
