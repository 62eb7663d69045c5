"""The local run store: every finished unit of work is a JSON record keyed by the full identity of
what produced it (model files, stack, instrument configuration, data). A rerun, or `--resume` after a
crash, reuses every record whose identity matches; nothing is keyed by a name alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from qualgate.code_identity import package_source_hash
from qualgate.errors import ConfigError
from qualgate.fsio import write_failure
from qualgate.run_files import LocalFiles, RunFiles


def identity_key(identity: dict[str, Any]) -> str:
    """The store key of a unit of work: a hash of its identity and of qualgate's own source, so a new
    commit or an edited checkout never reuses a record its old code produced."""
    blob = json.dumps(
        {"qualgate_source": package_source_hash(), **identity}, sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (what `sha256sum` prints), or of a directory: every file under it
    by relative path, size and bytes, so moving a file between subdirectories or shifting bytes from
    one file's end to the next one's name is another directory."""
    if not path.exists():
        raise ConfigError(f"'{path}' does not exist; check the path (relative to the working directory)")
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file():
            data = file.read_bytes()
            digest.update(f"{file.relative_to(path).as_posix()}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


class RunStore:
    """Records, checkpoints and request caches of one run, through its `RunFiles` (the run directory,
    or the driver's run directory from a cluster worker)."""

    def __init__(self, out_dir: Path | None = None, files: RunFiles | None = None) -> None:
        if files is None:
            if out_dir is None:
                raise ValueError("RunStore needs a run directory or its files")
            records = out_dir / "records"
            try:
                records.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise write_failure(records, exc) from None
            files = LocalFiles(out_dir)
        self.files = files

    @property
    def records(self) -> Path:
        """The records directory of a local run."""
        if not isinstance(self.files, LocalFiles):
            raise TypeError("a remote run store has no local records directory")
        return self.files.root / "records"

    def get(self, key: str) -> dict[str, Any] | None:
        data = self.files.read(f"records/{key}.json")
        if data is None:
            return None
        try:
            return json.loads(data)  # type: ignore[no-any-return]
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a torn write from a killed run: redo that unit

    def put(self, key: str, record: dict[str, Any]) -> None:
        # Atomic: a record is either whole or absent; a full disk is exit 3 and the rerun resumes here.
        self.files.write(f"records/{key}.json", json.dumps(record, sort_keys=True).encode("utf-8"))

    def generations(self, key: str) -> JsonCheckpoint:
        return JsonCheckpoint(self.files, f"partial/{key}")

    def requests(self, key: str) -> JsonCheckpoint:
        """Finished model requests (benchmarks), kept across units and reruns: the key is the identity
        of what answers them (a stack's scoring or generation identity), never a name."""
        return JsonCheckpoint(self.files, f"requests/{key}")

    def chunks(self, key: str) -> NpzChunkCheckpoint:
        return NpzChunkCheckpoint(self.files, f"partial/{key}")

    def __len__(self) -> int:
        return len(list(self.records.glob("*.json")))


class NpzChunkCheckpoint:
    """Per-chunk arrays of one unit of work in progress (see fidelity.score_text)."""

    def __init__(self, files: RunFiles, directory: str) -> None:
        self.files = files
        self.directory = directory

    def load(self, index: int) -> dict[str, np.ndarray] | None:
        data = self.files.read(f"{self.directory}/{index:06d}.npz")
        if data is None:
            return None
        try:
            with np.load(io.BytesIO(data)) as arrays:
                return {key: arrays[key] for key in arrays.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None  # torn by a crash (empty or half-written): score the chunk again

    def save(self, index: int, part: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        save: Any = np.savez  # numpy's stub reads **arrays as its allow_pickle flag
        save(buffer, **part)
        self.files.write(f"{self.directory}/{index:06d}.npz", buffer.getvalue())

    def discard(self) -> None:
        self.files.discard(self.directory)


class JsonCheckpoint:
    """Named JSON records of one unit of work in progress (see equivalence.run_equivalence)."""

    def __init__(self, files: RunFiles, directory: str) -> None:
        self.files = files
        self.directory = directory

    def load(self, name: str) -> dict[str, Any] | None:
        data = self.files.read(f"{self.directory}/{name}.json")
        try:
            return json.loads(data) if data is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # torn by a kill: generate it again

    def save(self, name: str, record: dict[str, Any]) -> None:
        self.files.write(f"{self.directory}/{name}.json", json.dumps(record).encode("utf-8"))

    def discard(self) -> None:
        self.files.discard(self.directory)
