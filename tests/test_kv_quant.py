"""KV-cache quantization acts through the cache only, and more so as bits shrink."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import mean_kl

from qualgate import ConfigError, build_stack, open_session

TARGET = {"path": "bundled:target"}
BLOCK = 16


def _session(layer: dict[str, Any]) -> Any:
    return open_session(build_stack(TARGET, [{"kind": "kv_quant", **layer}]))


def test_kv_layers_leave_the_weights_alone(base_session: Any) -> None:
    with _session({"method": "quanto", "bits": 2}) as kv:
        for (name, p), (_, q) in zip(base_session.model.named_parameters(), kv.model.named_parameters(), strict=True):
            assert torch.equal(p, q), name


def test_a_single_forward_pass_is_refused(domain_ids: list[int]) -> None:
    with _session({"method": "fp8"}) as kv, pytest.raises(ConfigError, match="single forward pass never reads"):
        kv.score(domain_ids)


def test_fp8_cache_rounds_every_stored_value_to_fp8() -> None:
    with _session({"method": "fp8"}) as kv:
        cache = kv.new_cache()
        kv._forward(kv.encode("The for statement is used to iterate"), cache)
        keys = cache.layers[0].keys
        assert torch.equal(keys, keys.to(torch.float8_e4m3fn).float()), "stored keys are exactly FP8 values"
        assert len(torch.unique(keys)) <= 256


def test_quanto_cache_quantizes_beyond_the_residual_window(domain_ids: list[int]) -> None:
    with _session({"method": "quanto", "bits": 4, "residual_length": 32}) as kv:
        cache = kv.new_cache()
        for i in range(0, 7 * BLOCK, BLOCK):
            kv._forward(domain_ids[i : i + BLOCK], cache)
        layer = cache.layers[0]
        assert layer.get_seq_length() == 7 * BLOCK
        residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0  # flushed: an empty 1-d tensor
        assert layer._quantized_keys is not None and residual < 32, "old tokens live quantized"


def test_kv_error_grows_as_bits_shrink_and_only_through_the_cache(base_session: Any, domain_ids: list[int]) -> None:
    vocab = base_session.vocab_size
    reference = base_session.score(domain_ids, top_k=vocab, block_size=BLOCK)
    kl = {}
    for name, layer in {
        "fp8-e4m3": {"method": "fp8"},
        "fp8-e5m2": {"method": "fp8", "format": "e5m2"},
        "int4": {"method": "quanto", "bits": 4, "residual_length": 16},
        "int2": {"method": "quanto", "bits": 2, "residual_length": 16},
    }.items():
        with _session(layer) as kv:
            kl[name] = mean_kl(reference, kv.score(domain_ids, top_k=vocab, block_size=BLOCK), vocab)
    noise = mean_kl(reference, base_session.score(domain_ids, top_k=vocab, block_size=1), vocab)
    assert noise < 1e-8, "block size alone changes nothing beyond float noise"
    assert noise < kl["fp8-e4m3"] < kl["fp8-e5m2"], kl  # e5m2 keeps one mantissa bit fewer
    assert noise < kl["int4"] < kl["int2"], kl
    assert kl["int2"] > 0.02, kl


def test_quantized_cache_changes_generation(base_generations: list[Any], general_prompts: list[str]) -> None:
    with _session({"method": "quanto", "bits": 2, "residual_length": 8}) as kv:
        generations = kv.generate(general_prompts, max_new_tokens=32)
    changed = sum(a.token_ids != b.token_ids for a, b in zip(base_generations, generations, strict=True))
    assert changed >= 1, "a 2-bit KV cache must show up in greedy decoding"
