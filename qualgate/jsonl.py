"""Prompt-set files: JSONL with one object per line, read with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qualgate.errors import ConfigError


def read_prompt_rows(path: Path, what: str = "prompt set") -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; each object needs a string 'prompt'."""
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{path}:{number}: each line needs a string field 'prompt' (and an 'id')")
        rows.append((number, row))
    if not rows:
        raise ConfigError(f"{what} '{path}' is empty")
    return rows
