"""Engine adapters: a Backend opens a Session for a stack; a Session scores and generates.

A session's results are plain numpy arrays so instruments never depend on torch or on an engine.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from qualgate.errors import ConfigError
from qualgate.layers import Layer
from qualgate.registry import Registry, did_you_mean
from qualgate.stack import Stack


@dataclass(frozen=True)
class ScoreResult:
    """Teacher-forced scores of token_ids[1:], each predicted from the tokens before it.

    Row i describes the prediction of token_ids[i + 1]: its logprob, the top-k ids and logprobs
    (descending), and the probability mass outside the top-k (the tail bucket of the KL bound).
    """

    token_ids: np.ndarray  # [n] int64
    logprobs: np.ndarray  # [n-1] float64
    top_ids: np.ndarray  # [n-1, k] int64
    top_logprobs: np.ndarray  # [n-1, k] float64
    tail_mass: np.ndarray  # [n-1] float64
    block_size: int | None  # how the tokens went through the cache; None = one forward pass
    gathered: np.ndarray | None = None  # [n-1, m] logprobs of the ids asked for with `gather`
    schedule: tuple[int, ...] | None = None  # the lengths of the blocks fed, when not uniform
    # `tail_samples` ids per row drawn from this side's distribution outside its top-k, with their
    # logprobs: what lets fidelity estimate the KL of the tail instead of bounding it.
    tail_ids: np.ndarray | None = None  # [n-1, s]
    tail_logprobs: np.ndarray | None = None  # [n-1, s]

    @property
    def top_k(self) -> int:
        return int(self.top_ids.shape[1])


@dataclass(frozen=True)
class ScoreRequest:
    """One sequence to score in a single forward pass (Session.score_batch), with score's options."""

    token_ids: Sequence[int]
    top_k: int = 64
    gather: np.ndarray | None = None
    tail_samples: int = 0
    # Fed through the KV cache as score's block_size / schedule say (None for both: one forward pass).
    block_size: int | None = None
    schedule: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str
    top_ids: np.ndarray  # [m, k]: the distribution each generated token was chosen from
    top_logprobs: np.ndarray  # [m, k]
    finish_reason: str  # "stop" (EOS) or "length"
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    score: bool = True
    generate: bool = True
    max_top_k: int | None = None  # None: the whole vocabulary
    block_scoring: bool = True  # can feed text through the KV cache in blocks


