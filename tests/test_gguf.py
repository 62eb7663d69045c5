"""The GGUF converter: llama.cpp (llama-cpp-python, in process) reads the converted bundled model and
tokenizes and scores held-out text as transformers does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import engine_threads

from qualgate.errors import ConfigError
from qualgate.fixtures import bundled_model_path


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI installs gguf and llama-cpp-python (make install)")
        pytest.skip("llama-cpp-python is not installed (pip install 'qualgate[llamacpp]')")
    from qualgate.engines.gguf_convert import convert

    return convert(bundled_model_path("target"), tmp_path_factory.mktemp("gguf") / "target-f32.gguf")


@pytest.mark.slow
def test_llama_cpp_tokenizes_and_scores_as_transformers(gguf_path: Path, base_session: Any, domain_text: str) -> None:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf_path), n_ctx=512, logits_all=True, verbose=False, n_threads=engine_threads(), seed=0
    )
    text = domain_text[:20000]
    ids = base_session.encode(text)
    assert llm.tokenize(text.encode(), add_bos=True) == ids, "the same tokens, BOS included"
    window = ids[:384]
    ours = base_session.score(window, top_k=1).logprobs
    llm.reset()
    llm.eval(window[:-1])
    logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    theirs = logprobs[np.arange(len(window) - 1), window[1:]]
    # Measured: max 1.9e-3 nats per token (llama.cpp's CPU kernels vs torch, both float32).
    assert np.abs(theirs - ours).max() < 1e-2
    assert theirs.sum() == pytest.approx(ours.sum(), rel=1e-4)


def test_only_llama_checkpoints_convert(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from qualgate.engines.gguf_convert import convert, gguf_name, permute_rotary

    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="only llama is supported"):
        convert(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match=r"no llama\.cpp name"):
        gguf_name("transformer.h.0.attn.c_attn.weight")
    assert gguf_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    # Two heads of four rows: each head's halves [a0 a1 | b0 b1] interleave to [a0 b0 a1 b1].
    rows = np.arange(8.0).reshape(8, 1)
    assert permute_rotary(rows, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
