"""A deliberately broken OpenAI endpoint: a real HTTP proxy in front of a real server that rewrites
its completions the way a misbehaving engine would (llama.cpp's native server: echo returns logprobs
for the generated tokens only)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from loopback_http import LoopbackJSONServer


def generated_only(response: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """Keep only the logprobs of the generated tokens, as if `echo` were ignored for logprobs."""
    n = int(body.get("max_tokens") or 0)
    for choice in response.get("choices", []):
        logprobs = choice.get("logprobs") or {}
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            if isinstance(logprobs.get(key), list):
                logprobs[key] = logprobs[key][len(logprobs[key]) - n :] if n else []
        choice.pop("prompt_logprobs", None)
    return response


class BrokenProxy(LoopbackJSONServer):
    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream.rstrip("/")

    def handle(self, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        path = path[len("/v1") :] if path.startswith("/v1") else path
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.upstream + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, payload = response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, json.loads(exc.read() or b"{}")
        if body is not None and status == 200 and path.startswith("/completions"):
            payload = generated_only(payload, body)
        return status, payload
