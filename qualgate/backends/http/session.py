"""A stack served by an OpenAI-compatible endpoint: scoring through the completions API and greedy
generation, with the model's own tokenizer so token ids mean what they mean in process.

Two scoring modes, chosen by the probe (qualgate.backends.http.probe):
- "token_ids" (vLLM): the prompt is sent as token ids and `prompt_logprobs` returns every position;
  nothing is re-tokenized, so a chunk that starts mid-word is scored exactly as given.
- "echo" (the legacy protocol: llama.cpp servers, proxies): the prompt is sent as text with
  echo=True; the server's tokens must equal the model's, position by position, or the request fails.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from qualgate.backends.base import Capabilities, Generation, ScoreResult
from qualgate.backends.http.client import CompletionsClient, Endpoint
from qualgate.backends.http.parsers import generated, rows_from_echo, rows_from_prompt_logprobs
from qualgate.backends.rows import Row, score_from_rows
from qualgate.backends.tokenized import TokenizedSession
from qualgate.stack import Stack

ScoreMode = Literal["token_ids", "echo"]
TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")  # vLLM's return_tokens_as_token_ids spelling


@dataclass
class ProbeReport:
    """What the capability probe found an endpoint can do (report provenance: `engine_probes`)."""

    stack: str
    endpoint: str
    mode: str = ""
    token_id_prompts: bool = False
    top_k: int = 0
    canary_mean_abs_diff: float | None = None
    canary_tolerance: float | None = None
    notes: list[str] = field(default_factory=list)
    scoring: bool = True  # False: prompt logprobs unusable, the endpoint is measured by generation only

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class OpenAISession(TokenizedSession):
    capabilities: ClassVar[Capabilities] = Capabilities(score=True, generate=True, max_top_k=20, block_scoring=False)

    def __init__(
        self,
        stack: Stack,
        endpoint: Endpoint,
        tokenizer: Any,
        n_vocab: int,
        client: CompletionsClient,
        top_k: int,
        max_positions: int = 0,
    ) -> None:
        self.stack = stack
        self.endpoint = endpoint
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        self.client = client
        self.top_k_cap = top_k
        self.max_positions = max_positions
        self.mode: ScoreMode = "token_ids"
        self.token_id_prompts = True
        self.metrics = MetricsReader(endpoint)
        self._pieces: dict[str, int] | None = None
        self.on_close: Callable[[], None] | None = None  # a managed server's release
        self.probe: ProbeReport | None = None  # what the capability probe found (run provenance)

    def configure(self, report: ProbeReport) -> None:
        """Score and prompt the way the probe found the endpoint works."""
        self.mode = "token_ids" if report.mode == "token_ids" else "echo"
        self.token_id_prompts = report.token_id_prompts
        self.top_k_cap = max(report.top_k, 1)
        self.probe = report

    # -- requests ---------------------------------------------------------------------------------
    def score_body(self, token_ids: Sequence[int], top_k: int) -> dict[str, Any]:
        k = min(top_k, self.top_k_cap)
        if self.mode == "token_ids":
            return {"prompt": list(token_ids), "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
        return {
            "prompt": self.prompt_text(token_ids),
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": k,
        }

    def prompt_text(self, token_ids: Sequence[int]) -> str:
        """Text the server turns back into `token_ids` (it adds BOS itself, so a leading BOS is dropped)."""
        ids = list(token_ids)
        if ids and ids[0] == self.bos_token_id:
            ids = ids[1:]
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def rows(self, token_ids: Sequence[int], response: dict[str, Any], top_k: int) -> list[Row]:
        """One Row per position 1..n-1 of token_ids, or an error naming what the server got wrong."""
        if self.mode == "token_ids":
            return rows_from_prompt_logprobs(token_ids, response, top_k, str(self.endpoint))
        pieces = [self.piece(t) for t in token_ids]
        return rows_from_echo(token_ids, response, pieces, self.bos_token_id, self.piece_id, str(self.endpoint))

    def piece(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def piece_id(self, piece: str) -> int:
        """The id of a token the server names by its text (echo mode); -1 if none has that text."""
        match = TOKEN_ID.match(piece)
        if match:
            return int(match.group(1))
        if self._pieces is None:
            self._pieces = {}
            for token_id in range(len(self.tokenizer)):
                self._pieces.setdefault(self.piece(token_id), token_id)
        return self._pieces.get(piece, -1)

    # -- Session ------------------------------------------------------------------------------------
    def score(
        self,
        token_ids: Sequence[int],
        top_k: int = 64,
        block_size: int | None = None,
        gather: np.ndarray | None = None,
        schedule: Sequence[int] | None = None,
        tail_samples: int = 0,
    ) -> ScoreResult:
        # An endpoint returns only its own top-k: no tail sample (fidelity keeps the KL bound for it).
        # It decides itself how a prompt enters its cache (capabilities.block_scoring=False):
        # block_size and schedule cannot be honoured here, and callers check the capability first.
        k = min(top_k, self.top_k_cap)
        response = self.client.one(self.score_body(token_ids, k))
        return score_from_rows(token_ids, self.rows(token_ids, response, k), k, gather)

    def score_many(self, sequences: Sequence[Sequence[int]], block_size: int | None = None) -> list[ScoreResult]:
        responses = self.client.many([self.score_body(ids, 1) for ids in sequences])
        return [score_from_rows(ids, self.rows(ids, r, 1), 1) for ids, r in zip(sequences, responses, strict=True)]

    def generate(
        self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64, top_k: int = 8
    ) -> list[Generation]:
        # One at a time, in order: a prefix cache's warm run depends on what ran before, and a batch's
        # composition changes an engine's kernels; the counters are read per generation.
        return [self._generate_one(prompt, max_new_tokens, top_k) for prompt in prompts]

    def _generate_one(self, prompt: str | Sequence[int], max_new_tokens: int, top_k: int) -> Generation:
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        body: dict[str, Any] = {
            "prompt": prompt_ids if self.token_id_prompts else self.prompt_text(prompt_ids),
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            "logprobs": min(top_k, self.top_k_cap),
            "return_tokens_as_token_ids": True,
            "ignore_eos": False,
        }
        before = self.metrics.read()
        choice = self.client.one(body)["choices"][0]
        after = self.metrics.read()
        token_ids, top_ids, top_logprobs = generated(choice, top_k, self.piece_id)
        if not token_ids or any(t < 0 for t in token_ids):
            # No logprobs (a generation-only endpoint) or a piece the tokenizer does not know: the
            # text re-tokenized is the closest to the engine's tokens we can get.
            token_ids = self.encode(choice.get("text") or "", add_bos=False)
        finish = "stop" if choice.get("finish_reason") == "stop" else "length"
        text = str(choice.get("text") or "")
        return Generation(prompt_ids, token_ids, text, top_ids, top_logprobs, finish, self._own_counters(after, before))

    def _own_counters(self, after: Counters, before: Counters) -> dict[str, float]:
        """The counters of this stack's layers only: an engine exports all of them (vLLM even caches
        prefixes by default), and a counter of a layer the stack lacks would be read as that layer's."""
        stats = after.minus(before)
        if self.stack.layer("speculation") is None:
            stats = {k: v for k, v in stats.items() if k not in ("verify_steps", "proposed_tokens", "accepted_tokens")}
        if self.stack.layer("prefix_cache") is None:
            stats = {k: v for k, v in stats.items() if not k.startswith("prefix_")}
        return stats

    def provenance(self) -> dict[str, Any] | None:
        return None if self.probe is None else self.probe.as_dict()

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()
            self.on_close = None


