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
