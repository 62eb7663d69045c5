"""Reading a user's YAML file strictly: UTF-8, one value per key, a bounded size once aliases expand.

PyYAML keeps the last of two equal keys silently (a second `kv:` turned an FP8 run into an INT4 one),
and a few hundred bytes of nested aliases expand to billions of values in anything that walks them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from qualgate.errors import ConfigError
from qualgate.fsio import read_text
from qualgate.redact import cap

# A pipeline has a few hundred values; this is orders of magnitude more, and far from a bomb's billions.
MAX_VALUES = 100_000


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"key {cap(repr(key), 60)} appears twice (lines {first} and {line}); keep one")


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; keys written beside it override, by design
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(value: Any, sizes: dict[int, int]) -> int:
    """Values in `value` with every alias expanded, counted once per shared object (memoized)."""
    if not isinstance(value, dict | list):
        return 1
    known = sizes.get(id(value))
    if known is not None:
        return known
    sizes[id(value)] = 1  # a recursive alias counts once, not forever
    items = list(value.values()) + list(value.keys()) if isinstance(value, dict) else value
    size = 1 + sum(_expanded_size(v, sizes) for v in items)
    sizes[id(value)] = size
    return size


def load_yaml(path: Path, what: str) -> Any:
    """The parsed document, or exit 2 naming `path`, the line and the fix."""
    text = read_text(path, what)
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {cap(str(problem), 160)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply; flatten it") from None
    if _expanded_size(data, {}) > MAX_VALUES:
        raise ConfigError(
            f"{path}: expands to more than {MAX_VALUES:,} values once its YAML aliases are resolved; "
            "write the values out instead of nesting aliases"
        )
    return data