class Session(ABC):
    """A stack ready to use. Close it (or use it as a context manager) to free the engine."""

    stack: Stack
    capabilities: ClassVar[Capabilities] = Capabilities()
    max_positions: int = 0  # the model's context length in tokens; 0 = unknown

    @property
    @abstractmethod
    def bos_token_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_token_id(self) -> int | None: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str: ...

    @property
    def chat_template(self) -> str | None:
        """The model's chat template; None when its tokenizer has none (or the engine hides it)."""
        return None

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """A conversation rendered by the model's chat template (text, with the template's own BOS)."""
        raise ConfigError(f"stack '{self.stack.name}': this engine does not render chat templates")

    def encode_chat(self, text: str) -> list[int]:
        """`text` as one user turn through the chat template, with the assistant's generation prompt."""
        raise ConfigError(f"stack '{self.stack.name}': this engine does not render chat templates")

    @abstractmethod
    def score(
        self,
        token_ids: Sequence[int],
        top_k: int = 64,
        block_size: int | None = None,
        gather: np.ndarray | None = None,
        schedule: Sequence[int] | None = None,
        tail_samples: int = 0,
    ) -> ScoreResult:
        """Teacher-forced logprobs. block_size=None is one forward pass; an int feeds the tokens
        through the KV cache that many at a time (1 reproduces decoding exactly); `schedule` gives the
        length of every block instead (a prefill, then single-token decodes or verify blocks: the
        shapes an engine uses while serving). `gather` [n-1, m] asks for the logprobs of given ids at
        every position (the reference's top-k, for KL). `tail_samples` > 0 draws that many ids per
        position from the distribution outside the top-k (engines that see the whole vocabulary;
        others return none)."""

    def score_many(self, sequences: Sequence[Sequence[int]], block_size: int | None = None) -> list[ScoreResult]:
        """Top-1 scores of many sequences (benchmark requests). Engines may batch; the default is one by one."""
        return [self.score(ids, top_k=1, block_size=block_size) for ids in sequences]

    def scoring_group(self, width: int, cached: bool = False) -> int:
        """How many `width`-token sequences score_batch puts in one forward pass (1: one by one), fed
        whole or (`cached`) through the KV cache in blocks. Callers hand it that many at a time and
        checkpoint between, so a crash loses one batch at most."""
        return 1

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Each request scored as `score` would (one forward pass, or through the KV cache by its block
        size or schedule), in request order; the results equal `score`'s within float noise. Engines
        may batch; the default is one by one."""
        return [self.score(r.token_ids, r.top_k, r.block_size, r.gather, r.schedule, r.tail_samples) for r in requests]

    @abstractmethod
    def generate(
        self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64, top_k: int = 8
    ) -> list[Generation]:
        """Greedy generation; a str prompt is encoded with BOS, a token list is used as given."""

    def layer_stats(self) -> dict[str, dict[str, float]]:
        """Counters of the stack's layers since the session opened (acceptance, cache hits)."""
        return {}

    def provenance(self) -> dict[str, Any] | None:
        """What the session found out about its engine that belongs in the report (an HTTP endpoint's
        capability probe); None when there is nothing to say."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def block_spans(n_inputs: int, block_size: int | None, schedule: Sequence[int] | None) -> list[tuple[int, int]] | None:
    """The (start, end) of every block the n_inputs input tokens are fed in; None: one forward pass."""
    if schedule is not None:
        lengths = [int(length) for length in schedule]
        if any(length < 1 for length in lengths) or sum(lengths) != n_inputs:
            raise ConfigError(f"a scoring schedule must cover the {n_inputs} inputs in blocks >= 1 (got {lengths})")
    elif block_size is not None:
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1 (got {block_size})")
        lengths = [min(block_size, n_inputs - start) for start in range(0, n_inputs, block_size)]
    else:
        return None
    spans, start = [], 0
    for length in lengths:
        spans.append((start, start + length))
        start += length
    return spans


class Backend(ABC):
    name: ClassVar[str]
    # Whether its sessions can choose how tokens enter the KV cache (Capabilities.block_scoring): known
    # before a session opens, so a run does not start a server only to find it cannot.
    block_scoring: ClassVar[bool] = True

    @abstractmethod
    def supports(self, layer: Layer[Any]) -> bool:
        """Whether this engine can apply the layer."""

    @abstractmethod
    def open(self, stack: Stack) -> Session: ...

    @classmethod
    def simulation(cls, layer: Layer[Any], stack: Stack) -> Layer[Any] | None:
        """What this engine's version of `layer` is, run in process (kernel_loss): the layer's own
        simulation unless the engine is known to apply it differently."""
        return layer.simulation()

    def check(self, stack: Stack) -> None:
        unsupported = [layer for layer in stack.layers if not self.supports(layer)]
        if unsupported:
            names = ", ".join(f"'{layer.name}' ({layer.kind}/{layer.method})" for layer in unsupported)
            raise ConfigError(f"backend '{self.name}' cannot apply layer {names}; use a backend that supports it")


BACKENDS: Registry[type[Backend]] = Registry("backend")


def register_backend(cls: type[Backend]) -> type[Backend]:
    BACKENDS.register(cls.name)(cls)
    return cls


def get_backend(name: str, **options: Any) -> Backend:
    cls = BACKENDS.get(name)
    if not isinstance(cls, type) or not issubclass(cls, Backend):
        raise ConfigError(f"backend '{name}' is not a qualgate Backend subclass")
    # A backend without an options model (a plug-in's) still gets its options checked by name: a typo
    # is exit 2 with a did-you-mean, not a TypeError from its constructor.
    parameters = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        for key in options:
            if key not in parameters:
                raise ConfigError(
                    f"backend '{name}' options: unknown field '{key}'; {did_you_mean(key, list(parameters))}"
                )
    return cls(**options)


def open_session(stack: Stack, backend: str = "hf", **options: Any) -> Session:
    engine = get_backend(backend, **options)
    engine.check(stack)
    return engine.open(stack)
