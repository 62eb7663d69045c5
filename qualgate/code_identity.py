"""The code that produced a record is part of its identity.

A record is reused only when everything that could change its numbers is the same: the data, the
configuration and the code. Version strings do not change with every commit or with an edited
checkout, and a plug-in subclass can share a built-in's method name and parameters; so records carry
a content hash of qualgate's own source and, for every layer and backend, the import path of its
class and a hash of the source of each module its class hierarchy is defined in.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def package_source_hash() -> str:
    """sha256 over every Python source file of the installed qualgate package (paths and bytes).

    Computed once per process: the package is imported once, so a change on disk after import is not
    the code that runs anyway."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _module_source_hash(module_name: str) -> str | None:
    module = sys.modules.get(module_name)
    try:
        source = inspect.getsourcefile(module) if module is not None else None
    except TypeError:  # a built-in module has no source file
        source = None
    if source is None or not Path(source).is_file():
        return None
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()


def class_identity(cls: type[Any]) -> dict[str, Any]:
    """The import path of `cls` and a hash of the source of every module defining a class of its MRO.

    Modules inside qualgate are covered by `package_source_hash`; they are listed too so that a
    record names the code it came from. Read from disk at every call: a user editing a plug-in
    module between two runs of one process (a notebook, a test) must not reuse stale records."""
    modules: dict[str, str | None] = {}
    for klass in cls.__mro__:
        name = klass.__module__
        if name in ("builtins", "abc", "typing") or name in modules:
            continue
        modules[name] = _module_source_hash(name)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "sources": modules}
