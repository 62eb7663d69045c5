"""What a layer is: one optimization with a kind, a method, parameters and a `lossless` flag.

A layer is declarative: its parameters say what the optimization is. The in-process HF backend
applies it through the hook of its kind (below); engine backends translate the same parameters to
their own flags. A user's layer subclasses one of the four kind bases and is named in a pipeline by
"package.module:Class" as its method.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from qualgate.code_identity import class_identity
from qualgate.errors import ConfigError
from qualgate.registry import Registry, did_you_mean
from qualgate.validation import validate

if TYPE_CHECKING:
    import torch
    from transformers import Cache, PretrainedConfig

LayerKind = Literal["weight_quant", "kv_quant", "speculation", "prefix_cache"]
LAYER_KINDS: tuple[LayerKind, ...] = ("weight_quant", "kv_quant", "speculation", "prefix_cache")


class LayerParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpeculationParams(LayerParams):
    num_speculative_tokens: int = Field(4, ge=1, le=32)


class PrefixCacheParams(LayerParams):
    block_size: int = Field(16, ge=1, description="reuse granularity in tokens (vLLM's default block is 16)")
    max_entries: int = Field(64, ge=1, description="cached prefixes kept, least recently used dropped first")


P = TypeVar("P", bound=LayerParams)
SP = TypeVar("SP", bound=SpeculationParams)
PP = TypeVar("PP", bound=PrefixCacheParams)


class Layer(ABC, Generic[P]):
    kind: ClassVar[LayerKind]
    method: ClassVar[str]
    lossless: ClassVar[bool]
    Params: ClassVar[type[LayerParams]] = LayerParams  # the class of `params`, used to validate configs
    # Engines that apply this layer themselves (vLLM, llama.cpp); empty: qualgate applies it in process
    # through its kind's hook, so the HF backend and every engine that maps its parameters can run it.
    engines: ClassVar[tuple[str, ...]] = ()
    # The parameters `name_stem` already shows (`bits` and `group_size` in `w4g64`): the default name
    # does not repeat them in its suffix.
    stem_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: P, name: str | None = None) -> None:
        self.params: P = params
        self.name = name or self.default_name()

    def simulation(self) -> Layer[Any] | None:
        """The same optimization run in process by qualgate, the reference engine: what an engine's
        measurement is split against (the kernel_loss instrument). A layer qualgate applies itself is
        its own simulation; an engine-only layer names its in-process equivalent, or None."""
        return None if self.engines else self

    def name_stem(self) -> str:
        """The short name of this method (`kv-fp8-e4m3`); built-ins override it, showing `stem_params`."""
        return f"{self.kind}:{self.method}"

    def default_name(self) -> str:
        """The name a layer gets when its configuration gives none: the stem, then `-<param><value>` for
        every parameter that differs from its default and the stem does not show (`kv-fp8-e4m3-scale0.002`),
        so two configurations never share a name by accident. A plug-in is prefixed with its class name
        (`TopTwoDraft-spec-draft4`): a subclass inheriting a built-in's stem must not pass for it."""
        name = "-".join([self.name_stem(), *param_suffix(self.params, skip=self.stem_params)])
        return name if is_builtin(type(self)) else f"{type(self).__name__}-{name}"

    def identity(self) -> dict[str, Any]:
        """Everything that determines this layer's effect; part of every cache key that involves it.

        The code is part of it: a plug-in subclass with a built-in's method name and parameters, or an
        edited plug-in module, is another layer."""
        return {
            "kind": self.kind,
            "method": self.method,
            "params": self.params.model_dump(mode="json"),
            "code": class_identity(type(self)),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.params.model_dump()})"


class WeightQuantLayer(Layer[P]):
    kind: ClassVar[LayerKind] = "weight_quant"
    lossless: ClassVar[bool] = False

    @abstractmethod
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Quantize the model's weights (in place or not) and return the model to run."""

    def check_model(self, model_dir: Path, config: dict[str, Any]) -> None:
        """Check this layer fits the baseline (its directory and config.json) before any model loads;
        raise ConfigError naming what does not. Most layers fit any model."""


class KVQuantLayer(Layer[P]):
    kind: ClassVar[LayerKind] = "kv_quant"
    lossless: ClassVar[bool] = False
    # Whether a row's K/V round trip reads nothing of the other rows of a batch (an elementwise cast with
    # a fixed scale): then sequences may share one batched cache and score as they would alone. A method
    # whose scales pool over the batch must leave it False; its sequences are fed one by one.
    batch_invariant: ClassVar[bool] = False

    @abstractmethod
    def make_cache(self, config: PretrainedConfig) -> Cache:
        """A fresh, empty KV cache that quantizes K and V as they are written."""

    def storage_bits(self, config: PretrainedConfig, float_bits: int) -> dict[str, float] | None:
        """Bits per K and V element a cache keeping this layer's codes stores, metadata (scales, norms)
        included: {"keys", "values", "mean"} and, where recent tokens stay unquantized,
        "full_precision_tokens" (stored at `float_bits`, the model's dtype). None when the method does
        not say (a plug-in)."""
        return None


class Proposer(ABC):
    """Proposes draft tokens for one sequence; verification belongs to the decoding loop."""

    @abstractmethod
    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k draft tokens to follow `context` (an empty list means: decode one token normally)."""

    def place(self, device: torch.device) -> None:
        """Put any model the proposer runs on the target's device (called once by the session)."""
        return None  # n-gram and rule-based proposers run no model


