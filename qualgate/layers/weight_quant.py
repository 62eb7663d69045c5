"""Weight quantization layers: qualgate's own round-to-nearest, and library-backed quanto / torchao.

All methods leave `lm_head` in full precision unless asked (as AWQ, GPTQ and most GGUF recipes do):
the output projection is the most sensitive matrix and quantizing it is a separate decision.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from qualgate.errors import ConfigError, MissingDependencyError
from qualgate.layers.base import LayerParams, WeightQuantLayer, register_layer

if TYPE_CHECKING:
    import torch


def quantizable_linears(model: torch.nn.Module, include_lm_head: bool) -> Iterator[tuple[str, torch.nn.Linear]]:
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (include_lm_head or name.split(".")[-1] != "lm_head"):
            yield name, module


def untie_lm_head(model: torch.nn.Module) -> None:
    """Give lm_head its own weight, so quantizing it cannot silently quantize the embeddings too."""
    import torch

    head = getattr(model, "lm_head", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and embeddings is not None and head.weight is embeddings.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        if hasattr(model, "config"):
            model.config.tie_word_embeddings = False


def fake_quantize_groupwise(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize `weight` [out, in] in groups along the input dim.

    Conventions follow GPTQ's quantizer: symmetric uses the range [-absmax, absmax] with the zero point
    at the middle code 2^(bits-1); asymmetric uses [min, max] (widened to include 0) with an integer
    zero point. Computed in float32 and cast back, so the only error is the quantization itself.
    """
    import torch

    out_features, in_features = weight.shape
    size = in_features if group_size is None else group_size
    groups = weight.detach().to(torch.float32).reshape(out_features, in_features // size, size)
    qmax = 2**bits - 1
    if symmetric:
        absmax = groups.abs().amax(dim=-1, keepdim=True)
        scale = (2 * absmax / qmax).clamp(min=1e-12)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        low = groups.amin(dim=-1, keepdim=True).clamp(max=0)
        high = groups.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = ((high - low) / qmax).clamp(min=1e-12)
        zero = torch.round(-low / scale)
    codes = torch.clamp(torch.round(groups / scale) + zero, 0, qmax)
    return ((codes - zero) * scale).reshape(out_features, in_features).to(weight.dtype)


class RTNParams(LayerParams):
    bits: int = Field(4, ge=2, le=8, description="bits per weight")
    group_size: int | None = Field(128, ge=8, description="weights per scale along the input dim; null = per channel")
    symmetric: bool = Field(False, description="symmetric (GPTQ sym=True) or with a zero point (AWQ style)")
    include_lm_head: bool = False


@register_layer
class RoundToNearest(WeightQuantLayer[RTNParams]):
    """Group-wise round-to-nearest fake quantization (the weights are stored dequantized)."""

    method: ClassVar[str] = "rtn"
    Params = RTNParams
    stem_params: ClassVar[tuple[str, ...]] = ("bits", "group_size")

    def name_stem(self) -> str:
        p = self.params
        return f"w{p.bits}" + (f"g{p.group_size}" if p.group_size else "")

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        import torch

        p = self.params
        if p.include_lm_head:
            untie_lm_head(model)
        with torch.no_grad():
            for name, linear in quantizable_linears(model, p.include_lm_head):
                in_features = linear.weight.shape[1]
                if p.group_size is not None and in_features % p.group_size:
                    raise ConfigError(
                        f"weight_quant/rtn: group_size {p.group_size} does not divide the input size "
                        f"{in_features} of '{name}'; pick a divisor of {in_features} or null (per channel)"
                    )
                linear.weight.copy_(fake_quantize_groupwise(linear.weight, p.bits, p.group_size, p.symmetric))
        return model


class QuantoParams(LayerParams):
    weights: Literal["int8", "int4", "int2", "float8"] = "int8"
    include_lm_head: bool = False


@register_layer
class Quanto(WeightQuantLayer[QuantoParams]):
    """optimum-quanto weight-only quantization: real packed weights and quanto's matmul kernels."""

    method: ClassVar[str] = "quanto"
    Params = QuantoParams
    stem_params: ClassVar[tuple[str, ...]] = ("weights",)

    def name_stem(self) -> str:
        return f"quanto-{self.params.weights}"

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            import optimum.quanto as quanto
        except ImportError as exc:
            raise MissingDependencyError("optimum-quanto", "weight_quant/quanto", extra="hf") from exc
        p = self.params
        qtype = {"int8": quanto.qint8, "int4": quanto.qint4, "int2": quanto.qint2, "float8": quanto.qfloat8}
        quanto.quantize(model, weights=qtype[p.weights], exclude=None if p.include_lm_head else ["lm_head"])
        quanto.freeze(model)
        return model


class TorchAOParams(LayerParams):
    bits: int = Field(8, ge=1, le=8)
    group_size: int | None = Field(None, ge=8, description="null = per output channel")
    symmetric: bool = True
    include_lm_head: bool = False


@register_layer
class TorchAO(WeightQuantLayer[TorchAOParams]):
    """torchao weight-only integer quantization (Int8WeightOnly for 8-bit per channel, IntxWeightOnly else)."""

    method: ClassVar[str] = "torchao"
    Params = TorchAOParams
    stem_params: ClassVar[tuple[str, ...]] = ("bits", "group_size")

    def name_stem(self) -> str:
        p = self.params
        return f"torchao-int{p.bits}" + (f"g{p.group_size}" if p.group_size else "")

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        import torch

        try:
            from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
            from torchao.quantization.granularity import PerAxis, PerGroup
            from torchao.quantization.quant_primitives import MappingType
        except ImportError as exc:
            raise MissingDependencyError("torchao", "weight_quant/torchao", extra="hf") from exc
        p = self.params
        targets = dict(quantizable_linears(model, p.include_lm_head))
        if p.group_size is not None:
            for name, linear in targets.items():
                if linear.weight.shape[1] % p.group_size:
                    raise ConfigError(
                        f"weight_quant/torchao: group_size {p.group_size} does not divide the input size "
                        f"{linear.weight.shape[1]} of '{name}'; pick a divisor or null (per channel)"
                    )
        if p.include_lm_head:
            untie_lm_head(model)
        config: object
        if p.bits == 8 and p.group_size is None and p.symmetric:
            config = Int8WeightOnlyConfig()
        else:
            config = IntxWeightOnlyConfig(
                weight_dtype=getattr(torch, f"int{p.bits}"),
                granularity=PerGroup(p.group_size) if p.group_size else PerAxis(0),
                mapping_type=MappingType.SYMMETRIC if p.symmetric else MappingType.ASYMMETRIC,
            )
        quantize_(model, config, filter_fn=lambda module, fqn: fqn in targets)
        return model
