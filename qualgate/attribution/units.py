"""The units a weight quantizer's loss is attributed to (one linear matrix, or every matrix of one
decoder layer) and how one unit is quantized alone.

A unit is quantized by copying its modules into an empty skeleton of the model's module tree (so the
quantizer sees their real names, as it would in the whole model), applying the layer there, and swapping
the result into the model; swapping the original back restores it exactly. Any weight quantizer works
this way, whether it rewrites weights in place (RTN) or replaces modules (quanto, torchao).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qualgate.errors import ConfigError
from qualgate.layers.weight_quant import quantizable_linears

if TYPE_CHECKING:
    import torch

    from qualgate.layers.base import WeightQuantLayer

Granularity = Literal["matrix", "layer"]
_DECODER_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")
_PROBE_ROWS = 1024  # identity rows per probe step when reading a quantized matrix back


@dataclass(frozen=True)
class Unit:
    """What is swapped (a linear, or a decoder layer) and the linear matrices it holds."""

    name: str
    matrices: tuple[str, ...]


def find_units(model: torch.nn.Module, include_lm_head: bool, granularity: Granularity) -> list[Unit]:
    names = [name for name, _ in quantizable_linears(model, include_lm_head)]
    if granularity == "matrix":
        return [Unit(name, (name,)) for name in names]
    groups: dict[str, list[str]] = {}
    for name in names:
        match = _DECODER_LAYER.match(name)
        groups.setdefault(match.group(1) if match else name, []).append(name)
    return [Unit(name, tuple(matrices)) for name, matrices in groups.items()]


def quantize_alone(
    layer: WeightQuantLayer[Any], model: torch.nn.Module, names: Sequence[str]
) -> dict[str, torch.nn.Module]:
    """Copies of the named modules, quantized by `layer` under their own names; the model is untouched."""
    import torch

    skeleton = torch.nn.Module()
    for name in names:
        _place(skeleton, name, copy.deepcopy(model.get_submodule(name)))
    quantized = layer.apply(skeleton)
    return {name: quantized.get_submodule(name) for name in names}


def _place(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    import torch

    *path, leaf = name.split(".")
    node = root
    for part in path:
        if node._modules.get(part) is None:
            node.add_module(part, torch.nn.Module())
        child = node._modules[part]
        assert child is not None
        node = child
    node.add_module(leaf, module)


def swap(model: torch.nn.Module, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Put `module` at `name` in the model; returns the module that was there."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if parent._modules.get(leaf) is None:
        raise ConfigError(f"the model has no module '{name}'; name a linear or a decoder layer it has")
    old = parent._modules[leaf]
    assert old is not None
    parent._modules[leaf] = module
    return old


def effective_weight(module: torch.nn.Module, in_features: int, like: torch.Tensor) -> torch.Tensor:
    """The [out, in] matrix a (possibly quantized) linear applies, read back by feeding it the identity:
    the same for weights stored dequantized (RTN) and for packed kernels (quanto, torchao)."""
    import torch

    with torch.no_grad():
        zero = module(torch.zeros(1, in_features, dtype=like.dtype, device=like.device))
        rows = []
        for start in range(0, in_features, _PROBE_ROWS):
            eye = torch.eye(in_features, dtype=like.dtype, device=like.device)[start : start + _PROBE_ROWS]
            rows.append(module(eye) - zero)
        return torch.cat(rows).T.to(torch.float64)


def weight_error(original: torch.nn.Module, quantized: torch.nn.Module, unit: Unit) -> tuple[float, float]:
    """(signal energy, error energy) over the unit's matrices: SQNR is their ratio."""
    prefix = len(unit.name) + 1
    signal = noise = 0.0
    for name in unit.matrices:
        relative = name[prefix:] if name != unit.name else ""
        before = original.get_submodule(relative) if relative else original
        after = quantized.get_submodule(relative) if relative else quantized
        weight = before.weight
        exact = weight.detach().to(__import__("torch").float64)
        error = effective_weight(after, int(weight.shape[1]), weight) - exact
        signal += float((exact**2).sum())
        noise += float((error**2).sum())
    return signal, noise


class OutputCosine:
    """A forward hook on a swapped-in unit: runs the original unit on the same inputs and keeps the mean
    cosine similarity of the two outputs per token (the unit's own damage, before it propagates)."""

    def __init__(self, original: torch.nn.Module) -> None:
        self.original = original
        self.total = 0.0
        self.count = 0

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        import torch

        clean = dict(kwargs)
        # A decoder layer must not write the KV cache a second time: the original runs without it.
        for key in ("past_key_value", "past_key_values"):
            if key in clean:
                clean[key] = None
        if "use_cache" in clean:
            clean["use_cache"] = False
        with torch.no_grad():
            expected = self.original(*args, **clean)
        got, want = _first(output).float(), _first(expected).float()
        cosine = torch.nn.functional.cosine_similarity(
            got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]), dim=-1
        )
        self.total += float(cosine.double().sum())
        self.count += int(cosine.numel())

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output
