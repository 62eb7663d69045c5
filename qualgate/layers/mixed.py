"""Mixed precision: one weight quantizer for most matrices, a second (or none) for a named few.

What `qualgate attribute` proposes: `{kind: weight_quant, method: mixed, base: {method: rtn, bits: 4},
keep: {method: rtn, bits: 8}, modules: [model.layers.0.mlp.down_proj, ...]}`. A name may be a linear or
a whole decoder layer (every matrix in it); `keep: null` leaves the named modules in full precision.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from qualgate.errors import ConfigError
from qualgate.layers.base import LayerParams, WeightQuantLayer, build_layer, register_layer

if TYPE_CHECKING:
    import torch


class MixedParams(LayerParams):
    base: dict[str, Any] = Field(description="the weight_quant layer of every other matrix: {method, ...params}")
    keep: dict[str, Any] | None = Field(
        None, description="the weight_quant layer of `modules` ({method, ...params}); null: full precision"
    )
    modules: list[str] = Field(min_length=1, description="linears or decoder layers quantized by `keep`")


def weight_layer(spec: dict[str, Any], where: str) -> WeightQuantLayer[Any]:
    layer = build_layer({"kind": "weight_quant", **spec}, where)
    assert isinstance(layer, WeightQuantLayer)
    return layer


@register_layer
class MixedPrecision(WeightQuantLayer[MixedParams]):
    method: ClassVar[str] = "mixed"
    Params = MixedParams
    stem_params: ClassVar[tuple[str, ...]] = ("base", "keep", "modules")

    def __init__(self, params: MixedParams, name: str | None = None) -> None:
        if params.base.get("method") == "mixed" or (params.keep or {}).get("method") == "mixed":
            raise ConfigError("weight_quant/mixed: base and keep must be single quantizers, not 'mixed'")
        self.base = weight_layer(params.base, "weight_quant/mixed: base")
        self.keep = None if params.keep is None else weight_layer(params.keep, "weight_quant/mixed: keep")
        super().__init__(params, name)

    def name_stem(self) -> str:
        """`w4g64-keep8-w8g64-1a2b3c`: the base, how many modules are kept at what, and a hash of which
        (two plans keeping different matrices must not share a name)."""
        keep = "full" if self.keep is None else self.keep.name
        which = hashlib.sha256("\n".join(self.params.modules).encode()).hexdigest()[:6]
        return f"{self.base.name}-keep{len(self.params.modules)}-{keep}-{which}"

    def check_model(self, model_dir: Path, config: dict[str, Any]) -> None:
        self.base.check_model(model_dir, config)
        if self.keep is not None:
            self.keep.check_model(model_dir, config)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from qualgate.attribution.units import quantize_alone, swap

        names = dict(model.named_modules())
        missing = [name for name in self.params.modules if name not in names]
        if missing:
            raise ConfigError(
                f"weight_quant/mixed: the model has no module {', '.join(repr(m) for m in missing[:3])}; "
                "name linears or decoder layers as model.named_modules() does (qualgate attribute prints them)"
            )
        kept = (
            quantize_alone(self.keep, model, self.params.modules)
            if self.keep is not None
            else {name: copy.deepcopy(names[name]) for name in self.params.modules}
        )
        model = self.base.apply(model)
        for name, module in kept.items():
            swap(model, name, module)
        return model
