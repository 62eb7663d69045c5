"""The `llamacpp` backend: llama.cpp in process through llama-cpp-python, managed by qualgate.

The stack's model is converted to GGUF once (qualgate.engines.gguf_convert), quantized with
llama.cpp's own quantizer for a `gguf` layer, and loaded with the stack's KV cache types, speculation
(prompt lookup, or a draft model itself converted to GGUF) and prompt reuse. In process, the engine
returns the full logits at every position, so fidelity is exact (no top-k merging) and prompts are
token ids (no re-tokenization).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qualgate.backends.base import Backend, Capabilities, Generation, ScoreResult, block_spans, register_backend
from qualgate.backends.http.backend import _tokenizer, model_positions, model_vocab_size
from qualgate.backends.http.probe import CANARY, ProbeFailed
from qualgate.backends.rows import log_softmax, score_from_logprobs, with_tail_sample
from qualgate.backends.tokenized import TokenizedSession
from qualgate.backends.translate import Translators
from qualgate.engines.gguf_quant import baseline_gguf, quantized_gguf
from qualgate.errors import ConfigError, MissingDependencyError
from qualgate.layers import Layer
from qualgate.layers.engine import GGMLKV, GGUFQuant
from qualgate.layers.prefix_cache import BlockPrefixCache
from qualgate.layers.speculation import DraftModel, Ngram
from qualgate.models import ModelSpec
from qualgate.stack import Stack
from qualgate.validation import validate


class LlamaCppOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n_ctx: int | None = Field(None, ge=16, description="context size; default: the model's")
    n_batch: int = Field(512, ge=1, description="tokens per llama_decode call")
    n_threads: int | None = Field(None, ge=1, description="default: llama.cpp's choice")
    n_gpu_layers: int = Field(
        0, ge=-1, description="layers offloaded to the GPU (-1: all) in a CUDA/Metal build of llama-cpp-python"
    )
    cache_dir: str = Field("runs/gguf", description="converted and quantized GGUF files, reused across runs")


# What each layer class sets when llama.cpp loads the stack (merged into one plan per session).
LLAMACPP: Translators[dict[str, Any]] = Translators("llamacpp")


@LLAMACPP.register(GGUFQuant)
def _gguf(layer: GGUFQuant, stack: Stack, options: LlamaCppOptions) -> dict[str, Any]:
    return {"quant_type": layer.params.type, "quantize_output": layer.params.quantize_output}


@LLAMACPP.register(GGMLKV)
def _ggml_kv(layer: GGMLKV, stack: Stack, options: LlamaCppOptions) -> dict[str, Any]:
    # llama.cpp quantizes the V cache only with flash attention.
    flash = layer.params.type_v not in ("f16", "f32", "bf16")
    return {"type_k": layer.params.type_k, "type_v": layer.params.type_v, "flash_attn": flash}


@LLAMACPP.register(Ngram)
def _lookup(layer: Ngram, stack: Stack, options: LlamaCppOptions) -> dict[str, Any]:
    p = layer.params
    return {"draft": "lookup", "max_ngram_size": p.prompt_lookup_max, "draft_tokens": p.num_speculative_tokens}


@LLAMACPP.register(DraftModel)  # greedy verification only: a lossy acceptance rule is not llama.cpp's
def _draft(layer: DraftModel, stack: Stack, options: LlamaCppOptions) -> dict[str, Any]:
    return {"draft": "model", "draft_layer": layer, "draft_tokens": layer.params.num_speculative_tokens}


@LLAMACPP.register(BlockPrefixCache)
def _reuse(layer: BlockPrefixCache, stack: Stack, options: LlamaCppOptions) -> dict[str, Any]:
    return {"reuse_prompts": True}


@register_backend
class LlamaCppBackend(Backend):
    name: ClassVar[str] = "llamacpp"

    def __init__(self, **options: Any) -> None:
        self.options = validate(LlamaCppOptions, options, "backend 'llamacpp' options")

    def supports(self, layer: Layer[Any]) -> bool:
        return LLAMACPP.supports(layer)

    def open(self, stack: Stack) -> LlamaCppSession:
        return LlamaCppSession(stack, self.options)


class GGUFDraft:
    """A draft model in llama.cpp (llama-cpp-python's LlamaDraftModel protocol): greedy proposals from
    a second Llama, which keeps the KV of the longest prefix it shares with the last call."""

    def __init__(self, llm: Any, num_pred_tokens: int) -> None:
        self.llm = llm
        self.num_pred_tokens = num_pred_tokens

    def __call__(self, input_ids: Any, /, **kwargs: Any) -> Any:
        out: list[int] = []
        for token in self.llm.generate([int(t) for t in input_ids], top_k=1, temp=0.0, reset=True):
            out.append(int(token))
            if len(out) >= self.num_pred_tokens:
                break
        return np.asarray(out, dtype=np.intc)


class DraftCounter:
    """Wraps a llama-cpp-python drafter, remembering its last draft so acceptance is counted."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.last: list[int] = []
        self.fresh = False  # a draft (maybe empty) was made since the last token was counted

    def __call__(self, input_ids: Any, /, **kwargs: Any) -> Any:
        draft = self.inner(input_ids, **kwargs)
        self.last, self.fresh = [int(t) for t in draft], True
        return draft


class LlamaCppSession(TokenizedSession):
    capabilities: ClassVar[Capabilities] = Capabilities(score=True, generate=True, max_top_k=None)

    def __init__(self, stack: Stack, options: LlamaCppOptions) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise MissingDependencyError("llama-cpp-python", "backend 'llamacpp'", "llamacpp") from None
        self.stack = stack
        self.tokenizer = _tokenizer(stack.model.model_dump_json())
        self.n_vocab = model_vocab_size(stack.model, self.tokenizer)
        cache_dir = Path(options.cache_dir)
        plan: dict[str, Any] = {}
        for settings in LLAMACPP.translate(stack, options):
            plan.update(settings)
        if "quant_type" in plan:
            path = quantized_gguf(stack.model, plan["quant_type"], cache_dir, plan["quantize_output"])
        else:
            path = baseline_gguf(stack.model, cache_dir)
        self.max_positions = options.n_ctx or model_positions(stack.model) or 2048
        kwargs: dict[str, Any] = {}
        if "type_k" in plan:
            kwargs["type_k"] = _ggml_type(llama_cpp, plan["type_k"])
            kwargs["type_v"] = _ggml_type(llama_cpp, plan["type_v"])
            kwargs["flash_attn"] = plan["flash_attn"]
        self.drafter = self._drafter(plan, options, llama_cpp)
        if self.drafter is not None:
            kwargs["draft_model"] = self.drafter
        self.reuse_prompts = bool(plan.get("reuse_prompts"))
        self.gguf = path
        self.llm = self._load(llama_cpp, path, options, logits_all=True, **kwargs)
        self._check_tokenizer()

    def _load(self, llama_cpp: Any, path: Path, options: LlamaCppOptions, **kwargs: Any) -> Any:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=self.max_positions,
            n_batch=options.n_batch,
            n_ubatch=options.n_batch,
            n_threads=options.n_threads,
            n_gpu_layers=options.n_gpu_layers,
            seed=0,
            verbose=False,
            **kwargs,
        )

    def _drafter(self, plan: dict[str, Any], options: LlamaCppOptions, llama_cpp: Any) -> DraftCounter | None:
        if plan.get("draft") == "lookup":
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            lookup = LlamaPromptLookupDecoding(
                max_ngram_size=plan["max_ngram_size"], num_pred_tokens=plan["draft_tokens"]
            )
            return DraftCounter(lookup)
        if plan.get("draft") == "model":
            spec: DraftModel = plan["draft_layer"]
            draft_spec = ModelSpec(path=spec.params.draft, dtype=self.stack.model.dtype)
            draft = self._load(llama_cpp, baseline_gguf(draft_spec, Path(options.cache_dir)), options)
            if draft.n_vocab() != self.n_vocab:
                raise ConfigError(
                    f"layer '{spec.name}': draft '{spec.params.draft}' has {draft.n_vocab()} tokens, the model "
                    f"{self.n_vocab}; a draft model must share the target's tokenizer"
                )
            return DraftCounter(GGUFDraft(draft, spec.params.num_speculative_tokens))
        return None

    def _check_tokenizer(self) -> None:
        ours = self.encode(CANARY)
        theirs = self.llm.tokenize(CANARY.encode("utf-8"), add_bos=self.bos_token_id is not None)
        if ours != theirs:
            first = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
            )
            raise ProbeFailed(
                f"llama.cpp tokenizes '{self.gguf.name}' differently from the model's tokenizer (first at token "
                f"{first}); the GGUF's vocabulary does not match '{self.stack.model.path}'"
            )

    def _check_length(self, n: int, what: str) -> None:
        if n > self.max_positions:
            raise ConfigError(
                f"{what} is {n} tokens, more than the llama.cpp context of {self.max_positions}; "
                "shorten it or raise backend.options.n_ctx"
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
        ids = [int(t) for t in token_ids]
        self._check_length(len(ids), "a scored sequence")
        self.llm.reset()
        spans = block_spans(len(ids) - 1, block_size, schedule) or [(0, len(ids) - 1)]
        for start, end in spans:
            self.llm.eval(ids[start:end])
        logprobs = log_softmax(np.asarray(self.llm.scores[: len(ids) - 1], dtype=np.float32))
        result = with_tail_sample(score_from_logprobs(ids, logprobs, top_k, gather), logprobs, tail_samples)
        shape = tuple(schedule) if schedule is not None else None
        return ScoreResult(**{**result.__dict__, "block_size": block_size, "schedule": shape})

    def generate(
        self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64, top_k: int = 8
    ) -> list[Generation]:
        return [self._generate_one(p, max_new_tokens, top_k) for p in prompts]

    def _generate_one(self, prompt: str | Sequence[int], max_new_tokens: int, top_k: int) -> Generation:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ConfigError("generate got an empty prompt; give at least one token (BOS)")
        self._check_length(len(ids) + max_new_tokens, "prompt plus max_new_tokens")
        stats: dict[str, float] = {}
        if self.reuse_prompts:
            held = [int(t) for t in self.llm.input_ids[: self.llm.n_tokens]]
            shared = 0
            while shared < min(len(held), len(ids) - 1) and held[shared] == ids[shared]:
                shared += 1
            stats = {
                "prefix_queries": 1.0,
                "prefix_hits": 1.0 if shared else 0.0,
                "prefix_prompt_tokens": float(len(ids)),
                "prefix_reused_tokens": float(shared),
            }
        else:
            self.llm.reset()  # no reuse: llama-cpp-python would otherwise reuse the previous prompt's KV
        out: list[int] = []
        proposed = accepted = steps = 0
        pending: list[int] = []
        finish = "length"
        for token in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            token = int(token)
            if self.drafter is not None:
                if self.drafter.fresh:
                    # A draft was made for the tokens about to be yielded: they are checked against it.
                    pending, self.drafter.fresh = list(self.drafter.last), False
                    if pending:
                        steps, proposed = steps + 1, proposed + len(pending)
                if pending and pending[0] == token:
                    accepted += 1
                    pending.pop(0)
                else:
                    pending = []
            out.append(token)
            if token == self.eos_token_id:
                finish = "stop"
                break
            if len(out) >= max_new_tokens:
                break
        rows = log_softmax(np.asarray(self.llm.scores[len(ids) - 1 : len(ids) - 1 + len(out)], dtype=np.float32))
        k = min(top_k, rows.shape[1])
        top_ids = np.argsort(-rows, axis=1, kind="stable")[:, :k]
        if self.drafter is not None:
            stats.update({"verify_steps": steps, "proposed_tokens": proposed, "accepted_tokens": accepted})
        return Generation(
            ids,
            out,
            self.decode(out),
            top_ids.astype(np.int64),
            np.take_along_axis(rows, top_ids, axis=1),
            finish,
            stats,
        )

    def close(self) -> None:
        self.llm.close()


def _ggml_type(llama_cpp: Any, name: str) -> int:
    value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if value is None:
        raise ConfigError(f"this llama-cpp-python has no KV cache type '{name}'")
    return int(value)
