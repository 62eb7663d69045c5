"""Engines reached over HTTP through the OpenAI completions API (any endpoint, or a vLLM server qualgate
manages): the client (client.py), pure parsers of the response shapes shared by the session and the
capability probe (parsers.py), the session (session.py), the probe (probe.py), the backends
(backend.py, vllm.py)."""
