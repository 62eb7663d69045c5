"""A backend plug-in, as a user writes one (docs/extending.md shows the same class): the in-process
engine of a team whose serving stack has no prefix cache, with an options model of its own.

Named in a pipeline by its path: `backend: {name: "plugin_backends:NoPrefixCache", options: {threads: 1}}`."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from qualgate import Backend, Layer, Stack
from qualgate.backends.hf import HFSession
from qualgate.layers import KVQuantLayer, SpeculationLayer, WeightQuantLayer
from qualgate.validation import validate


class NoPrefixCacheOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # a typo is exit 2 with a did-you-mean
    threads: int = Field(1, ge=1, description="torch CPU threads")


class NoPrefixCache(Backend):
    name: ClassVar[str] = "no_prefix_cache"

    def __init__(self, **options: Any) -> None:
        self.options = validate(NoPrefixCacheOptions, options, f"backend '{self.name}' options")

    def supports(self, layer: Layer[Any]) -> bool:
        # What this engine can apply: in-process quantizers and speculation, never a prefix cache.
        return not layer.engines and isinstance(layer, (WeightQuantLayer, KVQuantLayer, SpeculationLayer))

    def open(self, stack: Stack) -> HFSession:
        import torch

        torch.set_num_threads(self.options.threads)
        return HFSession(stack)
