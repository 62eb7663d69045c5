"""Which optional packages (extras) a pipeline needs, checked before anything runs.

A nightly that installs `.[hf]` but runs benchmarks must stop at once with the `pip install` to run,
not an hour in. The same table is what the test of the shipped CI workflows checks them against.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qualgate.errors import MissingDependencyError

if TYPE_CHECKING:
    from qualgate.config import Pipeline


@dataclass(frozen=True)
class Need:
    module: str  # what is imported
    package: str  # what pip installs
    extra: str  # qualgate's extra that brings it
    purpose: str


_HF = (Need("torch", "torch", "hf", "the in-process model"), Need("transformers", "transformers", "hf", "tokenizers"))
_HTTP = (*_HF, Need("openai", "openai", "judge", "the OpenAI-compatible backend"))
BACKEND_NEEDS: dict[str, tuple[Need, ...]] = {
    "hf": _HF,
    "llamacpp": (
        *_HF,
        Need("llama_cpp", "llama-cpp-python", "llamacpp", "backend 'llamacpp'"),
        Need("gguf", "gguf", "llamacpp", "GGUF conversion"),
    ),
    "openai": _HTTP,
    "vllm": _HTTP,
}


def needs(pipeline: Pipeline) -> list[Need]:
    """Every optional package the pipeline's backend and instruments import (a plug-in backend: none known;
    an instrument declares its own in `needs`)."""
    found = list(BACKEND_NEEDS.get(pipeline.backend.name, ()))
    for instrument in pipeline.active_instruments():
        found.extend(instrument.needs)
    if pipeline.executor.name == "ray":
        found.append(Need("ray", "ray", "ray", "executor 'ray'"))
    return list(dict.fromkeys(found))


def extras(pipeline: Pipeline) -> set[str]:
    return {need.extra for need in needs(pipeline)}


def check_installed(pipeline: Pipeline, where: str) -> None:
    """Exit 2 naming the `pip install 'qualgate[...]'` that brings every missing package."""
    missing = [need for need in needs(pipeline) if importlib.util.find_spec(need.module) is None]
    if missing:
        first = missing[0]
        extra = ",".join(sorted({need.extra for need in missing}))
        raise MissingDependencyError(first.package, f"{where}: {first.purpose}", extra)
