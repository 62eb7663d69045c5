"""Recording a golden: the baseline scored once on the domain text, with the manifest of everything that
determined its numbers (qualgate golden record). Reading and checking one is golden.py."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qualgate.errors import ConfigError
from qualgate.golden import IDENTITY_FIELDS, MANIFEST, SCHEMA_VERSION, SCORES, GoldenManifest, text_identity
from qualgate.instruments.fidelity import FidelityConfig, chunk_text, score_text
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
