"""A golden's scores.npz: checked against its manifest without holding the [tokens, k] arrays, and its
reference side streamed from disk a chunk's rows at a time (GoldenReference.rows)."""

from __future__ import annotations

import contextlib
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qualgate.errors import ConfigError
from qualgate.instruments.fidelity.token_scores import TokenScores
from qualgate.npz_stream import NpzReader
from qualgate.redact import cap

if TYPE_CHECKING:
    from qualgate.golden import GoldenManifest

PER_TOKEN = ("chunk", "target", "logprob", "tail_mass")
PER_TOKEN_K = ("top_ids", "top_logprobs")
TAIL_SAMPLE = ("tail_ids", "tail_logprobs")
PER_CHUNK = ("chunk_lengths", "chunk_first_scored")
RECORD_HINT = "qualgate golden record"


@dataclass(frozen=True)
class GoldenReference:
    """A golden's reference side: the per-token scalars (a few bytes a token) in memory, the [tokens, k]
    arrays (hundreds of bytes a token) streamed from scores.npz by rows() as a comparison walks the text."""

    path: Path
    chunk: np.ndarray
    target: np.ndarray
    logprob: np.ndarray
    tail_mass: np.ndarray
    block_size: int | None

    @property
    def n(self) -> int:
        return int(self.target.size)

    @contextlib.contextmanager
    def rows(self) -> Iterator[GoldenRows]:
        try:
            reader = NpzReader(self.path)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise _unreadable(self.path, exc) from None
        try:
            yield GoldenRows(self, reader)
        finally:
            reader.close()


class GoldenRows:
    """ReferenceRows over a golden: the next positions' scores, their [count, k] arrays read from disk.
    The arrays keep their stored types (uint16 or int32 ids, float32 logprobs: what the engine computed)
    and are widened block by block where used."""

    def __init__(self, reference: GoldenReference, reader: NpzReader) -> None:
        self.reference = reference
        self.reader = reader
        self.cursor = 0

    @property
    def n(self) -> int:
        return self.reference.n

    def take(self, count: int) -> TokenScores:
        ref, rows = self.reference, slice(self.cursor, self.cursor + count)
        names = (*PER_TOKEN_K, *(name for name in TAIL_SAMPLE if name in self.reader))
        try:
            wide: dict[str, Any] = {name: self.reader.read(name, count) for name in names}
        except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
            raise _unreadable(ref.path, exc) from None
        self.cursor += count
        return TokenScores(
            chunk=ref.chunk[rows],
            target=ref.target[rows],
            logprob=ref.logprob[rows],
            tail_mass=ref.tail_mass[rows],
            block_size=ref.block_size,
            **wide,
        )


def _unreadable(path: Path, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"{path} is unreadable ({exc.__class__.__name__}: {cap(str(exc), 120)}); re-record it: {RECORD_HINT}"
    )


def check_scores(path: Path, manifest: GoldenManifest) -> dict[str, np.ndarray]:
    """scores.npz checked against the manifest without holding its [tokens, k] arrays: every member's
    checksum verified by decompressing it in pieces, their shapes read from the headers. Returns the
    per-token scalars and the chunk arrays (exit 2 naming the file when it is missing, cut short,
    corrupt, or holds arrays of the wrong shape)."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; re-record the golden: {RECORD_HINT}")
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()  # reads every member through its CRC, a megabyte at a time
        if broken is not None:
            raise ValueError(f"member {broken} fails its checksum")
        with NpzReader(path) as reader:
            problems = [
                f"array '{name}' is missing"
                for name in (*PER_TOKEN, *PER_TOKEN_K, *PER_CHUNK, "chunk_tokens")
                if name not in reader
            ]
            shapes = {name: reader.shape(name) for name in (*PER_TOKEN_K, *TAIL_SAMPLE) if name in reader}
            small = (*PER_TOKEN, *PER_CHUNK, "chunk_tokens")
            arrays = {} if problems else {name: reader.read(name) for name in small}
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise _unreadable(path, exc) from None
    if not problems:
        n, k = manifest.n_tokens, manifest.fidelity.get("top_k")
        for name in PER_TOKEN:
            if arrays[name].shape[:1] != (n,):
                problems.append(f"'{name}' has {arrays[name].shape[:1]} rows, the manifest {n} tokens")
        for name in PER_TOKEN_K:
            if len(shapes[name]) != 2 or shapes[name][0] != n or (k is not None and shapes[name][1] != k):
                problems.append(f"'{name}' has shape {shapes[name]}, not ({n}, top_k={k})")
        for name in PER_CHUNK:
            if arrays[name].shape != (manifest.n_chunks,):
                problems.append(f"'{name}' has shape {arrays[name].shape}, the manifest {manifest.n_chunks} chunks")
        samples = manifest.fidelity.get("tail_samples") or 0
        for name in TAIL_SAMPLE:
            if samples and shapes.get(name) != (n, samples):
                problems.append(f"'{name}' is {shapes.get(name, 'missing')}, not ({n}, tail_samples={samples})")
        if not problems and int(arrays["chunk_lengths"].sum()) != arrays["chunk_tokens"].shape[0]:
            problems.append("chunk_lengths do not add up to chunk_tokens")
        if not problems and not np.isfinite(arrays["logprob"]).all():
            problems.append("'logprob' holds non-finite values")
    if problems:
        raise ConfigError(f"{path}: {'; '.join(problems[:3])}; re-record it: {RECORD_HINT}")
    return arrays
