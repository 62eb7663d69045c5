"""Recording a golden: the baseline scored once on the domain text, with the manifest of everything that
determined its numbers (qualgate golden record). Reading and checking one is golden.py."""

from __future__ import annotations

import contextlib
import datetime as dt
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qualgate.errors import ConfigError
from qualgate.golden import IDENTITY_FIELDS, MANIFEST, SCHEMA_VERSION, SCORES, GoldenManifest, text_identity
from qualgate.instruments.fidelity import FidelityConfig, chunk_text
from qualgate.instruments.fidelity.scores import iter_scores
from qualgate.npz_stream import NpzWriter
from qualgate.version import __version__

if TYPE_CHECKING:
    from qualgate.backends.base import Session


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
    ids = _id_dtype(session.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Each chunk's rows go to disk as soon as they are scored: memory stays flat whatever the text's length.
    writer = NpzWriter(out_dir / SCORES)
    n_tokens, nll, block_size = 0, 0.0, None
    try:
        for scored in iter_scores(session, chunks, config, on_chunk=on_chunk):
            part, chunk = scored.scores, chunks[scored.index]
            writer.append("chunk", part.chunk.astype(np.int32))
            writer.append("target", part.target.astype(ids))
            writer.append("logprob", part.logprob.astype(np.float32))
            writer.append("top_ids", part.top_ids.astype(ids))
            writer.append("top_logprobs", part.top_logprobs.astype(np.float32))
            writer.append("tail_mass", part.tail_mass.astype(np.float32))
            if part.tail_ids is not None and part.tail_logprobs is not None:
                writer.append("tail_ids", part.tail_ids.astype(ids))
                writer.append("tail_logprobs", part.tail_logprobs.astype(np.float32))
            writer.append("chunk_tokens", np.asarray(chunk.token_ids).astype(ids))
            n_tokens += part.n
            nll -= float(part.logprob.astype(np.float64).sum())
            block_size = part.block_size
        writer.append("chunk_lengths", np.asarray([len(c.token_ids) for c in chunks], dtype=np.int32))
        writer.append("chunk_first_scored", np.asarray([c.first_scored for c in chunks], dtype=np.int32))
        members = writer.close()
    except BaseException:
        writer.abort()
        raise
    size = (out_dir / SCORES).stat().st_size
    tail_bytes = members.get("tail_ids", 0) + members.get("tail_logprobs", 0)
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
        block_size=block_size,
        libraries=_libraries(),
        n_tokens=n_tokens,
        n_chunks=len(chunks),
        scores_bytes=size,
        bytes_per_token=size / n_tokens,
        ppl=float(np.exp(nll / n_tokens)),
        tail_sample_bytes_per_token=tail_bytes / n_tokens,
    )
    (out_dir / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return manifest
