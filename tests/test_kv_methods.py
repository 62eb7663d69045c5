"""The deployed low-bit KV methods, checked against their definitions: TurboQuant's rotation, codebook and
QJL sketch (arXiv 2504.19874), KIVI's per-channel keys and per-token values (arXiv 2402.02750), then
the caches they make inside the bundled model."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from helpers import mean_kl

from qualgate import ConfigError, build_stack, open_session
from qualgate.quant import kivi
from qualgate.quant.lloyd_max import codebook, coordinate_density, expected_mse
from qualgate.quant.turboquant import TurboQuantCodec, gaussian_sketch, qjl_estimate, random_rotation

TARGET = {"path": "bundled:target"}


def _unit(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


# -- building blocks ----------------------------------------------------------------------------------
def test_rotation_is_orthogonal_and_preserves_inner_products() -> None:
    rotation = random_rotation(64, seed=3)
    assert torch.allclose(rotation @ rotation.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    x, y = _unit(2, 64).unbind(0)
    assert float((rotation @ x) @ (rotation @ y)) == pytest.approx(float(x @ y), abs=1e-12)
    assert not torch.equal(random_rotation(64, seed=3), random_rotation(64, seed=4)), "seeded per head"
    assert torch.equal(random_rotation(64, seed=3), rotation), "and reproducible"


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_beats_the_best_uniform_quantizer_at_equal_bits(bits: int) -> None:
    dim = 128
    lloyd = expected_mse(dim, codebook(dim, bits))
    x, w = coordinate_density(dim)
    spread = math.sqrt(float(np.sum(w * x**2)))  # 1/sqrt(d)
    levels = 1 << bits

    def uniform(span: float) -> float:  # `levels` evenly spaced points on [-span, span]
        return expected_mse(dim, np.linspace(-span, span, levels))

    best_uniform = min(uniform(k * spread) for k in np.linspace(0.2, 6, 300))
    assert lloyd <= best_uniform + 1e-15 and (bits == 1 or lloyd < 0.99 * best_uniform), (lloyd, best_uniform)


def test_turboquant_distortion_matches_the_papers_figures() -> None:
    """Theorem 1's MSE for unit vectors at b = 1..4 bits: about 0.36, 0.117, 0.03, 0.009."""
    x = _unit(3000, 128)
    paper = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
    measured = {b: float(((TurboQuantCodec(128, b, False, 1).round_trip(x) - x) ** 2).sum(-1).mean()) for b in paper}
    for b, value in paper.items():
        assert measured[b] == pytest.approx(value, rel=0.15), measured
    half = float(((TurboQuantCodec(128, 2.5, False, 1).round_trip(x) - x) ** 2).sum(-1).mean())
    assert measured[3] < half < measured[2], "2.5 bits sits between 2 and 3"


def test_qjl_estimate_is_unbiased_over_seeds_and_the_mse_stage_is_not() -> None:
    dim, seeds = 64, 600
    r, y = _unit(2, dim, seed=5).unbind(0)
    r = 0.3 * r + 0.2 * y  # correlated with the query, so a bias would show
    errors = np.array(
        [float(y @ qjl_estimate(r.unsqueeze(0), gaussian_sketch(dim, s))[0] - y @ r) for s in range(seeds)]
    )
    assert abs(errors.mean()) < 4 * errors.std(ddof=1) / math.sqrt(seeds), errors.mean()
    # The 1-bit MSE stage shrinks inner products by 2/pi on average (the paper's reason for QJL).
    x = _unit(1, dim, seed=6)[0]
    y = x + 0.5 * _unit(1, dim, seed=7)[0]
    ratios = [
        float(y @ TurboQuantCodec(dim, 1, False, s).round_trip(x.unsqueeze(0))[0]) / float(y @ x) for s in range(200)
    ]
    assert np.mean(ratios) == pytest.approx(2 / math.pi, rel=0.08)
    corrected = [
        float(y @ TurboQuantCodec(dim, 2, True, s).round_trip(x.unsqueeze(0))[0]) / float(y @ x) for s in range(400)
    ]
    assert np.mean(corrected) == pytest.approx(1.0, abs=4 * np.std(corrected) / math.sqrt(400) + 1e-3)


