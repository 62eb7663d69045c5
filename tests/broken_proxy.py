"""A deliberately broken OpenAI endpoint: a real HTTP proxy in front of a real server that rewrites
its completions the way a misbehaving engine would (llama.cpp's native server: echo returns logprobs
for the generated tokens only)."""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from server_process import free_port


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


class BrokenProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._forward(None)

            def do_POST(self) -> None:
                self._forward(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def _forward(self, body: dict[str, Any] | None) -> None:
                path = self.path[len("/v1") :] if self.path.startswith("/v1") else self.path
                data = None if body is None else json.dumps(body).encode()
                request = urllib.request.Request(
                    proxy.upstream + path, data=data, headers={"Content-Type": "application/json"}
                )
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        status, payload = response.status, json.loads(response.read())
                except urllib.error.HTTPError as exc:
                    status, payload = exc.code, json.loads(exc.read() or b"{}")
                if body is not None and status == 200 and path.startswith("/completions"):
                    payload = generated_only(payload, body)
                out = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> BrokenProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
