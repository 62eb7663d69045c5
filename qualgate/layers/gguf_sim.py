"""A GGUF type's quantization algorithm alone: llama.cpp's own quantizer output, dequantized into the
HF model and run with PyTorch's float kernels.

The `gguf` layer on the llamacpp backend serves the same file with llama.cpp's kernels (which, for
K-quants and Q8_0, also round activations to 8 bits inside their dot products). Measured against one
golden, the two split a GGUF type's loss into what the quantizer costs and what the engine adds: the
kernel_loss instrument does that split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from qualgate.errors import ConfigError, MissingDependencyError
from qualgate.layers.base import WeightQuantLayer, register_layer
from qualgate.layers.engine import GGUFParams
from qualgate.layers.weight_quant import untie_lm_head

if TYPE_CHECKING:
    import torch


class GGUFDequantParams(GGUFParams):
    cache_dir: str = Field(
        "runs/gguf", description="converted and quantized GGUF files, shared with the llamacpp backend"
    )


def _inverse_rotary(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo the converter's interleaving of each head's rotary pairs (gguf_convert.permute_rotary)."""
    rows = weights.shape[0]
    return weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:]).transpose(1, 2).reshape(weights.shape)


@register_layer
class GGUFDequant(WeightQuantLayer[GGUFDequantParams]):
    """llama.cpp's quantizer, in process: the GGUF type's weights dequantized into the model."""

    method: ClassVar[str] = "gguf_dequant"
    Params = GGUFDequantParams
    stem_params: ClassVar[tuple[str, ...]] = ("type",)

    def name_stem(self) -> str:
        return f"gguf-{self.params.type.lower()}-sim"

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        import torch

        try:
            import gguf
        except ImportError:
            raise MissingDependencyError("gguf", "weight_quant/gguf_dequant", "llamacpp") from None
        from pathlib import Path

        from qualgate.engines.gguf_convert import gguf_name
        from qualgate.engines.gguf_quant import quantized_gguf
        from qualgate.models import ModelSpec

        source = getattr(model.config, "_name_or_path", "")
        if not source or not Path(source).is_dir():
            raise ConfigError("weight_quant/gguf_dequant: the model must be loaded from a local directory")
        half = next(model.parameters()).dtype == torch.float16
        # The file the llamacpp backend serves: quantized from the f32 (or f16) conversion of the same weights.
        spec = ModelSpec(path=source, dtype="float16") if half else ModelSpec(path=source, dtype="float32")
        path = quantized_gguf(
            spec,
            self.params.type,
            Path(self.params.cache_dir),
            self.params.quantize_output,
        )
        untie_lm_head(model)  # llama.cpp quantizes output.weight on its own (Q6_K in Q4_K_M)
        parameters = dict(model.named_parameters())
        by_gguf = {}
        for name in parameters:
            try:
                by_gguf[gguf_name(name)] = name
            except ConfigError:
                continue
        config = model.config
        n_head = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_head
        loaded = set()
        with torch.no_grad():
            for tensor in gguf.GGUFReader(str(path)).tensors:
                name = by_gguf.get(tensor.name)
                if name is None:
                    continue
                values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
                if name.endswith("q_proj.weight"):
                    values = _inverse_rotary(values, n_head)
                elif name.endswith("k_proj.weight"):
                    values = _inverse_rotary(values, n_kv)
                target = parameters[name]
                if tuple(values.shape) != tuple(target.shape):
                    raise ConfigError(
                        f"weight_quant/gguf_dequant: {tensor.name} is {tuple(values.shape)}, "
                        f"'{name}' is {tuple(target.shape)}; the GGUF was made from another model"
                    )
                target.copy_(values.to(target.dtype))
                loaded.add(name)
        missing = [name for name in parameters if name not in loaded and name in by_gguf.values()]
        if missing:
            raise ConfigError(f"weight_quant/gguf_dequant: {path.name} lacks {', '.join(missing[:3])}")
        return model
