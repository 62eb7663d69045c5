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
# A field named like a credential: api_key, client_secret, password, hf_token, access_token, ... but not
# per_token, max_tokens or tokenizer.json: the name's last word decides.
_SECRET_WORDS = {"key", "apikey", "secret", "password", "passwd", "credential", "credentials", "authorization"}
_TOKEN = re.compile(r"(?i)^((access|auth|bearer|hf|api|refresh|session|id|github|gh)[_-]?)?token$")


def is_secret(name: str) -> bool:
    words = [w for w in re.split(r"[_\-.\s]+", name.lower()) if w]
    return bool(words) and (words[-1] in _SECRET_WORDS or bool(_TOKEN.match(name)))


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


def _pruned(value: Any, level: int) -> Any:
    """`value` redacted, cut to what the bounded repr shows (never walks an alias bomb whole)."""
    if level <= 0:
        return ...
    if isinstance(value, Mapping):
        items = list(value.items())[: _REPR.maxdict + 1]
        return {k: REDACTED if isinstance(k, str) and is_secret(k) else _pruned(v, level - 1) for k, v in items}
    if isinstance(value, list | tuple):
        return [_pruned(v, level - 1) for v in value[: _REPR.maxlist + 1]]
    return value


def show(value: Any, field: str = "") -> str:
    """`value` as a message may echo it: redacted when `field` (or a key inside it) names a secret, bounded
    in depth and items, and at most ECHO_LIMIT characters."""
    if field and is_secret(field):
        return REDACTED
    return cap(_REPR.repr(_pruned(value, _REPR.maxlevel + 1)))


def cap(text: str, limit: int = ECHO_LIMIT) -> str:
    text = " ".join(text.split("\n"))
    return text if len(text) <= limit else text[: limit - 3] + "..."
