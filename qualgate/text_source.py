"""Domain text from a file, or from a dataset in the local Hugging Face `datasets` cache, read offline.

A dataset is named in a pipeline as `text: {dataset, config, split, field}` and everywhere else (the
CLI's --text, a golden manifest's recorded source) by the same spec as one string,
`dataset:NAME:CONFIG:SPLIT:FIELD` (CONFIG may be empty). The rows of the field are concatenated in
order, empty rows dropped; a row that does not end with a newline gets one (WikiText's rows carry
their own and are kept as they are). Nothing is downloaded: a dataset not in the cache is exit 2 with
the command that fetches it on a connected machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qualgate.errors import ConfigError, MissingDependencyError

DATASET_PREFIX = "dataset:"
SPEC_FORM = "dataset:NAME:CONFIG:SPLIT:FIELD (CONFIG may be empty), e.g. dataset:wikitext:wikitext-2-raw-v1:test:text"


class DatasetText(BaseModel):
    """`text:` as a dataset in the local `datasets` cache (HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(min_length=1, description="dataset name as on the Hub (e.g. wikitext), or a local directory")
    config: str | None = Field(None, description="the dataset's configuration (e.g. wikitext-2-raw-v1)")
    split: str = Field("test", min_length=1)
    field: str = Field("text", min_length=1, description="the column holding the text")

    def spec(self) -> str:
        """The one-string form: recorded as a golden's text source and accepted by --text."""
        return f"{DATASET_PREFIX}{self.dataset}:{self.config or ''}:{self.split}:{self.field}"

    def describe(self) -> str:
        config = f", config '{self.config}'" if self.config else ""
        return f"dataset '{self.dataset}'{config}, split '{self.split}'"

    def fetch_command(self) -> str:
        return fetch_command(self.dataset, self.config, self.split)


def fetch_command(dataset: str, config: str | None, split: str | None = None) -> str:
    """What fills the cache on a machine that can reach the Hub."""
    args = repr(dataset) + (f", {config!r}" if config else "") + (f", split={split!r}" if split else "")
    return f'python -c "import datasets; datasets.load_dataset({args})"'


def fetch_hint(command: str) -> str:
    return (
        f"fetch it on a connected machine with: {command} "
        "and copy that machine's cache here (or point HF_DATASETS_CACHE at it)"
    )


def is_dataset_spec(source: str) -> bool:
    return source.startswith(DATASET_PREFIX)


def text_sha256(source: str) -> str:
    """The content hash of a text source: a file's bytes, or a dataset's text as read."""
    if not is_dataset_spec(source):
        from qualgate.store import file_sha256

        return file_sha256(Path(source))
    from qualgate.golden import read_text_file

    return hashlib.sha256(read_text_file(source).encode()).hexdigest()


def parse_spec(source: str, where: str) -> DatasetText:
    parts = source[len(DATASET_PREFIX) :].split(":")
    if len(parts) != 4 or not parts[0] or not parts[2] or not parts[3]:
        raise ConfigError(f"{where}: '{source}' is not a dataset text spec; write it as {SPEC_FORM}")
    name, config, split, field = parts
    return DatasetText(dataset=name, config=config or None, split=split, field=field)


def as_source(value: Any) -> Any:
    """A pipeline's `text:` mapping as its one-string spec (a path or spec string passes through), so
    every reader of a text source takes one type."""
    if isinstance(value, dict):
        return DatasetText.model_validate(value).spec()
    return value


@contextmanager
def _offline() -> Iterator[None]:
    """The Hub is never asked, whatever the environment says: a run reads only what is cached."""
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _first_line(exc: Exception) -> str:
    """What `datasets` says went wrong, on one line (its messages run to several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cache_dir() -> str:
    """The datasets cache this process reads, lm-eval's loads included (HF_DATASETS_CACHE when the
    process started, else ~/.cache/huggingface/datasets)."""
    from datasets import config

    return str(config.HF_DATASETS_CACHE)


def read_dataset_text(spec: DatasetText, where: str) -> str:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("datasets", f"{where}: text from a dataset", "hf") from None
    cache = cache_dir()
    with _offline():
        try:
            rows = datasets.load_dataset(spec.dataset, spec.config, split=spec.split, cache_dir=cache)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{where}: {spec.describe()} is not in the local datasets cache {cache} ({_first_line(exc)}); "
                + fetch_hint(spec.fetch_command())
            ) from None
    if spec.field not in rows.column_names:
        raise ConfigError(
            f"{where}: {spec.describe()} has no field '{spec.field}'; its fields: {', '.join(rows.column_names)}"
        )
    values = rows[spec.field]
    if not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}: {spec.describe()}: field '{spec.field}' is not text; name a text column")
    text = "".join(v if v.endswith("\n") else v + "\n" for v in values if v)
    if not text.strip():
        raise ConfigError(f"{where}: {spec.describe()}: field '{spec.field}' is empty; name the column with the text")
    return text


# lm-eval task datasets given by a builder and local files, not by a Hub name: nothing to fetch.
PACKAGED_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder"})


def offline_by_environment() -> bool:
    """Whether this process may not reach the Hub (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE at start)."""
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def missing_from_cache(dataset: str, config: str | None) -> str | None:
    """Why a Hub dataset cannot be loaded from the local cache, or None when it can (its builder is
    found offline: a cached configuration of it exists)."""
    import datasets

    with _offline():
        try:
            datasets.load_dataset_builder(dataset, config, cache_dir=cache_dir())
        except (OSError, ValueError) as exc:
            return _first_line(exc)
    return None
