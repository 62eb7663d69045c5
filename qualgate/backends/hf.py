"""The reference engine: HF transformers in-process, every layer applied by qualgate itself."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from qualgate.backends.base import (
    Backend,
    Capabilities,
    Generation,
    ScoreRequest,
    ScoreResult,
    block_spans,
    register_backend,
)
from qualgate.backends.hf_batch import BatchSetting, BatchSizer
from qualgate.backends.hf_cache import croppable, snapshot_cache
from qualgate.backends.hf_decode import GreedyDecoder
from qualgate.backends.hf_scoring import score_grouped, score_result
from qualgate.backends.rows import with_tail_sample
from qualgate.backends.tokenized import TokenizedSession
from qualgate.devices import resolve
from qualgate.errors import ConfigError
from qualgate.layers import KVQuantLayer, Layer, PrefixCacheLayer, SpeculationLayer, WeightQuantLayer
from qualgate.layers.prefix_cache import PrefixStore
from qualgate.models import input_device, load_hf_model, load_hf_tokenizer
from qualgate.stack import Stack
from qualgate.validation import validate


class HFOptions(BaseModel):
    """backend.options of the in-process engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's own)")
    batch_size: BatchSetting = Field(
        "auto",
        description="sequences per forward pass when scoring in one pass (fidelity windows, benchmark requests): "
        "N, or auto (sized from the device's memory; halved on out-of-memory either way)",
    )

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, value: BatchSetting) -> BatchSetting:
        if value != "auto" and value < 1:
            raise ValueError("must be auto or a positive integer")
        return value


@register_backend
class HFBackend(Backend):
    name: ClassVar[str] = "hf"

    def __init__(self, **options: Any) -> None:
        parsed = validate(HFOptions, options, "backend 'hf' options")
        self.threads = parsed.threads
        self.batch_size = parsed.batch_size

    def supports(self, layer: Layer[Any]) -> bool:
        # Every layer kind has an in-process hook; a plug-in layer implements the hook of its kind.
        # Engine-native layers (a GGUF quant type, a vLLM --quantization) exist only inside their engine.
        return not layer.engines and isinstance(
            layer, (WeightQuantLayer, KVQuantLayer, SpeculationLayer, PrefixCacheLayer)
        )

    def check(self, stack: Stack) -> None:
        super().check(stack)
        stack.model.torch_device()  # a device this machine does not have: exit 2 before any model loads
        spec = stack.layer("speculation")
        draft_device = getattr(spec.params, "draft_device", None) if spec is not None else None
        if spec is not None and draft_device:
            resolve(draft_device, f"layer '{spec.method}': draft_device")
        weight_layer = stack.layer("weight_quant")
        model_dir = stack.model.local_path()
        if isinstance(weight_layer, WeightQuantLayer) and model_dir is not None:
            # A checkpoint of another model is exit 2 before the first stack loads, not after it.
            config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
            weight_layer.check_model(model_dir, config)

    def open(self, stack: Stack) -> HFSession:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        return HFSession(stack, self.batch_size)


