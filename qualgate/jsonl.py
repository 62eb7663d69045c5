"""Prompt-set files: JSONL with one object per line, read with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qualgate.errors import ConfigError
from qualgate.fsio import read_text
from qualgate.redact import show


def prompt_id(path: Path, number: int, row: dict[str, Any]) -> str:
    """A prompt's id: its own, else the file's stem and its line number."""
    return str(row.get("id", f"{path.stem}-{number}"))


def read_prompt_rows(path: Path, what: str = "prompt set") -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; each object needs a non-empty string 'prompt',
    and ids (given or the line's default) must be unique: results are keyed and resumed by them."""
    rows = []
    ids: dict[str, int] = {}
    for number, line in enumerate(read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{path}:{number}: each line needs a string field 'prompt' (and an 'id')")
        if not row["prompt"].strip():
            raise ConfigError(f"{path}:{number}: 'prompt' is empty; give it text or delete the line")
        if "id" in row and not isinstance(row["id"], str | int):
            raise ConfigError(f"{path}:{number}: 'id' must be a string (got {show(row['id'])})")
        name = prompt_id(path, number, row)
        if name in ids:
            raise ConfigError(f"{path}:{number}: id '{name}' is also on line {ids[name]}; ids must be unique")
        ids[name] = number
        rows.append((number, row))
    if not rows:
        raise ConfigError(f"{what} '{path}' is empty; give it one JSON object per line")
    return rows
