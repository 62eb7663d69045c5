"""Completions requests to an OpenAI-compatible endpoint: bounded async concurrency, retries with
backoff, and one error naming the endpoint when it stays unreachable (exit 3, work so far kept)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qualgate.errors import ConfigError, InfrastructureError, MissingDependencyError


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # ".../v1"
    model: str
    api_key: str = "EMPTY"

    def __str__(self) -> str:
        return f"{self.base_url} (model '{self.model}')"


class EndpointRejected(Exception):
    """The server answered 4xx: the request shape is not supported (the probe reads this)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class CompletionsClient:
    """Sends /v1/completions requests; `many` runs them concurrently, at most `concurrency` at a time."""

    def __init__(
        self,
        endpoint: Endpoint,
        concurrency: int = 4,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 0.5,
        diagnose: Callable[[], str | None] | None = None,
    ) -> None:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise MissingDependencyError("openai", "the OpenAI-compatible backend", "judge") from None
        if concurrency < 1:
            raise ConfigError(f"backend option 'concurrency' must be >= 1 (got {concurrency})")
        self.endpoint = endpoint
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.diagnose = diagnose  # a managed server's own account of why it stopped answering

    def one(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.many([body])[0]

    def many(self, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return asyncio.run(self._many(bodies, self.retries))

    def try_once(self, body: dict[str, Any]) -> dict[str, Any]:
        """One attempt, any failure raised as EndpointRejected: for probing a request shape the server
        may not support (llama-cpp-python answers a token-id prompt with a 500, not a 4xx)."""
        try:
            return asyncio.run(self._many([body], 0))[0]
        except InfrastructureError as exc:
            raise EndpointRejected(500, str(exc)) from None

    async def _many(self, bodies: Sequence[dict[str, Any]], retries: int) -> list[dict[str, Any]]:
        from openai import AsyncOpenAI

        # The SDK's own retries are off: ours back off with jitter and end in one named error.
        client = AsyncOpenAI(
            base_url=self.endpoint.base_url, api_key=self.endpoint.api_key, timeout=self.timeout, max_retries=0
        )
        limit = asyncio.Semaphore(self.concurrency)
        try:

            async def run(body: dict[str, Any]) -> dict[str, Any]:
                async with limit:
                    return await self._send(client, body, retries)

            return list(await asyncio.gather(*(run(body) for body in bodies)))
        finally:
            await client.close()

    async def _send(self, client: Any, body: dict[str, Any], retries: int) -> dict[str, Any]:
        import openai

        standard = {"model", "prompt", "max_tokens", "temperature", "logprobs", "echo", "seed", "n", "stop"}
        kwargs = {key: value for key, value in body.items() if key in standard}
        extra = {key: value for key, value in body.items() if key not in standard}
        last: Exception | None = None
        for attempt in range(retries + 1):
            try:
                response = await client.completions.create(
                    model=self.endpoint.model, **kwargs, extra_body=extra or None
                )
                return dict(response.model_dump())
            except openai.APIStatusError as exc:
                if exc.status_code < 500 and exc.status_code != 429:
                    raise EndpointRejected(exc.status_code, _message(exc)) from None
                last = exc
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                last = exc
            if attempt < retries:
                await asyncio.sleep(self.backoff * 2**attempt * (1 + random.random()))
        cause = self.diagnose() if self.diagnose is not None else None
        if cause:
            raise InfrastructureError(f"endpoint {self.endpoint}: the server {cause}; finished work is kept")
        raise InfrastructureError(
            f"endpoint {self.endpoint} did not answer after {retries + 1} attempt(s) "
            f"({type(last).__name__}: {_message(last)}); check that the server is up, finished work is kept"
        )


def _message(exc: Exception | None) -> str:
    if exc is None:
        return ""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        detail = body.get("message") or body.get("detail") or body.get("error")
        if detail:
            return str(detail)[:300]
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
