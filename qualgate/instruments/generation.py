"""Generation-time layers (speculation, prefix caching): they change how tokens are produced, never the
teacher-forced distribution. Fidelity measures a stack without them; equivalence checks them against it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qualgate.errors import ConfigError
from qualgate.layers import LayerKind

if TYPE_CHECKING:
    from qualgate.stack import Stack

GENERATION_KINDS: tuple[LayerKind, ...] = ("speculation", "prefix_cache")


def without_generation_layers(stack: Stack) -> Stack:
    for kind in GENERATION_KINDS:
        stack = stack.without(kind)
    return stack


def reference_stack(stack: Stack) -> Stack:
    """The same stack without its generation-time layers (speculation, prefix caching).

    These kinds do not change the teacher-forced distribution, so fidelity cannot see them; the
    reference of their equivalence check keeps every other layer (the quantizers), so that their
    effect is not blamed on speculation. A lossy method of these kinds (typical acceptance) is
    checked the same way and is expected to fail."""
    reference = without_generation_layers(stack)
    if not any(layer.kind in GENERATION_KINDS for layer in stack.layers):
        raise ConfigError(f"stack '{stack.name}' has no speculation or prefix_cache layer to check for equivalence")
    return reference
