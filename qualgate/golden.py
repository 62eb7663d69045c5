"""Golden baseline artifacts: the reference side of fidelity, recorded once and checked on every use.

A golden directory holds `scores.npz` (per scored token: target, logprob, top-k ids and logprobs, tail
mass; plus the chunks' token ids) and `manifest.json` (schema version and the hashes of everything
that determined the numbers). Loading compares the manifest with what the caller is about to compare
against and refuses, naming what changed, when anything differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from qualgate.chunking import Chunk
from qualgate.errors import ConfigError
from qualgate.fsio import read_text
from qualgate.golden_scores import RECORD_HINT, GoldenReference, check_scores
from qualgate.instruments.fidelity import FidelityConfig, TokenScores, compare, score_text
from qualgate.models import ModelSpec
from qualgate.redact import show
from qualgate.text_source import is_dataset_spec, parse_spec, read_dataset_text
from qualgate.validation import validate

if TYPE_CHECKING:
    from qualgate.backends.base import Session

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SCORES = "scores.npz"
# The chunking parameters that change which tokens are scored or what is stored; block_size is not
# among them (the reference side is always the baseline's own forward pass, recorded as such).
IDENTITY_FIELDS = ("mode", "n_ctx", "top_k", "max_chunks", "tail_samples")


class GoldenManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int
    created: str
    model: dict[str, Any]
    text: dict[str, Any]
    fidelity: dict[str, Any]
    block_size: int | None
    libraries: dict[str, str]
    n_tokens: int
    n_chunks: int
    scores_bytes: int
    bytes_per_token: float
    ppl: float
    # Compressed bytes per token the tail sample adds to scores.npz (0 in a golden without one).
    tail_sample_bytes_per_token: float = 0.0

    def baseline_model(self, dtype: str | None = None) -> ModelSpec:
        """The model the golden was recorded with (optionally in another dtype, for a noise floor)."""
        return ModelSpec.model_validate({"path": self.model["path"], "dtype": dtype or self.model["dtype"]})

    def fidelity_config(self, **overrides: Any) -> FidelityConfig:
        """The chunking and top-k of this golden, with comparison-side settings (block sizes) added.
        A golden recorded before tail samples existed has none: its KL is the bound."""
        return validate(
            FidelityConfig,
            {"tail_samples": 0, **self.fidelity, **overrides},
            f"golden manifest fidelity (re-record it: {RECORD_HINT})",
        )


def read_text_file(path: str, where: str = "--text") -> str:
    """A domain text: a UTF-8 file, or a `dataset:` spec read from the local datasets cache."""
    if is_dataset_spec(path):
        return read_dataset_text(parse_spec(path, where), where)
    text = read_text(Path(path), "text file", "pass --text (or fidelity.text) with a UTF-8 file")
    if not text.strip():
        raise ConfigError(f"text file '{path}' is empty; give it the domain text to score")
    return text


def domain_text(golden_dir: Path, manifest: GoldenManifest, override: str | None = None, where: str = "--text") -> str:
    """The domain text a golden was recorded on: `override` (named by `where`), else the source its
    manifest names."""
    source = override or manifest.text.get("source")
    if not source:
        raise ConfigError(f"{golden_dir}: the manifest names no text file; pass --text")
    return read_text_file(source, where if override else f"{golden_dir / MANIFEST}: text.source")


def text_identity(text: str, source: str | None = None) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": len(text), "source": source}


def read_manifest(golden_dir: Path) -> GoldenManifest:
    path = golden_dir / MANIFEST
    if not golden_dir.is_dir():
        raise ConfigError(f"golden directory '{golden_dir}' does not exist; record one: qualgate golden record")
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; record a golden baseline first: qualgate golden record")
    try:
        data = json.loads(read_text(path, "golden manifest"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-record it: {RECORD_HINT}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a JSON object (got {show(data)}); re-record it: {RECORD_HINT}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(
            f"{path}: schema_version {show(data.get('schema_version'))} is not {SCHEMA_VERSION}; "
            f"re-record it: {RECORD_HINT}"
        )
    manifest = validate(GoldenManifest, data, f"{path} (re-record it: {RECORD_HINT})")
    for key, kind in (("path", str), ("dtype", str), ("files", dict)):
        if not isinstance(manifest.model.get(key), kind):
            raise ConfigError(f"{path}: model.{key} is missing or not a {kind.__name__}; re-record it: {RECORD_HINT}")
    if not isinstance(manifest.text.get("sha256"), str):
        raise ConfigError(f"{path}: text.sha256 is missing; re-record it: {RECORD_HINT}")
    return manifest


def identity_mismatches(
    manifest: GoldenManifest, model: ModelSpec, text: str, config: FidelityConfig, text_source: str | None = None
) -> list[str]:
    """What differs between the golden baseline and the comparison about to use it."""
    problems = []
    if manifest.model["dtype"] != model.dtype:
        problems.append(f"baseline dtype {manifest.model['dtype']} -> {model.dtype}")
    stored, current = manifest.model["files"], model.fingerprint()
    for name in sorted(set(stored) | set(current)):
        if stored.get(name) != current.get(name):
            what = "added" if name not in stored else "removed" if name not in current else "changed"
            problems.append(f"model file {name} {what}")
    recorded, now = manifest.text["sha256"], text_identity(text)["sha256"]
    if recorded != now:
        named = f"text {text_source} " if text_source else "text "
        problems.append(f"{named}changed (sha256 {recorded[:12]} -> {now[:12]})")
    for key in IDENTITY_FIELDS:
        if manifest.fidelity.get(key) != getattr(config, key):
            problems.append(f"fidelity.{key} {manifest.fidelity.get(key)} -> {getattr(config, key)}")
    return problems


def load(
    golden_dir: Path, model: ModelSpec, text: str, config: FidelityConfig, text_source: str | None = None
) -> tuple[list[Chunk], TokenScores]:
    """The golden chunks and reference scores, whole in memory, after checking they belong to this
    comparison (open_reference streams them instead)."""
    chunks, reference = open_reference(golden_dir, model, text, config, text_source)
    with reference.rows() as rows:
        return chunks, rows.take(reference.n)


def open_reference(
    golden_dir: Path, model: ModelSpec, text: str, config: FidelityConfig, text_source: str | None = None
) -> tuple[list[Chunk], GoldenReference]:
    """The golden chunks and its reference side (per-token scalars in memory, the [tokens, k] arrays
    read from disk as a comparison walks the text), after checking they belong to this comparison."""
    manifest = read_manifest(golden_dir)
    problems = identity_mismatches(manifest, model, text, config, text_source)
    if problems:
        raise ConfigError(
            f"{golden_dir}: golden baseline does not match: {'; '.join(problems)}; "
            "re-record it with: qualgate golden record"
        )
    path = golden_dir / SCORES
    arrays = check_scores(path, manifest)
    lengths, first = arrays["chunk_lengths"], arrays["chunk_first_scored"]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    flat = arrays["chunk_tokens"].astype(np.int64)
    chunks = [Chunk(flat[bounds[i] : bounds[i + 1]].tolist(), int(first[i])) for i in range(len(lengths))]
    reference = GoldenReference(
        path=path,
        chunk=arrays["chunk"].astype(np.int32),
        target=arrays["target"].astype(np.int64),
        logprob=arrays["logprob"].astype(np.float64),
        tail_mass=arrays["tail_mass"].astype(np.float64),
        block_size=manifest.block_size,
    )
    return chunks, reference


def verify(
    golden_dir: Path,
    session: Session,
    text: str,
    config: FidelityConfig,
    sample_chunks: int = 4,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Re-score a sample of golden chunks with the baseline and report how far the stored numbers drifted."""
    chunks, golden = load(golden_dir, session.stack.model, text, config)
    picks = sorted(
        {round(i * (len(chunks) - 1) / max(1, sample_chunks - 1)) for i in range(min(sample_chunks, len(chunks)))}
    )
    subset = golden.select(np.isin(golden.chunk, picks))
    fresh = score_text(session, [chunks[i] for i in picks], config, reference=subset)
    drift = compare(subset, fresh).summary
    max_abs = float(np.abs(fresh.logprob - subset.logprob).max())
    return {
        "chunks_checked": picks,
        "tokens_checked": subset.n,
        "max_abs_logprob_diff": max_abs,
        "kl_mean": drift["kl_mean"]["value"],
        "same_top1": drift["same_top1"]["value"],
        "tolerance": tolerance,
        "drifted": max_abs > tolerance,
    }
