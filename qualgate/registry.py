"""Named registries for layers, backends and instruments, with did-you-mean errors.

Built-in entries register with the same decorator plug-ins use; a plug-in can also be named by a
trusted "module:attr" path, which is imported on demand.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from qualgate.errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    return "choose one of: " + ", ".join(sorted(choices)) if choices else "none are registered"


def import_object(path: str, what: str) -> object:
    """Import "package.module:attr". Only for paths the user wrote in their own configuration."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} '{path}' is not a plug-in path: write it as 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} '{path}': cannot import module '{module_name}' ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(
            f"{what} '{path}': module '{module_name}' has no attribute '{attr}'; {did_you_mean(attr, names)}"
        ) from None


class Registry(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.what} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        if ":" in name:
            return import_object(name, self.what)  # type: ignore[return-value]
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.what} '{name}'; {did_you_mean(name, list(self._entries))}") from None

    def entries(self) -> list[tuple[str, T]]:
        """(name, entry) in registration order."""
        return list(self._entries.items())

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
