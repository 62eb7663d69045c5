"""Chunking reproduces llama-perplexity and lm-eval's rolling windows exactly."""

from __future__ import annotations

import pytest
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from qualgate import ConfigError
from qualgate.chunking import llamacpp_chunks, rolling_chunks, rolling_windows


def test_llamacpp_chunks_score_the_second_half_after_bos() -> None:
    tokens = [0, *range(10, 30)]  # BOS then 20 tokens: two chunks of 8, the rest dropped
    chunks = llamacpp_chunks(tokens, n_ctx=8, bos=0)
    assert [c.token_ids for c in chunks] == [[0, 10, 11, 12, 13, 14, 15, 16], [0, 18, 19, 20, 21, 22, 23, 24]]
    assert [c.targets for c in chunks] == [[14, 15, 16], [22, 23, 24]]  # positions n_ctx/2+1 .. n_ctx-1
    assert all(c.n_scored == 8 // 2 - 1 for c in chunks)


def test_llamacpp_chunks_need_enough_text() -> None:
    with pytest.raises(ConfigError, match="fewer than one chunk"):
        llamacpp_chunks([0, 1, 2], n_ctx=8, bos=0)
    with pytest.raises(ConfigError, match="even number"):
        llamacpp_chunks(list(range(100)), n_ctx=7, bos=0)


@pytest.mark.parametrize(("length", "max_length"), [(1, 4), (5, 8), (34, 10), (100, 10), (1000, 64), (64, 64)])
def test_rolling_windows_equal_lm_evals(length: int, max_length: int) -> None:
    tokens = list(range(1, length + 1))
    ours = list(rolling_windows(tokens, max_length, prefix_token=0))
    theirs = list(get_rolling_token_windows(tokens, prefix_token=0, max_seq_len=max_length, context_len=1))
    assert ours == theirs
    chunks = rolling_chunks(tokens, max_length, prefix_token=0)
    predicted = [t for c in chunks for t in c.targets]
    assert predicted == tokens, "every token is scored exactly once"
    for chunk, window in zip(chunks, theirs, strict=True):
        context, continuation = make_disjoint_window(window)
        assert chunk.token_ids == (context + continuation)[-(max_length + 1) :]
        assert chunk.targets == continuation
