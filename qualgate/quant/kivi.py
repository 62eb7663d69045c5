"""KIVI's asymmetric group quantization (Liu et al., arXiv 2402.02750): keys per channel, values per token.

Keys have a few channels with large magnitudes across tokens, so KIVI quantizes them per channel: a
group is `group` consecutive tokens of one channel, each group with its own minimum and scale. Values
have no such channels and quantize per token, in groups of `group` channels. Scales and minimums are
kept in float16 (counted in `storage_bits`).
"""

from __future__ import annotations

import torch

META_BITS = 32  # a float16 scale and a float16 minimum per group


def _round_trip_groups(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min-max quantization along the last dimension of `groups`."""
    x = groups.float()
    low = x.amin(dim=-1, keepdim=True).to(torch.float16).float()
    high = x.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((high - low) / levels).to(torch.float16).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round((x - low) / safe), 0, levels)
    return (codes * scale + low).to(groups.dtype)


def per_channel(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """Keys [..., tokens, dim] with tokens a whole group: one (min, scale) per channel over the tokens."""
    return _round_trip_groups(keys.transpose(-1, -2), bits).transpose(-1, -2)


def per_token(values: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Values [..., tokens, dim]: one (min, scale) per token and `group` consecutive channels."""
    *lead, dim = values.shape
    if dim % group:
        raise ValueError(f"KIVI value groups of {group} channels do not divide head_dim {dim}")
    grouped = values.reshape(*lead, dim // group, group)
    return _round_trip_groups(grouped, bits).reshape(values.shape)


def storage_bits(bits: int, group: int) -> float:
    """Bits per quantized element, metadata included (the full-precision window is extra)."""
    return bits + META_BITS / group