COUNTERS = {
    # qualgate's counter name -> the vLLM Prometheus counter it is read from
    "verify_steps": "vllm:spec_decode_num_drafts_total",
    "proposed_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total",
    "prefix_prompt_tokens": "vllm:prefix_cache_queries_total",
    "prefix_reused_tokens": "vllm:prefix_cache_hits_total",
}


class Counters(dict[str, float]):
    def minus(self, earlier: Counters) -> dict[str, float]:
        stats = {key: self[key] - earlier.get(key, 0.0) for key in self}
        if "prefix_prompt_tokens" in stats:
            # One generation is one query; it hit when any of its prompt tokens came from the cache.
            stats["prefix_queries"] = 1.0
            stats["prefix_hits"] = 1.0 if stats["prefix_reused_tokens"] > 0 else 0.0
        return stats


class MetricsReader:
    """The engine's Prometheus counters (vLLM's /metrics), read around each generation; an engine
    without them yields no counters, and equivalence reports none rather than zeros."""

    def __init__(self, endpoint: Endpoint) -> None:
        root = endpoint.base_url.rstrip("/")
        self.url = (root[: -len("/v1")] if root.endswith("/v1") else root) + "/metrics"
        self.enabled = True

    def read(self) -> Counters:
        if not self.enabled:
            return Counters()
        try:
            with urllib.request.urlopen(self.url, timeout=10) as response:
                text = response.read().decode("utf-8", "replace")
        except OSError:
            self.enabled = False
            return Counters()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            name, _, rest = line.partition("{")
            if not rest:
                name, _, value = line.partition(" ")
            else:
                value = rest.rpartition("}")[2]
            try:
                values[name.strip()] = values.get(name.strip(), 0.0) + float(value.strip())
            except ValueError:
                continue
        return Counters({key: values[metric] for key, metric in COUNTERS.items() if metric in values})