def test_storage_bits_count_the_metadata() -> None:
    assert TurboQuantCodec(32, 3, False, 0).storage_bits() == 3 + 16 / 32  # a float16 norm per vector
    assert TurboQuantCodec(32, 3, True, 0).storage_bits() == 3 + 32 / 32  # plus the residual's norm
    assert kivi.storage_bits(2, 32) == 2 + 32 / 32  # a float16 scale and minimum per group of 32
    with pytest.raises(ValueError, match="at least 1 codebook bit"):
        TurboQuantCodec(32, 1.5, True, 0)
    with pytest.raises(ValueError, match="cannot be spread evenly"):
        TurboQuantCodec(6, 2.25, False, 0)


def test_kivi_keys_per_channel_values_per_token() -> None:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 32, 16, generator=gen)
    keys[..., 3] *= 50  # an outlier channel, as keys have
    per_channel = kivi.per_channel(keys, 2)
    for channel in range(16):
        assert len(torch.unique(per_channel[0, 0, :, channel])) <= 4, "2 bits: 4 levels per channel"
    err = (per_channel - keys).abs()
    assert err[..., :3].max() < 0.5 * keys[..., :3].abs().max(), "the outlier channel does not widen the others"
    per_token = kivi.per_token(keys, 2, group=16)
    assert all(len(torch.unique(per_token[0, 0, t])) <= 4 for t in range(32))
    assert (per_token - keys)[..., :3].abs().mean() > 3 * err[..., :3].mean(), "per token, the outlier costs all"
    with pytest.raises(ValueError, match="do not divide head_dim"):
        kivi.per_token(keys, 2, group=5)


# -- inside the model -----------------------------------------------------------------------------------
def _session(**layer: Any) -> Any:
    return open_session(build_stack(TARGET, [{"kind": "kv_quant", **layer}]))


def test_kivi_cache_keeps_the_window_and_quantizes_whole_groups(domain_ids: list[int]) -> None:
    with _session(method="kivi", bits=2, group_size=16, residual_length=24) as kv:
        cache = kv.new_cache()
        for start in range(0, 70, 7):  # uneven arrivals: groups form at the same positions anyway
            kv._forward(domain_ids[start : start + 7], cache)
        layer = cache.layers[0]
        assert layer.get_seq_length() == 70 and layer.n_quantized == 32, "70 - 24 = 46 old tokens: 2 groups"
        fresh = kv.new_cache()
        kv._forward(domain_ids[:70], fresh)
        # The same groups whatever the arrival (the raw keys differ only by float noise between shapes).
        assert fresh.layers[0].n_quantized == 32
        assert ((fresh.layers[0].keys - layer.keys).abs() > 1e-3).float().mean() < 0.01
        layer.crop(-50)
        assert layer.get_seq_length() == 20 and layer.n_quantized == 20


def test_kv_methods_lose_more_as_bits_shrink(base_session: Any, domain_ids: list[int]) -> None:
    vocab = base_session.vocab_size
    reference = base_session.score(domain_ids, top_k=vocab, block_size=16)
    kl = {}
    for name, layer in {
        "tq4": {"method": "turboquant", "bits": 4},
        "tq3": {"method": "turboquant", "bits": 3},
        "tq2": {"method": "turboquant", "bits": 2},
        "kivi4": {"method": "kivi", "bits": 4, "residual_length": 16},
        "kivi2": {"method": "kivi", "bits": 2, "residual_length": 16},
    }.items():
        with _session(**layer) as kv:
            kl[name] = mean_kl(reference, kv.score(domain_ids, top_k=vocab, block_size=16), vocab)
    assert 0 < kl["tq4"] < kl["tq3"] < kl["tq2"], kl
    assert 0 < kl["kivi4"] < kl["kivi2"], kl


def test_bad_kv_method_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="group_size 24 does not divide the model's head_dim 32"):
        _session(method="kivi", group_size=24)
    with pytest.raises(ConfigError, match=r"multiple of 0\.5"):
        build_stack(TARGET, [{"kind": "kv_quant", "method": "turboquant", "bits": 2.7}])
