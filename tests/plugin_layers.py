"""Layers defined outside qualgate, loaded by "module:Class" exactly as a user's plug-in would be."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from qualgate.layers import LayerParams, WeightQuantLayer
from qualgate.layers.speculation import Ngram


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


class LossyTop2Ngram(Ngram):
    """A deliberately broken speculation: accepts a draft token whenever it is in the target's top 2."""

    method: ClassVar[str] = "lossy_top2"

    def accept(self, draft: Sequence[int], target_logprobs: torch.Tensor) -> int:
        top2 = target_logprobs.topk(2, dim=-1).indices.tolist()
        accepted = 0
        for token, allowed in zip(draft, top2, strict=False):
            if token not in allowed:
                break
            accepted += 1
        return accepted


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
