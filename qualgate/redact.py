"""What a message may echo of a user's input: capped, and with anything that looks like a secret hidden.

Error messages end up in CI logs; a 940-byte YAML alias bomb once expanded into a 312 MB "one-line"
message, and an endpoint's `api_key` was printed whole. Every echo of input goes through `show`.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping
from typing import Any

ECHO_LIMIT = 200
REDACTED = "<redacted>"
# A field named like a credential: api_key, token, hf_token, secret, password, authorization, ...
SECRET_NAME = re.compile(r"(?i)(key|token|secret|passw|credential|auth)")
# Fields that match SECRET_NAME but hold no secret: the *name* of the variable that holds one.
_NOT_SECRET = re.compile(r"(?i)(_env|_var|_file|_path|^max_|tokens$|top_k)")


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name)) and not _NOT_SECRET.search(name)


def redact(value: Any) -> Any:
    """A copy of `value` with every secret-named mapping entry replaced (recursively)."""
    if isinstance(value, Mapping):
        return {k: REDACTED if isinstance(k, str) and is_secret(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


class _Bounded(reprlib.Repr):
    """A repr that never walks more than a few levels and items: shared YAML aliases stay small."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = 6
        self.maxstring = 120
        self.maxother = 120


_REPR = _Bounded()


def show(value: Any, field: str = "") -> str:
    """`value` as a message may echo it: redacted when `field` (or a key inside it) names a secret, bounded
    in depth and items, and at most ECHO_LIMIT characters."""
    if field and is_secret(field):
        return REDACTED
    if isinstance(value, Mapping | list | tuple):
        value = redact(value)
    return cap(_REPR.repr(value))


def cap(text: str, limit: int = ECHO_LIMIT) -> str:
    text = " ".join(text.split("\n"))
    return text if len(text) <= limit else text[: limit - 3] + "..."