class HFSession(TokenizedSession):
    capabilities: ClassVar[Capabilities] = Capabilities(score=True, generate=True, max_top_k=None)

    def __init__(self, stack: Stack, batch_size: BatchSetting = "auto") -> None:
        self.stack = stack
        self.tokenizer = load_hf_tokenizer(stack.model)
        model = load_hf_model(stack.model)
        weight_layer = stack.layer("weight_quant")
        if weight_layer is not None:
            assert isinstance(weight_layer, WeightQuantLayer)
            model = weight_layer.apply(model)
        self.model = model
        self.device = input_device(model)
        self.config = model.config
        self.n_vocab = int(model.config.vocab_size)
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 0)
        self.batches = BatchSizer(batch_size, self.device, self.n_vocab, f"model '{stack.model.path}'")
        kv_layer = stack.layer("kv_quant")
        self.kv_layer = kv_layer if isinstance(kv_layer, KVQuantLayer) else None
        if self.kv_layer is not None:
            self.kv_layer.make_cache(self.config)  # a setting the model cannot take fails here, not mid-run
        spec = stack.layer("speculation")
        self.speculation = spec if isinstance(spec, SpeculationLayer) else None
        proposer = self.speculation.make_proposer(stack.model.torch_dtype()) if self.speculation else None
        if proposer is not None:
            proposer.place(self.device)
        prefix = stack.layer("prefix_cache")
        self.prefix_store: PrefixStore | None = None
        if isinstance(prefix, PrefixCacheLayer):
            self.prefix_store = prefix.make_store(snapshot_cache)
        self.decoder = GreedyDecoder(
            self._forward, self.new_cache, croppable, snapshot_cache, self.speculation, proposer, self.prefix_store
        )

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return self.kv_layer.make_cache(self.config) if self.kv_layer else DynamicCache()

    def _forward(self, token_ids: list[int], cache: Any) -> Any:
        """Next-token logprobs (float32) after each of `token_ids`, appended to `cache`.

        float32 is as precise as the logits themselves; callers widen the few values they keep to
        float64 before accumulating (a full-vocabulary float64 copy cost more than the forward pass).
        """
        import torch

        with torch.no_grad():
            inputs = torch.tensor([token_ids], device=self.device)
            out = self.model(input_ids=inputs, past_key_values=cache, use_cache=cache is not None)
        return torch.log_softmax(out.logits[0].float(), dim=-1)

    def _check_request(self, ids: Sequence[int], gather: np.ndarray | None) -> None:
        """A sequence score() or score_batch() can take: two tokens at least, within the context, and
        a gather row per scored position."""
        if len(ids) < 2:
            raise ConfigError("score needs at least two tokens (one context token and one to predict)")
        self._check_length(len(ids) - 1, "the scored sequence")
        if gather is not None and gather.shape[0] != len(ids) - 1:
            raise ConfigError(f"gather has {gather.shape[0]} rows for {len(ids) - 1} scored positions")

    def _check_length(self, n: int, what: str) -> None:
        if self.max_positions and n > self.max_positions:
            raise ConfigError(
                f"{what} is {n} tokens, beyond the model's context of {self.max_positions}; "
                "use shorter chunks (n_ctx) or prompts"
            )

    def score(
        self,
        token_ids: Sequence[int],
        top_k: int = 64,
        block_size: int | None = None,
        gather: np.ndarray | None = None,
        schedule: Sequence[int] | None = None,
        tail_samples: int = 0,
    ) -> ScoreResult:
        import torch

        ids = [int(t) for t in token_ids]
        self._check_request(ids, gather)
        inputs = ids[:-1]  # the last token is only a target: nothing predicts past the text
        spans = block_spans(len(inputs), block_size, schedule)
        if spans is None and self.kv_layer is not None:
            raise ConfigError(
                f"stack '{self.stack.name}' quantizes the KV cache, which a single forward pass never reads; "
                "score it with a block_size or a schedule (a prefill, then one token at a time, as it serves)"
            )
        if spans is None:
            logprobs = self._forward(inputs, None)
        else:
            cache = self.new_cache()
            logprobs = torch.cat([self._forward(inputs[start:end], cache) for start, end in spans])
        result = score_result(ids, logprobs, top_k, block_size, gather)
        if tail_samples:
            result = with_tail_sample(result, logprobs.cpu().numpy(), tail_samples)
        return replace(result, schedule=tuple(schedule)) if schedule is not None else result

    def score_many(self, sequences: Sequence[Sequence[int]], block_size: int | None = None) -> list[ScoreResult]:
        return self.score_batch([ScoreRequest(ids, top_k=1, block_size=block_size) for ids in sequences])

    @property
    def _cache_batches(self) -> bool:
        """Whether sequences fed through the cache may share a batch (hf_scoring.py)."""
        return self.kv_layer is None or self.kv_layer.batch_invariant

    def scoring_group(self, width: int, cached: bool = False) -> int:
        if cached:
            return self.batches.group(width, cached=True) if self._cache_batches else 1
        return 1 if self.kv_layer is not None else self.batches.group(width)

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Right-padded batches of similar length: one forward pass each, or fed through one batched
        cache (hf_scoring.py) when the requests say how. A quantized cache whose round trip is not
        batch-invariant goes one by one. Padding never reaches a real position: attention is causal and
        the pads come last."""
        fed = [r.block_size is not None or r.schedule is not None for r in requests]
        if self.kv_layer is not None and not (self._cache_batches and all(fed)):
            return super().score_batch(requests)  # one by one; score() says what a KV stack cannot do
        for r in requests:
            self._check_request(r.token_ids, r.gather)
        return score_grouped(self, requests)

    def generate(
        self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64, top_k: int = 8
    ) -> list[Generation]:
        results = []
        for prompt in prompts:
            ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            if not ids:
                raise ConfigError("generate got an empty prompt; give at least one token (BOS)")
            self._check_length(len(ids) + max_new_tokens, "prompt plus max_new_tokens")
            decoded = self.decoder.generate(ids, max_new_tokens, top_k, self.eos_token_id)
            results.append(
                Generation(
                    prompt_ids=ids,
                    token_ids=decoded.token_ids,
                    text=self.decode(decoded.token_ids),
                    top_ids=decoded.top_ids,
                    top_logprobs=decoded.top_logprobs,
                    finish_reason=decoded.finish_reason,
                    stats=decoded.stats,
                )
            )
        return results

    def layer_stats(self) -> dict[str, dict[str, float]]:
        stats: dict[str, dict[str, float]] = {}
        if self.speculation is not None:
            stats["speculation"] = self.decoder.spec_stats.as_dict()
        if self.prefix_store is not None:
            stats["prefix_cache"] = self.prefix_store.stats.as_dict()
        return stats
