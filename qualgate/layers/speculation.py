"""Speculative decoding layers: a draft model, or prompt lookup (n-gram) as in vLLM's `ngram` method.

Both only propose tokens; the decoding loop verifies them against the target with greedy acceptance
(SpeculationLayer.accept), so the output must equal plain greedy decoding of the same stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

from pydantic import Field, model_validator

from qualgate.devices import DEVICE_PATTERN, resolve
from qualgate.layers.base import LayerParams, Proposer, SpeculationLayer, SpeculationParams, register_layer
from qualgate.models import ModelSpec, load_hf_model

if TYPE_CHECKING:
    import torch


@dataclass
class SpeculationStats:
    """Counters of speculative decoding; rates are derived, so counters add across generations."""

    verify_steps: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0

    def counters(self) -> dict[str, float]:
        return {
            "verify_steps": self.verify_steps,
            "proposed_tokens": self.proposed_tokens,
            "accepted_tokens": self.accepted_tokens,
        }

    def minus(self, earlier: SpeculationStats) -> SpeculationStats:
        return SpeculationStats(
            self.verify_steps - earlier.verify_steps,
            self.proposed_tokens - earlier.proposed_tokens,
            self.accepted_tokens - earlier.accepted_tokens,
        )

    def as_dict(self) -> dict[str, float]:
        rate = self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0
        per_step = self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0
        return {
            "verify_steps": self.verify_steps,
            "proposed_tokens": self.proposed_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": rate,
            "mean_accepted_tokens": per_step,
            # vLLM's "mean acceptance length" counts the bonus token every verification yields.
            "mean_acceptance_length": 1.0 + per_step if self.verify_steps else 0.0,
        }


class DraftModelParams(SpeculationParams):
    draft: str = "bundled:draft"
    """The draft model (same tokenizer as the target): a directory, hub id or bundled:<name>."""
    draft_device: str | None = Field(default=None, pattern=DEVICE_PATTERN)
    """Where the draft runs (cpu, cuda:N, mps); default: the target model's device."""


class DraftModelProposer(Proposer):
    """Greedy proposals from a small model that keeps its own KV cache across verification steps."""

    def __init__(self, model: Any, device: torch.device | None = None) -> None:
        self.model = model
        self.device = device  # None: the target's (place)
        self.cache: Any = None
        self.cached: list[int] = []  # the token ids whose K/V the draft cache holds

    def place(self, device: torch.device) -> None:
        self.device = self.device or device
        self.model = self.model.to(self.device)

    def _ids(self, ids: list[list[int]]) -> Any:
        import torch

        return torch.tensor(ids, device=self.device)

    def _sync(self, context: Sequence[int]) -> Any:
        """Bring the draft cache to `context` minus its last token; return that token's logits."""
        import torch
        from transformers import DynamicCache

        shared = 0
        limit = min(len(self.cached), len(context) - 1)
        while shared < limit and self.cached[shared] == context[shared]:
            shared += 1
        if self.cache is None or shared == 0:
            self.cache, self.cached = DynamicCache(), []
        elif shared < len(self.cached):
            self.cache.crop(shared - len(self.cached))
            self.cached = self.cached[:shared]
        fresh = list(context[len(self.cached) :])
        with torch.no_grad():
            out = self.model(input_ids=self._ids([fresh]), past_key_values=self.cache, use_cache=True)
        self.cached.extend(fresh)
        return out.logits[0, -1]

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        import torch

        logits = self._sync(context)
        draft: list[int] = []
        with torch.no_grad():
            for _ in range(k):
                token = int(logits.argmax())
                draft.append(token)
                if len(draft) == k:
                    break
                out = self.model(input_ids=self._ids([[token]]), past_key_values=self.cache, use_cache=True)
                self.cached.append(token)
                logits = out.logits[0, -1]
        return draft


@register_layer
class DraftModel(SpeculationLayer[DraftModelParams]):
    method: ClassVar[str] = "draft_model"
    Params: ClassVar[type[LayerParams]] = DraftModelParams
    stem_params: ClassVar[tuple[str, ...]] = ("num_speculative_tokens",)

    def name_stem(self) -> str:
        return f"spec-draft{self.params.num_speculative_tokens}"

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "draft_fingerprint": ModelSpec(path=self.params.draft).fingerprint()}

    def make_proposer(self, dtype: torch.dtype) -> Proposer:
        # Loaded on the host; the session places it (on draft_device when given, else the target's device).
        where = self.params.draft_device
        spec = ModelSpec(path=self.params.draft, device="cpu")
        return DraftModelProposer(load_hf_model(spec).to(dtype), resolve(where, "draft_device") if where else None)


class NgramParams(SpeculationParams):
    prompt_lookup_max: int = Field(3, ge=1)
    prompt_lookup_min: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> NgramParams:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must not exceed prompt_lookup_max")
        return self


class NgramProposer(Proposer):
    """Find the longest recent n-gram match of the context's tail and propose what followed it."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        tokens = list(context)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            tail = tokens[-n:]
            # Latest earlier occurrence first: recent context predicts best (as vLLM's ngram proposer).
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + k]
                    if follow:
                        return follow
        return []


@register_layer
class Ngram(SpeculationLayer[NgramParams]):
    method: ClassVar[str] = "ngram"
    Params = NgramParams
    stem_params: ClassVar[tuple[str, ...]] = ("num_speculative_tokens",)

    def name_stem(self) -> str:
        return f"spec-ngram{self.params.num_speculative_tokens}"

    def make_proposer(self, dtype: torch.dtype) -> Proposer:
        return NgramProposer(self.params.prompt_lookup_min, self.params.prompt_lookup_max)


class TypicalAcceptanceParams(DraftModelParams):
    posterior_threshold: float = Field(0.09, gt=0, le=1, description="Medusa's epsilon")
    posterior_alpha: float = Field(0.3, gt=0, le=1, description="Medusa's delta (scales exp(-entropy))")


@register_layer
class TypicalAcceptanceDraft(DraftModel):
    """Draft-model speculation with Medusa-style typical acceptance: LOSSY by design.

    A draft token is accepted when the target gives it probability above
    min(posterior_threshold, posterior_alpha * exp(-entropy)), not only when it is the target's own
    choice. Faster, and no longer greedy-equivalent: the equivalence instrument must report real
    divergences for it, which is why it ships (a known-bad layer proves the checker works).
    """

    method: ClassVar[str] = "draft_model_typical"
    lossless: ClassVar[bool] = False
    Params = TypicalAcceptanceParams

    def name_stem(self) -> str:
        return f"spec-typical{self.params.num_speculative_tokens}"

    def accept(self, draft: Sequence[int], target_logprobs: torch.Tensor) -> int:
        import torch

        params = cast(TypicalAcceptanceParams, self.params)
        logprobs = target_logprobs.float()
        probs = logprobs.exp()
        entropy = -(probs * logprobs).sum(dim=-1)
        limit = torch.clamp(params.posterior_alpha * torch.exp(-entropy), max=params.posterior_threshold)
        accepted = 0
        for i, token in enumerate(draft):
            if float(probs[i, token]) <= float(limit[i]):
                break
            accepted += 1
        return accepted
