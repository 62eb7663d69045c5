"""The judge endpoint through the `openai` client: temperature 0, a seed, timeouts, retries with
exponential backoff, bounded concurrency, JSON-schema output where the endpoint supports it, and a
cache keyed by the full identity of each judgment (endpoint, judge model, template version, request).

The API key is read from the environment variable the pipeline names and is never logged, cached or
written to any report.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from qualgate.errors import ConfigError, InfrastructureError, MissingDependencyError
from qualgate.instruments.judge.config import JudgeConfig
from qualgate.instruments.judge.protocols import TEMPLATE_VERSION, Request, parse


class Cache(Protocol):
    def load(self, name: str) -> dict[str, Any] | None: ...

    def save(self, name: str, record: dict[str, Any]) -> None: ...


class JudgeUnavailable(InfrastructureError):
    """The judge endpoint could not be reached or kept failing (exit 3; finished judgments are kept)."""


def judge_identity(config: JudgeConfig) -> dict[str, Any]:
    """What a verdict depends on: where and which judge, how it is asked. Not the key, not concurrency."""
    # A served judge is known by what it serves, not by the port it got this time: a rerun reuses its verdicts.
    where = {"serve": config.serve} if config.serve else {"base_url": (config.base_url or "").rstrip("/")}
    return {
        **where,
        "model": config.model_name,
        "template": TEMPLATE_VERSION,
        "seed": config.seed,
        "structured": config.structured,
    }


class JudgeClient:
    def __init__(self, config: JudgeConfig, cache: Cache | None = None, base_url: str | None = None) -> None:
        try:
            import openai
        except ImportError:
            raise MissingDependencyError("openai", "the judge instrument", "judge") from None
        key = "EMPTY"  # local servers accept any key; the openai client insists on one
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "")
            if not key:
                raise ConfigError(
                    f"instruments.judge.api_key_env names {config.api_key_env}, which is not set; export it"
                )
        self.config = config
        self.cache = cache
        self.identity = judge_identity(config)
        # The client's own retries are off: ours back off and report the endpoint in one line.
        self.base_url = base_url or config.base_url
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=config.timeout, max_retries=0)
        self.errors = (
            openai.APIConnectionError,
            openai.APITimeoutError,
            openai.InternalServerError,
            openai.RateLimitError,
        )
        self.unparseable = 0
        self.requests = 0

    def key(self, request: Request) -> str:
        blob = json.dumps([self.identity, request.kind, request.messages], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _call(self, request: Request, attempt_seed: int) -> str:
        kwargs: dict[str, Any] = {
            "model": self.config.model_name,
            "messages": request.messages,
            "temperature": 0.0,
            "seed": attempt_seed,
            "max_tokens": 32,
        }
        if self.config.structured == "json_schema":  # OpenAI, vLLM, SGLang
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": request.kind, "schema": request.schema, "strict": True},
            }
        elif self.config.structured == "json_object":  # llama.cpp servers: a schema-driven grammar
            kwargs["response_format"] = {"type": "json_object", "schema": request.schema}
        delay = 1.0
        for attempt in range(self.config.max_retries + 1):
            try:
                self.requests += 1
                response = self.client.chat.completions.create(**kwargs)
                return str(response.choices[0].message.content or "")
            except self.errors as exc:
                if attempt == self.config.max_retries:
                    raise JudgeUnavailable(
                        f"judge endpoint {self.base_url} failed after {attempt + 1} attempts "
                        f"({exc.__class__.__name__}); finished judgments are kept: rerun to resume"
                    ) from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def judge(self, request: Request) -> dict[str, Any]:
        """{"verdict": parsed or None, "reply": raw text, "attempts": n}; cached once parsed or given up."""
        key = self.key(request)
        if self.cache is not None:
            found = self.cache.load(key)
            if found is not None:
                return found
        reply, verdict = "", None
        attempts = 0
        for attempt in range(self.config.parse_retries + 1):
            attempts += 1
            # A retry of an unparseable verdict changes only the seed, so it can come out differently.
            reply = self._call(request, self.config.seed + attempt)
            verdict = parse(request.kind, reply)
            if verdict is not None:
                break
        if verdict is None:
            self.unparseable += 1
        record = {"verdict": verdict, "reply": reply[:500], "attempts": attempts}
        if self.cache is not None:
            self.cache.save(key, record)
        return record

    def judge_all(
        self, requests: list[Request], on_done: Callable[[int, int], None] | None = None
    ) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(requests)
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            futures = {pool.submit(self.judge, r): i for i, r in enumerate(requests)}
            for done, (future, index) in enumerate(futures.items(), start=1):
                results[index] = future.result()  # re-raises JudgeUnavailable after the others settle
                if on_done:
                    on_done(done, len(requests))
        return [r for r in results if r is not None]
