"""OpenAI-compatible endpoints shaped like the engines that cannot run on this machine (SGLang, TGI,
Ollama, chat-first gateways): a real HTTP server whose numbers come from the in-process HF model and
whose protocol follows what each engine's OpenAI layer does with a completions request
(docs/engines.md has the table and the sources).

- sglang: token-id or text prompts; `prompt_logprobs` ignored; `echo` + integer `logprobs` returns
  every prompt token including BOS, whose logprob is None.
- tgi: text prompts only (422 on a token list); `echo` and `logprobs` ignored (`logprobs: null`).
- ollama: text prompts only (400); `echo` ignored, so logprobs cover only the generated tokens.
- boolean: `logprobs` must be a boolean (422 on an integer), as chat-first gateways want.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from loopback_http import LoopbackJSONServer

from qualgate.backends.hf import HFSession

Answer = tuple[int, dict[str, Any]]


class ShapedEngine(LoopbackJSONServer):
    def __init__(self, shape: str, session: HFSession) -> None:
        super().__init__()
        self.shape = shape
        self.session = session
        self.requests: list[dict[str, Any]] = []
        self.answer: Callable[[dict[str, Any]], Answer] = getattr(self, f"_{shape}")
        self.lock = threading.Lock()

    def handle(self, path: str, body: dict[str, Any] | None) -> Answer:
        if body is None:  # /v1/models, /metrics
            return 200, {"object": "list", "data": [{"id": "m", "object": "model"}]}
        self.requests.append(body)
        with self.lock:  # one model, one request at a time
            return self.answer(body)

    # -- what the model computes -------------------------------------------------------------------
    def _piece(self, token_id: int) -> str:
        """A token as engines name it in logprobs: its text, special tokens included (BOS is '<s>')."""
        return str(self.session.tokenizer.decode([token_id], skip_special_tokens=False))

    def _ids(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.session.encode(prompt)

    def _complete(self, ids: list[int], max_tokens: int, k: int) -> tuple[list[int], list[dict[str, float]]]:
        """Greedy tokens and, per token, the top-k pieces with logprobs (the chosen one always in)."""
        g = self.session.generate([ids], max_new_tokens=max(max_tokens, 1), top_k=max(k, 1))[0]
        tops = []
        for token, top_ids, top_lps in zip(g.token_ids, g.top_ids, g.top_logprobs, strict=False):
            entry = {self._piece(int(t)): float(v) for t, v in zip(top_ids[:k], top_lps[:k], strict=True)}
            entry.setdefault(self._piece(token), float(top_lps[list(top_ids).index(token)]))
            tops.append(entry)
        return list(g.token_ids), tops

    def _echo(self, ids: list[int], generated: list[int], k: int, with_bos: bool) -> dict[str, Any]:
        full = ids + generated
        scored = self.session.score(full, top_k=max(k, 1))
        pieces = [self._piece(t) for t in full]
        values: list[float | None] = [None, *(float(v) for v in scored.logprobs)]
        tops: list[dict[str, float] | None] = [None]
        for row_ids, row_lps in zip(scored.top_ids, scored.top_logprobs, strict=True):
            tops.append({self._piece(int(t)): float(v) for t, v in zip(row_ids[:k], row_lps[:k], strict=True)})
        start = 0 if with_bos or ids[0] != self.session.bos_token_id else 1
        return {"tokens": pieces[start:], "token_logprobs": values[start:], "top_logprobs": tops[start:]}

    @staticmethod
    def _completion(text: str, logprobs: dict[str, Any] | None, finish: str = "length") -> dict[str, Any]:
        return {
            "id": "cmpl-shaped",
            "object": "text_completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    def _generated(self, ids: list[int], body: dict[str, Any], k: int) -> tuple[list[int], dict[str, Any]]:
        generated, tops = self._complete(ids, int(body.get("max_tokens") or 16), k)
        values = [float(top[self._piece(t)]) for t, top in zip(generated, tops, strict=True)]
        pieces = [self._piece(t) for t in generated]
        return generated, {"tokens": pieces, "token_logprobs": values, "top_logprobs": tops}

    # -- the shapes ---------------------------------------------------------------------------------
    def _sglang(self, body: dict[str, Any]) -> Answer:
        ids = self._ids(body["prompt"])
        k = int(body.get("logprobs") or 0)
        generated, logprobs = self._generated(ids, body, k)
        if body.get("echo") and k:
            logprobs = self._echo(ids, generated, k, with_bos=True)
        prefix = (
            self.session.decode(ids[1:] if ids[0] == self.session.bos_token_id else ids) if body.get("echo") else ""
        )
        return 200, self._completion(prefix + self.session.decode(generated), logprobs if k else None)

    def _tgi(self, body: dict[str, Any]) -> Answer:
        if not isinstance(body["prompt"], str):
            return 422, {
                "error": "Failed to deserialize the JSON body into the target type: prompt",
                "error_type": "422",
            }
        generated, _ = self._generated(self._ids(body["prompt"]), body, 1)
        return 200, self._completion(self.session.decode(generated), None)

    def _ollama(self, body: dict[str, Any]) -> Answer:
        if not isinstance(body["prompt"], str):
            return 400, {"error": {"message": "invalid prompt value", "type": "invalid_request_error"}}
        k = int(body.get("logprobs") or 0)
        generated, logprobs = self._generated(self._ids(body["prompt"]), body, k)
        return 200, self._completion(self.session.decode(generated), logprobs if k else None)

    def _boolean(self, body: dict[str, Any]) -> Answer:
        if not isinstance(body["prompt"], str) or not isinstance(body.get("logprobs", False), bool):
            return 422, {"detail": [{"loc": ["body", "logprobs"], "msg": "Input should be a valid boolean"}]}
        generated, _ = self._generated(self._ids(body["prompt"]), body, 1)
        return 200, self._completion(self.session.decode(generated), None)
