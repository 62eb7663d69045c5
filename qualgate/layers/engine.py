"""Layers that only an engine applies: its own quantized formats and KV-cache types.

qualgate cannot reproduce a GGUF K-quant or vLLM's fused FP8 kernels in process, and should not try:
the engine's kernels are what gets deployed, and where its bugs live. These layers carry the engine's
parameters; the engine backends named in `engines` turn them into flags. The portable layers (rtn,
fp8 KV, ngram, draft model, block prefix cache) are mapped by the engines too (docs/engines.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from qualgate.errors import ConfigError
from qualgate.layers.base import KVQuantLayer, Layer, LayerParams, WeightQuantLayer, register_layer

if TYPE_CHECKING:
    import torch
    from transformers import Cache, PretrainedConfig

GGUFType = Literal["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_NL"]
GGMLCacheType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]


def _engine_only(layer: Any) -> ConfigError:
    return ConfigError(
        f"layer '{layer.name}' ({layer.kind}/{layer.method}) runs inside {' or '.join(layer.engines)}; "
        f"set backend.name to one of them"
    )


class GGUFParams(LayerParams):
    type: GGUFType = Field("Q4_K_M", description="llama.cpp quantization type (llama_model_quantize)")
    quantize_output: bool = Field(True, description="quantize output.weight too (llama.cpp's default)")


@register_layer
class GGUFQuant(WeightQuantLayer[GGUFParams]):
    """A GGUF quantization type made from the baseline's GGUF with llama.cpp's own quantizer."""

    method: ClassVar[str] = "gguf"
    engines: ClassVar[tuple[str, ...]] = ("llamacpp",)
    Params = GGUFParams
    stem_params: ClassVar[tuple[str, ...]] = ("type",)

    def name_stem(self) -> str:
        return f"gguf-{self.params.type.lower()}"

    def simulation(self) -> Layer[Any] | None:
        """The same GGUF file, dequantized into the HF model (weight_quant/gguf_dequant)."""
        from qualgate.layers.gguf_sim import GGUFDequant, GGUFDequantParams

        p = self.params
        return GGUFDequant(GGUFDequantParams.model_validate({"type": p.type, "quantize_output": p.quantize_output}))

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise _engine_only(self)


class GGMLKVParams(LayerParams):
    type_k: GGMLCacheType = "q8_0"
    type_v: GGMLCacheType = "q8_0"


@register_layer
class GGMLKV(KVQuantLayer[GGMLKVParams]):
    """llama.cpp's KV cache types (--cache-type-k/-v); a quantized V cache needs flash attention."""

    method: ClassVar[str] = "ggml"
    engines: ClassVar[tuple[str, ...]] = ("llamacpp",)
    Params = GGMLKVParams
    stem_params: ClassVar[tuple[str, ...]] = ("type_k", "type_v")

    def name_stem(self) -> str:
        p = self.params
        return f"kv-{p.type_k}" if p.type_k == p.type_v else f"kv-{p.type_k}-{p.type_v}"

    def make_cache(self, config: PretrainedConfig) -> Cache:
        raise _engine_only(self)


class VLLMQuantParams(LayerParams):
    quantization: str = Field(description="vLLM --quantization (fp8, awq, gptq, compressed-tensors, ...)")
    checkpoint: str | None = Field(
        None, description="a pre-quantized checkpoint to serve instead of the stack's model (AWQ, GPTQ)"
    )


@register_layer
class VLLMQuant(WeightQuantLayer[VLLMQuantParams]):
    """A vLLM quantization method: in-flight (fp8) or a pre-quantized checkpoint (awq, gptq)."""

    method: ClassVar[str] = "vllm"
    engines: ClassVar[tuple[str, ...]] = ("vllm",)
    Params = VLLMQuantParams
    stem_params: ClassVar[tuple[str, ...]] = ("quantization",)

    def name_stem(self) -> str:
        return f"w-{self.params.quantization}"

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise _engine_only(self)
