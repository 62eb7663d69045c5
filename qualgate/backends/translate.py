"""How an engine applies a layer: one registered translator per (engine, layer class).

A backend supports a layer exactly when a translator for the layer's own class is registered: a
subclass is another method (a plug-in that overrides a draft model's acceptance rule) that the engine
would silently replace with the built-in it derives from, so it needs a translator of its own. A user
adds an engine's flag for a new layer with one registration (docs/extending.md), not an edit of the
backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from qualgate.layers import Layer
from qualgate.stack import Stack

T = TypeVar("T")  # what a translation gives the engine (vLLM: serve flags; llama.cpp: load settings)
Translator = Callable[[Any, Stack, Any], T]  # (layer, stack, backend options) -> settings


class Translators(Generic[T]):
    def __init__(self, engine: str) -> None:
        self.engine = engine
        self._by_class: dict[type[Layer[Any]], Translator[T]] = {}

    def register(self, *layers: type[Layer[Any]]) -> Callable[[Translator[T]], Translator[T]]:
        def decorate(translate: Translator[T]) -> Translator[T]:
            for layer in layers:
                if layer in self._by_class and self._by_class[layer] is not translate:
                    raise ValueError(f"{self.engine} already translates {layer.__name__}")
                self._by_class[layer] = translate
            return translate

        return decorate

    def supports(self, layer: Layer[Any]) -> bool:
        return type(layer) in self._by_class

    def translate(self, stack: Stack, options: Any) -> list[T]:
        """Every layer's settings, in the stack's order (a layer without a translator is a bug: the
        backend's check refused the stack before it was opened)."""
        return [self._by_class[type(layer)](layer, stack, options) for layer in stack.layers]