class SpeculationLayer(Layer[SP]):
    kind: ClassVar[LayerKind] = "speculation"
    lossless: ClassVar[bool] = True

    @property
    def num_speculative_tokens(self) -> int:
        return self.params.num_speculative_tokens

    @abstractmethod
    def make_proposer(self, dtype: torch.dtype) -> Proposer:
        """A proposer for one generation (it may keep state, e.g. the draft model's KV cache)."""

    def accept(self, draft: Sequence[int], target_logprobs: torch.Tensor) -> int:
        """How many leading draft tokens the target accepts.

        `target_logprobs[i]` is the target's next-token distribution after the context plus draft[:i].
        Greedy verification accepts exactly the tokens the target would have chosen itself, which is
        what makes speculation lossless; a subclass that accepts more is lossy by construction.
        """
        choices = target_logprobs.argmax(dim=-1).tolist()
        accepted = 0
        for token, choice in zip(draft, choices, strict=False):
            if token != choice:
                break
            accepted += 1
        return accepted


class PrefixCacheLayer(Layer[PP]):
    """Reuse of a prompt prefix's KV cache, in whole blocks of `params.block_size` tokens."""

    kind: ClassVar[LayerKind] = "prefix_cache"
    lossless: ClassVar[bool] = True

    def make_store(self, snapshot: Any) -> Any:
        """The store of cached prefixes the in-process decoder looks prompts up in (a
        qualgate.layers.prefix_cache.PrefixStore); a plug-in may return its own (its lookup is its key)."""
        from qualgate.layers.prefix_cache import PrefixStore

        return PrefixStore(self.params.block_size, self.params.max_entries, snapshot)


KIND_BASES: dict[LayerKind, type[Layer[Any]]] = {
    "weight_quant": WeightQuantLayer,
    "kv_quant": KVQuantLayer,
    "speculation": SpeculationLayer,
    "prefix_cache": PrefixCacheLayer,
}
LAYERS: dict[LayerKind, Registry[type[Layer[Any]]]] = {kind: Registry(f"{kind} method") for kind in LAYER_KINDS}
L = TypeVar("L", bound="type[Layer[Any]]")


def register_layer(cls: L) -> L:
    LAYERS[cls.kind].register(cls.method)(cls)
    return cls


def is_builtin(cls: type[Layer[Any]]) -> bool:
    """Whether `cls` is qualgate's own layer registered for its kind and method. A plug-in (loaded by
    "module:Class", or registering a method of its own from outside qualgate) is not, even when it
    subclasses a built-in and keeps its method."""
    registry = LAYERS[cls.kind]
    own_module = cls.__module__.partition(".")[0] == "qualgate"
    return own_module and cls.method in registry and registry.get(cls.method) is cls


# Names are joined with '+' into stack names and shown in Markdown tables, MLflow run names and YAML
# endpoint keys: a parameter value keeps only characters that are safe in all of them.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_TEXT = 32


def param_suffix(params: LayerParams, skip: Collection[str] = ()) -> list[str]:
    """`<param><value>` for each parameter that differs from its default (required ones always), in
    the order the params model declares them, leaving out `skip`."""
    parts = []
    for key, field in type(params).model_fields.items():
        if key in skip:
            continue
        value = getattr(params, key)
        if not field.is_required() and value == field.get_default(call_default_factory=True):
            continue
        parts.append(_param_token(key, value))
    return parts


def _param_token(key: str, value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return key if value else f"no_{key}"
    if isinstance(value, int):
        return f"{key}{value}"
    if isinstance(value, float):
        return f"{key}{_compact_float(value)}"
    return f"{key}_{_compact_text('none' if value is None else str(value))}"


def _compact_float(value: float) -> str:
    text = f"{value:g}"
    if float(text) != value:  # :g keeps 6 digits; two values must not share a name
        text = repr(value)
    return text.replace("e+", "e")  # '+' joins layer names into a stack name


def _compact_text(text: str) -> str:
    """A string parameter (a path, a model id) as name-safe characters; when it had to be changed or
    cut, its tail plus a short hash, so two different values still read differently."""
    safe = _UNSAFE.sub("_", text).strip("_")
    if safe == text and len(text) <= _MAX_TEXT:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:6]
    tail = safe[-(_MAX_TEXT - 8) :].strip("_")
    return f"{tail}_{digest}" if tail else digest


def build_layer(spec: Mapping[str, Any], where: str = "layer") -> Layer[Any]:
    """Build a layer from its configuration: {kind, method, name?, **params}."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    method = spec.pop("method", None)
    name = spec.pop("name", None)
    if kind is None or method is None:
        raise ConfigError(f"{where}: a layer needs 'kind' and 'method' (e.g. kind: weight_quant, method: rtn)")
    if kind not in LAYERS:
        raise ConfigError(f"{where}: unknown layer kind '{kind}'; {did_you_mean(str(kind), list(LAYER_KINDS))}")
    try:
        cls = LAYERS[kind].get(str(method))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(cls, type) or not issubclass(cls, KIND_BASES[kind]):
        raise ConfigError(
            f"{where}: '{method}' is not a {kind} layer; a plug-in must subclass "
            f"qualgate.layers.{KIND_BASES[kind].__name__}"
        )
    params = validate(cls.Params, spec, f"{where} ({kind}/{method})")
    try:
        return cls(params, name=name)
    except ConfigError as exc:  # a layer that checks its parameters on construction (a path that exists)
        raise ConfigError(f"{where}: {exc}") from None
