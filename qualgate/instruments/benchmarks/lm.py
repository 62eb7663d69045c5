"""lm-eval's model interface backed by a qualgate session: every lm-eval task runs through exactly the
stack under test (its layers, engine and tokenizer).

Tokenization follows lm-eval's own `TemplateLM` (trailing context spaces move to the continuation,
context and whole are encoded and split, an empty context is the BOS), and BOS follows the model's
tokenizer as lm-eval's HF model class does by default, so a task scores here as it does there. A
context that already starts with the BOS text is not given a second BOS.

Results are cached in qualgate's run store, keyed by the identity of what produced them (lm-eval's
own request cache keys omit the model, so a shared cache would report one model's scores for another).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, Protocol

from lm_eval.api.model import TemplateLM

from qualgate.backends.base import Session
from qualgate.chunking import rolling_chunks
from qualgate.errors import ConfigError

DEFAULT_MAX_LENGTH = 2048
SCORE_BATCH = 256  # requests handed to the engine at once (and checkpointed between)


class RequestCache(Protocol):
    def load(self, name: str) -> dict[str, Any] | None: ...

    def save(self, name: str, record: dict[str, Any]) -> None: ...


def request_key(kind: str, args: Any) -> str:
    return hashlib.sha256(json.dumps([kind, args], default=str).encode()).hexdigest()[:32]


class QualgateLM(TemplateLM):  # type: ignore[misc]  # lm-eval ships no type information
    def __init__(
        self,
        session: Session,
        block_size: int | None = None,
        score_cache: RequestCache | None = None,
        generate_cache: RequestCache | None = None,
        on_request: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__()
        self.session = session
        self.block_size = block_size  # None: one forward pass; an int when a KV-cache layer must be read
        self.score_cache = score_cache
        self.generate_cache = generate_cache
        self.on_request = on_request
        self.scored_sequences: list[list[int]] = []  # for the hygiene checks (BOS count)

    # -- chat template (lm-eval's apply_chat_template: true) ----------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.session.stack.model.path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.session.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.session.render_chat(chat_history, add_generation_prompt)

    # -- tokenizer -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.session.eos_token_id
        return int(eos if eos is not None else 0)

    @property
    def prefix_token_id(self) -> int:
        bos = self.session.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.session.max_positions or DEFAULT_MAX_LENGTH

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = self.session.encode(string, add_bos=add_special_tokens is not False)
        # A text that carries its own BOS (a task rendering "<s>" itself) must not get a second one:
        # the tokenizer maps the BOS text to the BOS id, so a doubled BOS shows as two leading ids.
        bos = self.session.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids

    def check_hygiene(self) -> None:
        """Every sequence the model saw has at most one BOS, and only first: a second BOS (a task that
        renders its own, or a tokenizer adding one) changes scores silently."""
        bos = self.session.bos_token_id
        if bos is None:
            return
        bad = [ids for ids in self.scored_sequences if bos in ids[1:]]
        if bad:
            raise ConfigError(
                f"{len(bad)} of {len(self.scored_sequences)} benchmark requests carry a BOS token after the first "
                "position (a double BOS); check the task's prompt rendering"
            )

    # -- scoring ---------------------------------------------------------------------------------
    def _score(self, ids: list[int]) -> Any:
        self.scored_sequences.append(ids)
        [scored] = self.session.score_many([ids], self.block_size)
        return scored

    def _cached(self, cache: RequestCache | None, kind: str, args: Any, compute: Callable[[], Any]) -> Any:
        key = request_key(kind, args)
        if cache is not None:
            found = cache.load(key)
            if found is not None:
                return found["result"]
        result = compute()
        if cache is not None:
            cache.save(key, {"result": result})
        return result

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # type: ignore[no-any-return]  # qualgate shows progress

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        # As lm-eval's HF model: keep the last max_length + 1 tokens (the continuation always fits).
        wholes = [(context + continuation)[-(self.max_length + 1) :] for _, context, continuation in requests]
        lengths = [len(continuation) for _, _, continuation in requests]
        keys = [request_key("loglikelihood", [*whole, -1, n]) for whole, n in zip(wholes, lengths, strict=True)]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for i, key in enumerate(keys):
            found = self.score_cache.load(key) if self.score_cache is not None else None
            if found is not None:
                results[i] = (float(found["result"][0]), bool(found["result"][1]))
        missing = [i for i, r in enumerate(results) if r is None]
        done = len(requests) - len(missing)
        for start in range(0, len(missing), SCORE_BATCH):
            batch = missing[start : start + SCORE_BATCH]
            self.scored_sequences.extend(wholes[i] for i in batch)
            for i, scored in zip(
                batch, self.session.score_many([wholes[i] for i in batch], self.block_size), strict=True
            ):
                n = lengths[i]
                greedy = [int(t) for t in scored.top_ids[-n:, 0]] == wholes[i][-n:]
                result = (float(scored.logprobs[-n:].sum()), greedy)
                results[i] = result
                if self.score_cache is not None:
                    self.score_cache.save(keys[i], {"result": list(result)})
            done += len(batch)
            if self.on_request:
                self.on_request(done, len(requests))
        return [r for r in results if r is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = []
        for (text,) in [req.args for req in requests]:
            ids = self.session.encode(text, add_bos=False)

            def compute(ids: list[int] = ids) -> float:
                total = 0.0
                for chunk in rolling_chunks(ids, self.max_length, self.prefix_token_id):
                    scored = self._score(chunk.token_ids)
                    total += float(scored.logprobs[chunk.first_scored :].sum())
                return total

            results.append(float(self._cached(self.score_cache, "rolling", [ids, self.max_length], compute)))
        return results

    # -- generation ------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results = []
        for i, (context, gen_kwargs) in enumerate([req.args for req in requests]):
            kwargs = dict(gen_kwargs)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("qualgate benchmarks decode greedily: a task asked for sampling")
            ids = self.tok_encode(context)[-(self.max_length - max_new) :]
            self.scored_sequences.append(ids)

            def compute(ids: list[int] = ids, max_new: int = max_new, until: list[str] = until) -> str:
                [generation] = self.session.generate([ids], max_new_tokens=max_new, top_k=1)
                text = generation.text
                cut = min((text.index(stop) for stop in until if stop and stop in text), default=len(text))
                return text[:cut]

            results.append(str(self._cached(self.generate_cache, "generate", [ids, max_new, until], compute)))
            if self.on_request:
                self.on_request(i + 1, len(requests))
        return results
