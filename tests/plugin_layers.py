"""Layers defined outside qualgate, loaded by "module:Class" exactly as a user's plug-in would be."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import model_validator

from qualgate.layers import LayerParams, WeightQuantLayer
from qualgate.layers.kv_quant import Fp8KV, _fp8_layer_class
from qualgate.layers.prefix_cache import BlockPrefixCache, PrefixStore
from qualgate.layers.speculation import DraftModel, Ngram
from qualgate.layers.weight_quant import RoundToNearest, RTNParams, fake_quantize_groupwise, quantizable_linears


class ScaleParams(LayerParams):
    factor: float = 1.0


class ScaleMLPWeights(WeightQuantLayer):
    """A toy 'quantizer' that scales every MLP down-projection: easy to check it was applied."""

    method: ClassVar[str] = "scale_mlp"
    Params = ScaleParams

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        assert isinstance(self.params, ScaleParams)
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith("mlp.down_proj"):
                    module.weight.mul_(self.params.factor)
        return model


def accept_top2(draft: Sequence[int], target_logprobs: torch.Tensor) -> int:
    """The lossy rule both broken speculations share: a draft token is accepted while it is in the
    target's top 2 (greedy verification accepts only the top 1)."""
    top2 = target_logprobs.topk(2, dim=-1).indices.tolist()
    accepted = 0
    for token, allowed in zip(draft, top2, strict=False):
        if token not in allowed:
            break
        accepted += 1
    return accepted


class LossyTop2Ngram(Ngram):
    """A deliberately broken speculation: accepts a draft token whenever it is in the target's top 2."""

    method: ClassVar[str] = "lossy_top2"

    def accept(self, draft: Sequence[int], target_logprobs: torch.Tensor) -> int:
        return accept_top2(draft, target_logprobs)


class NotALayer:
    pass


class NearTieNgram(Ngram):
    """Accepts a draft token that is the target's second choice within a tiny margin: it can only
    change the output at near-ties, never at a confident position."""

    method: ClassVar[str] = "near_tie_only"
    margin: ClassVar[float] = 0.05

    def accept(self, draft: Sequence[int], target_logprobs: torch.Tensor) -> int:
        top = target_logprobs.topk(2, dim=-1)
        accepted = 0
        for i, token in enumerate(draft):
            best, second = top.indices[i].tolist()
            close = float(top.values[i, 0] - top.values[i, 1]) <= self.margin
            if not (token == best or (token == second and close)):
                break
            accepted += 1
        return accepted


# -- planted defects: each is a real bug class an optimization stack ships with -----------------------


class PartialKeyStore(PrefixStore):
    """The classic prefix-cache hash bug: each block is keyed on its first half only, so a prompt that
    differs from a cached one in the second half of a block reuses that block's stale K/V."""

    def match(self, key: tuple[int, ...], prompt: list[int], limit: int, croppable: bool) -> int:
        b, half = self.block_size, max(1, self.block_size // 2)
        n = 0
        while n + b <= min(len(key), limit) and key[n : n + half] == tuple(prompt[n : n + half]):
            n += b
        return n


class PartialKeyPrefixCache(BlockPrefixCache):
    """A prefix cache that claims to be lossless but keys blocks on part of their tokens."""

    method: ClassVar[str] = "partial_key"

    def make_store(self, snapshot: Any) -> PrefixStore:
        return PartialKeyStore(self.params.block_size, self.params.max_entries, snapshot)


class OffByOneStore(PrefixStore):
    """Reuses one token past the last whole block that matches (a boundary off by one)."""

    def match(self, key: tuple[int, ...], prompt: list[int], limit: int, croppable: bool) -> int:
        shared = super().match(key, prompt, limit, croppable)
        return min(shared + 1, limit, len(key)) if shared else 0


class OffByOnePrefixCache(BlockPrefixCache):
    method: ClassVar[str] = "off_by_one"

    def make_store(self, snapshot: Any) -> PrefixStore:
        return OffByOneStore(self.params.block_size, self.params.max_entries, snapshot)


class TopTwoDraft(DraftModel):
    """Draft-model speculation whose acceptance takes the target's top-2 tokens: lossy, claims lossless,
    same method parameters as the built-in."""

    def accept(self, draft: Sequence[int], target_logprobs: torch.Tensor) -> int:
        return accept_top2(draft, target_logprobs)


class DecodeSaturatingFp8(Fp8KV):
    """An FP8 KV cache whose single-token writes use a scale 512x too small, so anything above 448/512
    saturates: prefill is correct, every decoded token's K/V is clipped. Blocks of 32 never show it;
    serving does."""

    method: ClassVar[str] = "fp8_decode_saturates"

    def make_cache(self, config: Any) -> Any:
        from transformers import Cache

        base = _fp8_layer_class()

        class Saturating(base):  # type: ignore[misc, valid-type]
            def _round_trip(self, states: torch.Tensor) -> torch.Tensor:
                if states.shape[-2] != 1:
                    return super()._round_trip(states)  # type: ignore[no-any-return]
                small = self.scale / 512
                scaled = (states.float() / small).clamp(-self.fp8_max, self.fp8_max)
                return (scaled.to(self.fp8_dtype).float() * small).to(states.dtype)

        dtype = torch.float8_e4m3fn
        layers = config.get_text_config(decoder=True).num_hidden_layers
        return Cache(layers=[Saturating(dtype, self.params.scale) for _ in range(layers)])


class WrongScaleRTN(RoundToNearest):
    """Symmetric group-wise RTN whose scale comes from half the group's absmax (a wrong quantizer
    scale): the outer weights of every group saturate at the end codes."""

    method: ClassVar[str] = "rtn_wrong_scale"

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        p = self.params
        assert isinstance(p, RTNParams)
        qmax = 2 ** (p.bits - 1) - 1
        with torch.no_grad():
            for _name, linear in quantizable_linears(model, p.include_lm_head):
                out_features, in_features = linear.weight.shape
                size = p.group_size or in_features
                groups = linear.weight.float().reshape(out_features, in_features // size, size)
                scale = (groups.abs().amax(dim=-1, keepdim=True) / 2 / qmax).clamp(min=1e-12)
                codes = torch.clamp(torch.round(groups / scale), -qmax - 1, qmax)
                linear.weight.copy_((codes * scale).reshape(out_features, in_features))
        return model


class ExplodingParams(LayerParams):
    """A plug-in with a bug: its validator raises what no validation expects (for the exit-4 contract)."""

    @model_validator(mode="after")
    def _explode(self) -> ExplodingParams:
        raise ZeroDivisionError("a plug-in's own bug")


class Exploding(WeightQuantLayer):
    method: ClassVar[str] = "exploding"
    Params = ExplodingParams

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


class PlantedParams(RTNParams):
    planted: str = "model.layers.2.mlp.up_proj"
    planted_bits: int = 2


class PlantedWorstMatrix(RoundToNearest):
    """RTN as configured everywhere except one named matrix, rounded to `planted_bits`: a per-matrix
    setting applied to the wrong matrix (or a scale computed for another one), which attribution must
    rank first."""

    method: ClassVar[str] = "planted_worst"
    Params = PlantedParams

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        model = super().apply(model)
        p = self.params
        assert isinstance(p, PlantedParams)
        with torch.no_grad():
            for name, linear in quantizable_linears(model, p.include_lm_head):
                if name == p.planted:
                    linear.weight.copy_(
                        fake_quantize_groupwise(linear.weight, p.planted_bits, p.group_size, p.symmetric)
                    )
        return model
