"""A stack: a model plus an ordered list of optimization layers. The baseline is the stack with none."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qualgate.errors import ConfigError
from qualgate.layers import Layer, LayerKind, build_layer
from qualgate.models import ModelSpec


@dataclass(frozen=True)
class Stack:
    model: ModelSpec
    layers: tuple[Layer[Any], ...] = ()
    name: str = field(default="")

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for layer in self.layers:
            if layer.kind in seen:
                raise ConfigError(
                    f"stack '{self.label}': layers '{seen[layer.kind]}' and '{layer.name}' are both {layer.kind}; "
                    "a stack holds at most one layer of each kind"
                )
            seen[layer.kind] = layer.name
        if not self.name:
            object.__setattr__(self, "name", self.label)

    @property
    def label(self) -> str:
        return "base" if not self.layers else "+".join(layer.name for layer in self.layers)

    def layer(self, kind: LayerKind) -> Layer[Any] | None:
        return next((layer for layer in self.layers if layer.kind == kind), None)

    @property
    def lossless(self) -> bool:
        return all(layer.lossless for layer in self.layers)

    def without(self, kind: LayerKind) -> Stack:
        """The same stack without its layer of `kind`: the reference of a lossless layer."""
        rest = tuple(layer for layer in self.layers if layer.kind != kind)
        return Stack(model=self.model, layers=rest)

    def identity(self) -> dict[str, Any]:
        return {
            "model": {
                "path": self.model.path,
                "dtype": self.model.dtype,
                "files": self.model.fingerprint(),
                # Kernels differ by device: a record measured on a GPU is not a CPU's.
                "device": self.model.torch_device().type,
            },
            "layers": [layer.identity() for layer in self.layers],
        }

    def identity_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def build_stack(
    model: ModelSpec | Mapping[str, Any], layers: Sequence[Mapping[str, Any] | Layer[Any]] = (), name: str = ""
) -> Stack:
    spec = model if isinstance(model, ModelSpec) else ModelSpec.model_validate(dict(model))
    built = tuple(
        layer if isinstance(layer, Layer) else build_layer(layer, where=f"layers[{i}]")
        for i, layer in enumerate(layers)
    )
    return Stack(model=spec, layers=built, name=name)
