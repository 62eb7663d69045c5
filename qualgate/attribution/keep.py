"""The quantizer a plan keeps its units at: full precision, or the stack's own quantizer with some
parameters changed (8 bits by default), or another quantizer."""

from __future__ import annotations

from typing import Any

from qualgate.errors import ConfigError

FULL = ("full", "none", "fp", "full-precision")


def keep_spec(keep: str | dict[str, Any] | None, layer_spec: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The kept units' layer ({method, ...params}), or None for full precision.

    `None`: the stack's quantizer at 8 bits when it has `bits`, else full precision; `"full"`: full
    precision; `"bits=8"` or `{bits: 8}`: the stack's quantizer with these changes; a different
    `method` starts from that method's defaults."""
    if keep is None:
        return {**layer_spec, "bits": 8} if "bits" in layer_spec else None
    if isinstance(keep, str):
        if keep.strip().lower() in FULL:
            return None
        from qualgate.cli.fidelity import parse_layer

        keep = parse_layer(keep)
    if "kind" in keep:
        raise ConfigError(f"{where}: give a weight quantizer's parameters (method=..., bits=...), not kind")
    base = {} if "method" in keep and keep["method"] != layer_spec["method"] else dict(layer_spec)
    return {**base, **keep}
