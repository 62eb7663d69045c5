"""KV caches that quantize each vector by itself or in small groups, as deployed low-bit KV methods do:
`turboquant` (random rotation, a fitted scalar codebook, an optional 1-bit QJL sketch of the key
residual; `qualgate.quant.turboquant`) and `kivi` (keys per channel, values per token, a recent-token
window in full precision; `qualgate.quant.kivi`).

Both store what attention reads (dequantized values), so cropping after a rejected speculation and
copying for the prefix store work as for an unquantized cache; `storage_bits` reports what a cache
keeping the codes would store per element, metadata included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from qualgate.errors import ConfigError
from qualgate.layers.base import KVQuantLayer, LayerParams, register_layer
from qualgate.layers.kv_quant import layer_count

if TYPE_CHECKING:
    from transformers import Cache, PretrainedConfig


def head_dim(config: PretrainedConfig) -> int:
    text = config.get_text_config(decoder=True)
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def check_group_size(config: PretrainedConfig, group_size: int, method: str) -> None:
    """A cache that groups a head's channels needs groups that divide the model's head_dim."""
    if head_dim(config) % group_size:
        raise ConfigError(
            f"kv_quant/{method}: group_size {group_size} does not divide the model's head_dim {head_dim(config)}; "
            "use a divisor of it"
        )


class TurboQuantKVParams(LayerParams):
    bits: float = Field(3.0, ge=1.0, le=8.0, description="bits per coordinate on average (with qjl: one is the sketch)")
    qjl: bool = Field(False, description="correct key inner products with a 1-bit QJL sketch of the residual")
    seed: int = Field(0, ge=0, description="seed of the rotations and sketches (one per layer and KV head)")

    @field_validator("bits")
    @classmethod
    def _half_bits(cls, value: float) -> float:
        if (value * 2) % 1:
            raise ValueError("bits must be a multiple of 0.5 (2, 2.5, 3, 3.5, 4, ...)")
        return value


def _turboquant_layer_class() -> type[Any]:
    """Built lazily so that importing qualgate never imports transformers."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class TurboQuantLayer(DynamicLayer):  # type: ignore[misc]
        def __init__(self, keys: list[Any], values: list[Any]) -> None:
            super().__init__()
            self.key_codecs, self.value_codecs = keys, values

        @staticmethod
        def _round_trip(states: torch.Tensor, codecs: list[Any]) -> torch.Tensor:
            # [batch, kv_heads, tokens, head_dim]: each head has its own rotation (and sketch)
            return torch.stack([codec.round_trip(states[:, h]) for h, codec in enumerate(codecs)], dim=1)

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            keys = self._round_trip(key_states, self.key_codecs)
            values = self._round_trip(value_states, self.value_codecs)
            return super().update(keys, values)  # type: ignore[no-any-return]

    return TurboQuantLayer


@register_layer
class TurboQuantKV(KVQuantLayer[TurboQuantKVParams]):
    """TurboQuant-style rotated low-bit KV cache; `qjl: false` is the rotation-plus-codebook (PolarQuant-like)
    variant. Keys and values get `bits` each; the QJL sketch applies to keys (it corrects inner products)."""

    method: ClassVar[str] = "turboquant"
    Params = TurboQuantKVParams
    stem_params: ClassVar[tuple[str, ...]] = ("bits", "qjl")

    def __init__(self, params: TurboQuantKVParams, name: str | None = None) -> None:
        super().__init__(params, name)
        self._codecs: dict[tuple[int, int, int], list[tuple[list[Any], list[Any]]]] = {}

    def name_stem(self) -> str:
        bits = f"{self.params.bits:g}"
        return f"kv-turboquant{bits}" + ("-qjl" if self.params.qjl else "")

    def codecs(self, config: PretrainedConfig) -> list[tuple[list[Any], list[Any]]]:
        """Per decoder layer, the key and value codecs of each KV head (built once per model shape)."""
        from qualgate.quant.turboquant import TurboQuantCodec

        dim, p = head_dim(config), self.params
        heads = int(config.get_text_config(decoder=True).num_key_value_heads or 1)
        shape = (dim, heads, layer_count(config))
        if shape not in self._codecs:
            layers = []
            try:
                for layer in range(shape[2]):
                    seeds = [p.seed * 1_000_000 + layer * 1_000 + 2 * h for h in range(heads)]
                    layers.append(
                        (
                            [TurboQuantCodec(dim, p.bits, p.qjl, s) for s in seeds],
                            [TurboQuantCodec(dim, p.bits, False, s + 1) for s in seeds],
                        )
                    )
            except ValueError as exc:
                raise ConfigError(f"kv_quant/turboquant: {exc} (head_dim {dim})") from None
            self._codecs[shape] = layers
        return self._codecs[shape]

    def make_cache(self, config: PretrainedConfig) -> Cache:
        from transformers import Cache

        layer_class = _turboquant_layer_class()
        return Cache(layers=[layer_class(keys, values) for keys, values in self.codecs(config)])

    def storage_bits(self, config: PretrainedConfig, float_bits: int) -> dict[str, float]:
        [(keys, values), *_] = self.codecs(config)
        key, value = keys[0].storage_bits(), values[0].storage_bits()
        return {"keys": key, "values": value, "mean": (key + value) / 2}


