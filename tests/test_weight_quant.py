"""Weight quantization changes exactly the quantized linears, by an amount that grows as bits shrink."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from helpers import mean_kl, same_top1

from qualgate import ConfigError, build_stack, open_session
from qualgate.layers.weight_quant import fake_quantize_groupwise

TARGET = {"path": "bundled:target"}


def _session(layer: dict[str, Any]) -> Any:
    return open_session(build_stack(TARGET, [{"kind": "weight_quant", **layer}]))


def test_groupwise_rtn_uses_at_most_2_to_the_bits_levels_per_group() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 256)
    for bits in (2, 3, 4, 8):
        for symmetric in (True, False):
            quantized = fake_quantize_groupwise(weight, bits, 64, symmetric)
            for group in quantized.reshape(8, 4, 64).reshape(-1, 64):
                assert len(torch.unique(group)) <= 2**bits
            error = (quantized - weight).abs().max()
            step = (weight.abs().max() * 2) / (2**bits - 1)
            assert error <= step / 2 + 1e-6, "round-to-nearest is off by at most half a step"


def test_rtn_hand_computed_case() -> None:
    weight = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    # asymmetric 2-bit: range [-1, 2] -> scale 1, zero point 1; codes round(w) + 1 = [0, 1, 1, 3]
    # (0.5 rounds half to even, to 0), dequantized (code - 1) * 1.
    out = fake_quantize_groupwise(weight, bits=2, group_size=None, symmetric=False)
    assert out.tolist() == [[-1.0, 0.0, 0.0, 2.0]]
    sym = fake_quantize_groupwise(weight, bits=2, group_size=None, symmetric=True)
    # symmetric: scale 2 * 2 / 3, zero point 2; codes clamp(round(w / s) + 2, 0, 3) = [1, 2, 2, 3]
    scale = 4 / 3
    assert torch.allclose(sym, torch.tensor([[-scale, 0.0, 0.0, scale]]))


def test_rtn_touches_only_the_decoder_linears(base_session: Any) -> None:
    with _session({"method": "rtn", "bits": 4, "group_size": 64}) as quantized:
        base = dict(base_session.model.named_parameters())
        changed = {name for name, p in quantized.model.named_parameters() if not torch.equal(p, base[name])}
    linears = {name for name in base if name.endswith(("proj.weight",))}
    assert changed == linears, "embeddings, norms and lm_head stay in full precision"


def test_rtn_error_grows_as_bits_shrink(base_session: Any, domain_ids: list[int]) -> None:
    vocab = base_session.vocab_size
    reference = base_session.score(domain_ids, top_k=vocab)
    kls, top1 = [], []
    for bits in (8, 6, 4, 3, 2):
        with _session({"method": "rtn", "bits": bits, "group_size": 64}) as quantized:
            result = quantized.score(domain_ids, top_k=vocab)
        kls.append(mean_kl(reference, result, vocab))
        top1.append(same_top1(reference, result))
    assert all(a < b for a, b in itertools.pairwise(kls)), kls
    assert kls[0] < 1e-3 and kls[-1] > 0.1, kls
    assert top1[0] > 0.97 and top1[-1] < top1[0], top1


def test_quanto_uses_its_own_kernels_and_degrades_with_bits(base_session: Any, domain_ids: list[int]) -> None:
    from optimum.quanto import QLinear

    vocab = base_session.vocab_size
    reference = base_session.score(domain_ids, top_k=vocab)
    kls = []
    for weights in ("int8", "int4", "int2"):
        with _session({"method": "quanto", "weights": weights}) as quantized:
            assert isinstance(quantized.model.model.layers[0].mlp.down_proj, QLinear)
            assert not isinstance(quantized.model.lm_head, QLinear)
            kls.append(mean_kl(reference, quantized.score(domain_ids, top_k=vocab), vocab))
    assert 0 < kls[0] < kls[1] < kls[2], kls


def test_torchao_int8_weight_only(base_session: Any, domain_ids: list[int]) -> None:
    with _session({"method": "torchao", "bits": 8}) as quantized:
        weight = quantized.model.model.layers[0].self_attn.q_proj.weight
        assert "torchao" in type(weight).__module__
        diff = np.abs(quantized.score(domain_ids, top_k=1).logprobs - base_session.score(domain_ids, top_k=1).logprobs)
    assert 0 < diff.mean() < 0.01


def test_torchao_int4_grouped_is_worse_than_int8(base_session: Any, domain_ids: list[int]) -> None:
    vocab = base_session.vocab_size
    reference = base_session.score(domain_ids, top_k=vocab)
    with (
        _session({"method": "torchao", "bits": 8}) as int8,
        _session({"method": "torchao", "bits": 4, "group_size": 64}) as int4,
    ):
        assert mean_kl(reference, int8.score(domain_ids, top_k=vocab), vocab) < mean_kl(
            reference, int4.score(domain_ids, top_k=vocab), vocab
        )


def test_group_size_must_divide_every_quantized_width() -> None:
    with pytest.raises(ConfigError, match="group_size 96 does not divide"):
        _session({"method": "rtn", "bits": 4, "group_size": 96})


def test_include_lm_head_unties_and_quantizes_it(base_session: Any) -> None:
    with _session({"method": "rtn", "bits": 4, "group_size": 64, "include_lm_head": True}) as quantized:
        assert not torch.equal(quantized.model.lm_head.weight, base_session.model.lm_head.weight)
        assert torch.equal(quantized.model.model.embed_tokens.weight, base_session.model.model.embed_tokens.weight)
