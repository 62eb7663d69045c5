"""A `.npz` written and read row by row, so a golden of any length passes through a fixed amount of memory.

The file is an ordinary compressed npz (`np.load` opens it): one `.npy` member per array. Writing
appends each array's rows to a raw file on disk as they are computed and, at close, streams every raw
file into its compressed member behind a header with the final row count. Reading opens every member
at once and hands out the next rows of each on demand, decompressing as it goes (forward only).
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

_COPY = 1 << 20  # bytes per copy step from a raw file into its compressed member


class NpzWriter:
    """Rows appended per array, then one compressed npz at `path` (written to a temporary name and
    renamed, so a crash never leaves a half-written file under the real name)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parts = path.with_name(path.name + ".parts")
        shutil.rmtree(self.parts, ignore_errors=True)  # left by a crash: its rows belong to no one
        self.parts.mkdir(parents=True)
        self.layout: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
        self.rows: dict[str, int] = {}
        self.handles: dict[str, IO[bytes]] = {}

    def append(self, name: str, rows: np.ndarray) -> None:
        """Rows of array `name`; every call must give the same dtype and the same trailing shape."""
        layout = (rows.dtype, rows.shape[1:])
        if name not in self.layout:
            self.layout[name] = layout
            self.rows[name] = 0
            self.handles[name] = (self.parts / name).open("wb")
        elif self.layout[name] != layout:
            raise ValueError(f"npz member '{name}': rows of {layout} after {self.layout[name]}")
        self.handles[name].write(np.ascontiguousarray(rows).tobytes())
        self.rows[name] += rows.shape[0]

    def close(self) -> dict[str, int]:
        """Write the npz and return each member's compressed size in bytes."""
        for handle in self.handles.values():
            handle.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        sizes = {}
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
            for name, (dtype, tail) in self.layout.items():
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_2_0(member, {**header, "shape": (self.rows[name], *tail)})
                    with (self.parts / name).open("rb") as raw:
                        shutil.copyfileobj(raw, member, _COPY)
                sizes[name] = archive.getinfo(f"{name}.npy").compress_size
        tmp.replace(self.path)
        shutil.rmtree(self.parts, ignore_errors=True)
        return sizes

    def abort(self) -> None:
        for handle in self.handles.values():
            handle.close()
        shutil.rmtree(self.parts, ignore_errors=True)


class NpzReader:
    """Every member of an npz open at once: its shape and dtype from the header, its rows read in order."""

    def __init__(self, path: Path) -> None:
        self.archive = zipfile.ZipFile(path)
        self.members: dict[str, tuple[IO[bytes], np.dtype[Any], tuple[int, ...]]] = {}
        self.position: dict[str, int] = {}
        for info in self.archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            stream = self.archive.open(info)
            version = np.lib.format.read_magic(stream)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(stream)
            if fortran or dtype.hasobject:
                raise ValueError(f"member {info.filename} is not a C-ordered numeric array")
            name = info.filename[: -len(".npy")]
            self.members[name] = (stream, dtype, tuple(shape))
            self.position[name] = 0

    def shape(self, name: str) -> tuple[int, ...]:
        return self.members[name][2]

    def dtype(self, name: str) -> np.dtype[Any]:
        return self.members[name][1]

    def __contains__(self, name: str) -> bool:
        return name in self.members

    def read(self, name: str, count: int | None = None) -> np.ndarray:
        """The next `count` rows of `name` (all that are left when None)."""
        stream, dtype, shape = self.members[name]
        left = shape[0] - self.position[name] if shape else 1
        count = left if count is None else count
        if count > left:
            raise ValueError(f"member {name}: {count} rows asked, {left} left")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        data = stream.read(count * row)
        if len(data) != count * row:
            raise ValueError(f"member {name} is cut short ({len(data)} of {count * row} bytes)")
        self.position[name] += count
        # A copy: frombuffer's array would be read-only and pin the bytes object.
        rows: np.ndarray = np.frombuffer(data, dtype=dtype).reshape((count, *shape[1:]) if shape else ()).copy()
        return rows

    def close(self) -> None:
        for stream, _, _ in self.members.values():
            stream.close()
        self.archive.close()

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