class KiviKVParams(LayerParams):
    bits: Literal[2, 4] = 2
    group_size: int = Field(32, ge=2, description="tokens per key group (per channel); channels per value group")
    residual_length: int = Field(128, ge=0, description="most recent tokens kept in full precision")


def _kivi_layer_class() -> type[Any]:
    import torch
    from transformers.cache_utils import DynamicLayer

    from qualgate.quant.kivi import per_channel, per_token

    class KiviLayer(DynamicLayer):  # type: ignore[misc]
        """The oldest full-precision tokens are quantized a whole key group at a time once more than
        `residual` tokens are newer than them, so a token's stored values depend only on the tokens up
        to the end of its group (as KIVI's streaming cache)."""

        def __init__(self, bits: int, group: int, residual: int) -> None:
            super().__init__()
            self.bits, self.group, self.residual = bits, group, residual
            self.n_quantized = 0

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = super().update(key_states, value_states)
            start = self.n_quantized
            ready = keys.shape[-2] - self.residual - start  # older than the window, not yet quantized
            end = start + max(0, ready) // self.group * self.group
            if end > start:
                old_k = keys[..., start:end, :].unflatten(-2, (-1, self.group))  # [.., groups, group, dim]
                old_v = values[..., start:end, :]
                new_k = per_channel(old_k, self.bits).flatten(-3, -2)
                new_v = per_token(old_v, self.bits, self.group)
                keys = torch.cat([keys[..., :start, :], new_k, keys[..., end:, :]], dim=-2)
                values = torch.cat([values[..., :start, :], new_v, values[..., end:, :]], dim=-2)
                self.keys, self.values, self.n_quantized = keys, values, end
            return keys, values

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)
            self.n_quantized = min(self.n_quantized, self.get_seq_length())

    return KiviLayer


@register_layer
class KiviKV(KVQuantLayer[KiviKVParams]):
    """KIVI: 2- or 4-bit asymmetric quantization, keys per channel over groups of tokens, values per
    token over groups of channels, the `residual_length` most recent tokens in full precision."""

    method: ClassVar[str] = "kivi"
    Params = KiviKVParams
    stem_params: ClassVar[tuple[str, ...]] = ("bits",)

    def name_stem(self) -> str:
        return f"kv-kivi{self.params.bits}"

    def make_cache(self, config: PretrainedConfig) -> Cache:
        from transformers import Cache

        p = self.params
        check_group_size(config, p.group_size, "kivi")
        layer_class = _kivi_layer_class()
        return Cache(layers=[layer_class(p.bits, p.group_size, p.residual_length) for _ in range(layer_count(config))])

    def storage_bits(self, config: PretrainedConfig, float_bits: int) -> dict[str, float]:
        from qualgate.quant.kivi import storage_bits

        bits = storage_bits(self.params.bits, self.params.group_size)
        return {"keys": bits, "values": bits, "mean": bits, "full_precision_tokens": float(self.params.residual_length)}
