"""Golden baseline artifacts: the reference side of fidelity, recorded once and checked on every use.

A golden directory holds `scores.npz` (per scored token: target, logprob, top-k ids and logprobs, tail
mass; plus the chunks' token ids) and `manifest.json` (schema version and the hashes of everything
that determined the numbers). Loading compares the manifest with what the caller is about to compare
against and refuses, naming what changed, when anything differs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from qualgate import __version__
from qualgate.chunking import Chunk
from qualgate.errors import ConfigError
from qualgate.instruments.fidelity import FidelityConfig, TokenScores, chunk_text, compare, score_text
from qualgate.models import ModelSpec

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
        return FidelityConfig.model_validate({"tail_samples": 0, **self.fidelity, **overrides})


def read_text_file(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"text file '{path}' does not exist; pass --text (or fidelity.text) with a UTF-8 file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"text file '{path}' is not UTF-8 ({exc})") from None


def domain_text(golden_dir: Path, manifest: GoldenManifest, override: str | None = None) -> str:
    """The domain text a golden was recorded on: `override`, else the path its manifest names."""
    source = override or manifest.text.get("source")
    if not source:
        raise ConfigError(f"{golden_dir}: the manifest names no text file; pass --text")
    return read_text_file(source)


def text_identity(text: str, source: str | None = None) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": len(text), "source": source}


def _libraries() -> dict[str, str]:
    versions = {"qualgate": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "transformers"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    return versions


def _id_dtype(vocab_size: int) -> type[np.integer[Any]]:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def record(
    session: Session,
    text: str,
    config: FidelityConfig,
    out_dir: Path,
    text_source: str | None = None,
    on_chunk: Any = None,
) -> GoldenManifest:
    """Score the baseline session on the text and write the golden artifacts."""
    if session.stack.layers:
        raise ConfigError(f"golden record: stack '{session.stack.name}' has layers; record the baseline (no layers)")
    chunks = chunk_text(session, text, config)
    scores = score_text(session, chunks, config, on_chunk=on_chunk)
    ids = _id_dtype(session.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = np.concatenate([np.asarray(c.token_ids) for c in chunks]).astype(ids)
    tail: dict[str, np.ndarray] = {}
    if scores.tail_ids is not None and scores.tail_logprobs is not None:
        tail = {"tail_ids": scores.tail_ids.astype(ids), "tail_logprobs": scores.tail_logprobs.astype(np.float32)}
    tmp = out_dir / (SCORES + ".tmp.npz")
    save: Any = np.savez_compressed  # numpy's stub reads **arrays as its allow_pickle flag
    save(
        tmp,
        **tail,
        chunk=scores.chunk.astype(np.int32),
        target=scores.target.astype(ids),
        logprob=scores.logprob.astype(np.float32),
        top_ids=scores.top_ids.astype(ids),
        top_logprobs=scores.top_logprobs.astype(np.float32),
        tail_mass=scores.tail_mass.astype(np.float32),
        chunk_tokens=flat,
        chunk_lengths=np.asarray([len(c.token_ids) for c in chunks], dtype=np.int32),
        chunk_first_scored=np.asarray([c.first_scored for c in chunks], dtype=np.int32),
    )
    tmp.replace(out_dir / SCORES)  # never leave a half-written golden file behind
    size = (out_dir / SCORES).stat().st_size
    manifest = GoldenManifest(
        schema_version=SCHEMA_VERSION,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        model={
            "path": session.stack.model.path,
            "dtype": session.stack.model.dtype,
            "files": session.stack.model.fingerprint(),
        },
        text=text_identity(text, text_source),
        fidelity={key: getattr(config, key) for key in IDENTITY_FIELDS},
        block_size=scores.block_size,
        libraries=_libraries(),
        n_tokens=scores.n,
        n_chunks=len(chunks),
        scores_bytes=size,
        bytes_per_token=size / scores.n,
        ppl=float(np.exp(-scores.logprob.mean())),
        tail_sample_bytes_per_token=_compressed_size(tail) / scores.n if tail else 0.0,
    )
    (out_dir / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return manifest


def _compressed_size(arrays: dict[str, np.ndarray]) -> int:
    buffer = io.BytesIO()
    save: Any = np.savez_compressed
    save(buffer, **arrays)
    return buffer.getbuffer().nbytes


def read_manifest(golden_dir: Path) -> GoldenManifest:
    path = golden_dir / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; record a golden baseline first: qualgate golden record")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-record it") from None
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{path}: schema_version {data.get('schema_version')} is not {SCHEMA_VERSION}; re-record it")
    return GoldenManifest.model_validate(data)


def identity_mismatches(manifest: GoldenManifest, model: ModelSpec, text: str, config: FidelityConfig) -> list[str]:
    """What differs between the golden baseline and the comparison about to use it."""
    problems = []
    if manifest.model["dtype"] != model.dtype:
        problems.append(f"baseline dtype {manifest.model['dtype']} -> {model.dtype}")
    stored, current = manifest.model["files"], model.fingerprint()
    for name in sorted(set(stored) | set(current)):
        if stored.get(name) != current.get(name):
            what = "added" if name not in stored else "removed" if name not in current else "changed"
            problems.append(f"model file {name} {what}")
    if manifest.text["sha256"] != text_identity(text)["sha256"]:
        problems.append(f"text changed (sha256 {manifest.text['sha256'][:12]} -> {text_identity(text)['sha256'][:12]})")
    for key in IDENTITY_FIELDS:
        if manifest.fidelity.get(key) != getattr(config, key):
            problems.append(f"fidelity.{key} {manifest.fidelity.get(key)} -> {getattr(config, key)}")
    return problems


def load(golden_dir: Path, model: ModelSpec, text: str, config: FidelityConfig) -> tuple[list[Chunk], TokenScores]:
    """The golden chunks and reference scores, after checking they belong to this comparison."""
    manifest = read_manifest(golden_dir)
    problems = identity_mismatches(manifest, model, text, config)
    if problems:
        raise ConfigError(
            f"{golden_dir}: golden baseline does not match: {'; '.join(problems)}; "
            "re-record it with: qualgate golden record"
        )
    data = np.load(golden_dir / SCORES)
    lengths, first = data["chunk_lengths"], data["chunk_first_scored"]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    flat = data["chunk_tokens"].astype(np.int64)
    chunks = [Chunk(flat[bounds[i] : bounds[i + 1]].tolist(), int(first[i])) for i in range(len(lengths))]
    scores = TokenScores(
        chunk=data["chunk"].astype(np.int32),
        target=data["target"].astype(np.int64),
        logprob=data["logprob"].astype(np.float64),
        top_ids=data["top_ids"].astype(np.int64),
        top_logprobs=data["top_logprobs"].astype(np.float64),
        tail_mass=data["tail_mass"].astype(np.float64),
        block_size=manifest.block_size,
        tail_ids=data["tail_ids"].astype(np.int64) if "tail_ids" in data.files else None,
        tail_logprobs=data["tail_logprobs"].astype(np.float64) if "tail_logprobs" in data.files else None,
    )
    return chunks, scores


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
    mask = np.isin(golden.chunk, picks)
    subset = TokenScores(
        chunk=golden.chunk[mask],
        target=golden.target[mask],
        logprob=golden.logprob[mask],
        top_ids=golden.top_ids[mask],
        top_logprobs=golden.top_logprobs[mask],
        tail_mass=golden.tail_mass[mask],
        block_size=golden.block_size,
        tail_ids=None if golden.tail_ids is None else golden.tail_ids[mask],
        tail_logprobs=None if golden.tail_logprobs is None else golden.tail_logprobs[mask],
    )
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
