"""TurboQuant-style vector quantization of KV vectors (Zandieh et al., arXiv 2504.19874), from its
definition:

1. **Rotate.** Each vector is split into its norm (kept in float16) and its direction, and the direction
   is multiplied by a random orthogonal matrix (seeded, one per layer and KV head). Rotated, every
   coordinate follows the same known distribution whatever the data (see `lloyd_max`).
2. **Scalar codebook.** Each rotated coordinate is replaced by the nearest centroid of the Lloyd-Max
   codebook for that distribution: the MSE stage (rotation plus codebook alone is the PolarQuant-like
   variant). Non-integer bit widths give a fixed share of the rotated coordinates the higher width
   (the paper splits outlier channels before rotating; after a random rotation every coordinate is
   alike, so the split needs no channel statistics).
3. **QJL residual sketch** (optional, keys): the MSE stage's residual r is kept as the signs of S r,
   S a seeded Gaussian matrix, plus its norm in float16; S^T sign(S r) * sqrt(pi/2) / d * |r| is an
   unbiased estimate of r, so inner products with the corrected key are unbiased. The paper's
   product quantizer spends one of the bits on it: `bits` b with QJL is b - 1 bits of codebook plus
   the 1-bit sketch.

Vectors are returned dequantized (what attention reads); `storage_bits` says what a cache that kept
the codes would store per element, metadata included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from qualgate.quant.lloyd_max import codebook

NORM_BITS = 16  # per-vector norms (and the QJL residual norm) in float16


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal [dim, dim] matrix (QR of a Gaussian with the signs fixed), float64."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def gaussian_sketch(dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, dim, generator=gen, dtype=torch.float64)


def split_bits(bits: float, dim: int) -> tuple[int, int, int]:
    """(low, high, n_high): n_high coordinates at `high` bits, the rest at `low`, averaging `bits`."""
    low = math.floor(bits)
    n_high = round((bits - low) * dim)
    if abs(low * dim + n_high - bits * dim) > 1e-9:
        raise ValueError(f"{bits} bits cannot be spread evenly over {dim} coordinates")
    return low, low + (1 if n_high else 0), n_high


def _nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    bounds = (centroids[1:] + centroids[:-1]) / 2
    return centroids[torch.bucketize(values.contiguous(), bounds)]


def qjl_estimate(residual: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """The unbiased 1-bit estimate of `residual` (rows are vectors): only the signs of S r and |r| are
    kept (|r| rounded to float16, as stored)."""
    dim = residual.shape[-1]
    signs = torch.sign(residual @ sketch.T)
    signs[signs == 0] = 1.0
    norm = residual.norm(dim=-1, keepdim=True).to(torch.float16).to(residual.dtype)
    return math.sqrt(math.pi / 2) / dim * norm * (signs @ sketch)


@dataclass(frozen=True)
class TurboQuantCodec:
    """One head's quantizer: `bits` per coordinate on average (with QJL: one of them is the sketch)."""

    dim: int
    bits: float
    qjl: bool
    seed: int

    def __post_init__(self) -> None:
        mse_bits = self.bits - 1 if self.qjl else self.bits
        if mse_bits < 1:
            raise ValueError(f"TurboQuant needs at least 1 codebook bit ({self.bits} bits, qjl={self.qjl})")
        split_bits(mse_bits, self.dim)  # raises when the bits do not spread evenly

    @cached_property
    def rotation(self) -> torch.Tensor:
        return random_rotation(self.dim, self.seed)

    @cached_property
    def sketch(self) -> torch.Tensor:
        return gaussian_sketch(self.dim, self.seed + 1_000_003)

    @cached_property
    def _codebooks(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        low, high, n_high = split_bits(self.bits - 1 if self.qjl else self.bits, self.dim)
        high_book, low_book = (torch.as_tensor(codebook(self.dim, b), dtype=torch.float64) for b in (high, low))
        return high_book, low_book, n_high

    @lru_cache(maxsize=4)  # noqa: B019  # codecs are few and live as long as the process
    def _fixed(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """rotation, high and low codebooks and (with QJL) the sketch on `device`: made on the host, copied
        to a GPU once (the states may live there), not on every cache write."""
        high, low, _ = self._codebooks
        sketch = self.sketch.to(device) if self.qjl else None
        return self.rotation.to(device), high.to(device), low.to(device), sketch

    def quantize_directions(self, unit: torch.Tensor) -> torch.Tensor:
        """The MSE stage on unit vectors (rows): rotate, round each coordinate to its codebook, rotate back."""
        n_high = self._codebooks[2]
        rotation, high, low, _ = self._fixed(unit.device)
        rotated = unit @ rotation.T
        coded = torch.cat([_nearest(rotated[..., :n_high], high), _nearest(rotated[..., n_high:], low)], dim=-1)
        return coded @ rotation

    def round_trip(self, vectors: torch.Tensor) -> torch.Tensor:
        """Quantize and dequantize vectors along the last dimension (float64 inside, input dtype out)."""
        x = vectors.double()
        norm = x.norm(dim=-1, keepdim=True)
        unit = x / torch.where(norm > 0, norm, torch.ones_like(norm))
        approx = self.quantize_directions(unit)
        sketch = self._fixed(unit.device)[3]
        if sketch is not None:
            approx = approx + qjl_estimate(unit - approx, sketch)
        stored_norm = norm.to(torch.float16).double()
        return (approx * stored_norm).to(vectors.dtype)

    def storage_bits(self) -> float:
        """Bits per element a cache keeping the codes stores: codes, the sketch, float16 norms."""
        extra = NORM_BITS * (2 if self.qjl else 1)
        return self.bits + extra / self.dim
