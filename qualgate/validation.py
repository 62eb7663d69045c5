"""Turn pydantic validation errors into the one-line messages users get (file, YAML path, fix).

No pydantic internals reach the user: union branches (`literal['auto']`, `list[StackConfig]`) are
dropped from paths and their alternatives merged; an unknown key lists the valid fields of its own
level, not the top level's; echoed input is bounded and secrets are redacted (see redact.py).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from pydantic import BaseModel, ValidationError

from qualgate.errors import ConfigError
from qualgate.redact import cap, show

M = TypeVar("M", bound=BaseModel)
# Path parts pydantic adds for union branches and validators: not keys a user wrote.
_INTERNAL = re.compile(
    r"^(literal|list|dict|set|tuple|union|tagged-union|nullable|function-(after|before|wrap|plain)|chain|"
    r"lax-or-strict|json-or-python|is-instance|definition-ref|constrained-\w+)\[.*\]$"
)
_MAX_PROBLEMS = 5


def _user_path(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    return tuple(part for part in loc if not (isinstance(part, str) and _INTERNAL.match(part)))


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _candidates(annotation: Any) -> list[Any]:
    """The types a value of `annotation` may be (a union's members; Optional's non-None one)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _candidates(arg)]
    if origin is typing.Annotated:
        return _candidates(typing.get_args(annotation)[0])
    return [annotation]


def _step(annotation: Any, part: int | str) -> list[Any]:
    """What `annotation[part]` may be: a model's field, a list's item, a mapping's value."""
    found = []
    for kind in _candidates(annotation):
        origin = typing.get_origin(kind)
        args = typing.get_args(kind)
        if isinstance(kind, type) and issubclass(kind, BaseModel) and isinstance(part, str):
            if part in kind.model_fields:
                found.append(kind.model_fields[part].annotation)
        elif origin in (list, tuple) and isinstance(part, int) and args:
            found.append(args[0])
        elif origin is dict and len(args) == 2:
            found.append(args[1])
    return found


def fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The valid keys of the mapping at `loc` in `model` (empty when it is not a model there)."""
    current: list[Any] = [model]
    for part in loc:
        current = [step for kind in current for step in _step(kind, part)]
    for kind in current:
        for candidate in _candidates(kind):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                return sorted(candidate.model_fields)
    return []


def describe(
    exc: ValidationError, where: str, model: type[BaseModel] | None = None, prefix: tuple[int | str, ...] = ()
) -> str:
    """One line: `where: problem; problem` (at most five, with alternatives of one union merged). `prefix`
    is where `model` sits in the file (`instruments.fidelity`), for the paths the message names."""
    problems: dict[str, str] = {}  # path -> what is wrong there (first error wins for unknown/missing)
    wrong: dict[str, tuple[list[str], str]] = {}  # path -> (messages of each union branch, the input)
    for err in exc.errors():
        loc = _user_path(tuple(err["loc"]))
        path = _field_path((*prefix, *loc))
        field = str(loc[-1]) if loc else ""
        if err["type"] == "extra_forbidden":
            valid = fields_at(model, loc[:-1]) if model is not None else []
            close = difflib.get_close_matches(field, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            hint += f" (valid fields here: {', '.join(valid)})" if valid else ""
            problems.setdefault(path, f"unknown field '{path}'{hint}")
        elif err["type"] == "missing":
            problems.setdefault(path, f"field '{path}' is required")
        else:
            said, _ = wrong.setdefault(path, ([], show(err.get("input"), field)))
            said.append(cap(err["msg"], 120))
    for path, (said, got) in wrong.items():
        # A union's branches each complain: say them once, as alternatives.
        problems.setdefault(path, f"field '{path}': {' or '.join(dict.fromkeys(said))} (got {got})")
    lines = list(problems.values())
    more = f"; and {len(lines) - _MAX_PROBLEMS} more" if len(lines) > _MAX_PROBLEMS else ""
    return f"{where}: " + "; ".join(lines[:_MAX_PROBLEMS]) + more


def validate(model: type[M], data: Mapping[str, Any], where: str, prefix: tuple[int | str, ...] = ()) -> M:
    if not isinstance(data, Mapping):
        at = f"{_field_path(prefix)} " if prefix else ""
        raise ConfigError(f"{where}: {at}must be a mapping of fields (got {show(data)})")
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(describe(exc, where, model, prefix)) from None
