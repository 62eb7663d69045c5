"""Shared fixtures: the bundled models, offline, and sessions reused across tests where that is safe."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Nothing may come from a hub: the fixture models and data ship in the repository.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
EVALS = REPO / "evals"


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # Two cores: at most two threads per test process keeps timings stable and results deterministic.
    # Under pytest-xdist (`-n N`) every worker gets its share of the cores, and so do the engine
    # servers and `qualgate run` subprocesses it starts (they read the environment).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, min(2, os.cpu_count() or 1) // workers)
    if workers > 1:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)
    torch.set_num_threads(threads)


# Modules whose slow tests start engine servers (vLLM, llama.cpp) that take every core they are given:
# two at once on two cores run each about 3x slower, so they share one xdist group (one worker, in turn).
ENGINE_MODULES = ("test_engine_runs", "test_judge", "test_judge_model", "test_gpu_check", "test_kernel_loss")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow tests first (in file order): spread over workers, the long ones must not start last.

    Under `--dist loadgroup`, the engine tests run one after another on one worker, and a test that uses
    a module-scoped fixture (an MLflow server with a logged run, a converted GGUF) joins its module's
    group: the fixture is built once, on one worker, not once on every worker that gets one of its tests."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        module = item.module.__name__ if item.module else ""
        info = getattr(item, "_fixtureinfo", None)
        definitions = info.name2fixturedefs.values() if info is not None else []
        if module in ENGINE_MODULES and item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("engines"))
        elif any(defs[-1].scope == "module" for defs in definitions):
            item.add_marker(pytest.mark.xdist_group(module or item.nodeid))


@pytest.fixture(scope="session", autouse=True)
def _tracking_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Runs log to MLflow by default: keep the tests' runs in one throwaway SQLite store (migrated once),
    not in the repository's ./mlflow.db. Tests that need a server pass --tracking-uri, which wins."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def general_prompts() -> list[str]:
    return [row["prompt"] for row in read_jsonl(EVALS / "prompts" / "general.jsonl")]


@pytest.fixture(scope="session")
def shared_prefix_prompts() -> list[str]:
    return [row["prompt"] for row in read_jsonl(EVALS / "prompts" / "shared_prefix.jsonl")]


@pytest.fixture(scope="session")
def domain_text() -> str:
    return (EVALS / "domain" / "cpython_docs_heldout.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def hub_datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local datasets cache holding wikitext, Rowan/hellaswag, allenai/ai2_arc and openai/gsm8k
    (tests/hub_cache.py); use it through `offline_datasets`."""
    import hub_cache

    return hub_cache.build(tmp_path_factory.mktemp("hub") / "cache")


@pytest.fixture
def offline_datasets(hub_datasets_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process reads `hub_datasets_cache` and may not reach the Hub, as with HF_DATASETS_OFFLINE=1."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub_datasets_cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return hub_datasets_cache


@pytest.fixture(scope="session")
def small_golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A golden of the bundled target on the first 6 chunks of the domain text (3k tokens, ~3 s to record):
    for the engine runs, where every scored chunk is an HTTP request or an engine pass and the checks are
    about the engine (its baseline, its lossless layers), not the interval width 16 chunks buy."""
    from qualgate.cli import main

    out = tmp_path_factory.mktemp("golden") / "bundled-target-6"
    assert main(["golden", "record", "--out", str(out), "--max-chunks", "6"]) == 0
    return out


@pytest.fixture(scope="session")
def base_session() -> Iterator[Any]:
    from qualgate import build_stack, open_session

    with open_session(build_stack({"path": "bundled:target"})) as session:
        yield session


@pytest.fixture(scope="session")
def domain_ids(base_session: Any, domain_text: str) -> list[int]:
    """A 256-token window of held-out text (BOS first), enough to see every layer's effect."""
    ids: list[int] = base_session.encode(domain_text[:4000])
    return ids[:256]


@pytest.fixture(scope="session")
def base_generations(base_session: Any, general_prompts: list[str]) -> list[Any]:
    return base_session.generate(general_prompts, max_new_tokens=32)
