"""A local Hugging Face datasets cache built the way a connected machine fills it: load_dataset of a
dataset repository (parquet files per split under a config, and the card's configs), moved to the
directory name the Hub's dataset id caches under. Read back offline, it is what a user's cache holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import REPO

HELLASWAG_ENDINGS = [
    "opens the file and reads every line.",
    "eats the keyboard.",
    "flies to the moon.",
    "sings to the compiler.",
]


def cache_dataset(cache: Path, hub_id: str, config: str, splits: dict[str, dict[str, list[Any]]]) -> None:
    """`hub_id` (NAME or NAMESPACE/NAME) with one config and the given rows per split, into `cache`."""
    import datasets

    name = hub_id.split("/")[-1]
    repo = cache.parent / "repositories" / hub_id.replace("/", "___") / name
    for split, rows in splits.items():
        (repo / config).mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows).to_parquet(str(repo / config / f"{split}-00000-of-00001.parquet"))
    files = "".join(f"  - split: {s}\n    path: {config}/{s}-*\n" for s in splits)
    (repo / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n")
    datasets.load_dataset(str(repo), config, cache_dir=str(cache))
    if "/" in hub_id:  # a Hub dataset with a namespace is cached as NAMESPACE___NAME
        (cache / name).rename(cache / hub_id.replace("/", "___"))


def domain_lines() -> list[str]:
    text = (REPO / "evals" / "domain" / "cpython_docs_heldout.txt").read_text(encoding="utf-8")
    return [f"{line}\n" for line in text.splitlines()[:400]]


def build(cache: Path) -> Path:
    """wikitext (wikitext-2-raw-v1: rows of the bundled domain text), Rowan/hellaswag (six documents in
    its schema), and the bare names of allenai/ai2_arc (ARC-Easy) and openai/gsm8k (main)."""
    cache_dataset(cache, "wikitext", "wikitext-2-raw-v1", {"test": {"text": domain_lines()}})
    docs = {
        "ind": list(range(6)),
        "activity_label": ["Programming"] * 6,
        "ctx_a": ["The developer"] * 6,
        "ctx_b": ["then"] * 6,
        "ctx": ["The developer then"] * 6,
        "endings": [HELLASWAG_ENDINGS] * 6,
        "source_id": ["qualgate"] * 6,
        "split": ["val"] * 6,
        "split_type": ["indomain"] * 6,
        "label": ["0", "0", "1", "0", "2", "0"],
    }
    cache_dataset(cache, "Rowan/hellaswag", "default", {"train": docs, "validation": docs})
    question = {"id": ["q1"], "question": ["Which reads a file?"], "answerKey": ["A"]}
    arc = {**question, "choices": [{"text": ["open", "close"], "label": ["A", "B"]}]}
    cache_dataset(cache, "allenai/ai2_arc", "ARC-Easy", {"train": arc, "validation": arc, "test": arc})
    gsm = {"question": ["What is 2 + 3?"], "answer": ["2 + 3 = 5\n#### 5"]}
    cache_dataset(cache, "openai/gsm8k", "main", {"train": gsm, "test": gsm})
    return cache
