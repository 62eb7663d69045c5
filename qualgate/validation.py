"""Turn pydantic validation errors into the one-line messages users get (file, field, fix)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from qualgate.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def describe(exc: ValidationError, where: str, valid_fields: list[str] | None = None) -> str:
    problems = []
    for err in exc.errors():
        path = _field_path(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            hint = f"; valid fields: {', '.join(valid_fields)}" if valid_fields else ""
            problems.append(f"unknown field '{path}'{hint}")
        elif err["type"] == "missing":
            problems.append(f"field '{path}' is required")
        else:
            problems.append(f"field '{path}': {err['msg']} (got {err.get('input')!r})")
    return f"{where}: " + "; ".join(problems)


def validate(model: type[M], data: Mapping[str, Any], where: str) -> M:
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(describe(exc, where, sorted(model.model_fields))) from None
