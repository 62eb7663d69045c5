"""Goldens written and compared chunk by chunk: the streamed npz is an ordinary npz, streaming gives the
numbers of the whole-array path, and no step asks for more than a group of chunks' rows at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qualgate import build_stack, golden_record, open_session
from qualgate import golden as golden_store
from qualgate.errors import ConfigError
from qualgate.instruments.fidelity import FidelityConfig, compare, compare_scored, iter_scores, score_text
from qualgate.npz_stream import NpzReader, NpzWriter

CONFIG = FidelityConfig(max_chunks=4)


def test_a_streamed_npz_is_an_ordinary_npz_read_back_in_any_pieces(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "ids": rng.integers(0, 65535, size=(1000, 64)).astype(np.uint16),
        "logprobs": rng.normal(size=(1000, 80)).astype(np.float32),
        "scalar": rng.normal(size=1000),
    }
    writer = NpzWriter(tmp_path / "s.npz")
    for start in range(0, 1000, 137):  # rows arrive in uneven pieces
        for name, values in arrays.items():
            writer.append(name, values[start : start + 137])
    sizes = writer.close()
    assert not (tmp_path / "s.npz.parts").exists() and not (tmp_path / "s.npz.tmp").exists()
    assert set(sizes) == set(arrays) and all(size > 0 for size in sizes.values())
    with np.load(tmp_path / "s.npz") as loaded:
        for name, values in arrays.items():
            np.testing.assert_array_equal(loaded[name], values)
    # np.savez_compressed's own files (header version 1.0) read the same way.
    np.savez_compressed(tmp_path / "numpy.npz", **arrays)
    for path in (tmp_path / "s.npz", tmp_path / "numpy.npz"):
        with NpzReader(path) as reader:
            assert reader.shape("ids") == (1000, 64) and reader.dtype("logprobs") == np.float32
            pieces = [reader.read("logprobs", 300), reader.read("logprobs", 1), reader.read("logprobs")]
            np.testing.assert_array_equal(np.concatenate(pieces), arrays["logprobs"])
            with pytest.raises(ValueError, match="0 left"):
                reader.read("logprobs", 1)


def test_a_writer_refuses_rows_of_another_shape_and_an_abort_leaves_nothing(tmp_path: Path) -> None:
    writer = NpzWriter(tmp_path / "s.npz")
    writer.append("a", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="member 'a'"):
        writer.append("a", np.zeros((2, 4), dtype=np.float32))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory, base_session: Any, domain_text: str) -> Path:
    out = tmp_path_factory.mktemp("golden") / "target"
    golden_record.record(base_session, domain_text, CONFIG, out)
    return out


def test_a_streamed_comparison_is_the_whole_array_comparison(streamed: Path, domain_text: str) -> None:
    """The fidelity instrument's path (golden rows streamed, each chunk folded as it is scored) gives the
    summary and per-token arrays of loading both sides whole and comparing them."""
    model = build_stack({"path": "bundled:target"}).model
    chunks, whole = golden_store.load(streamed, model, domain_text, CONFIG)
    _, reference = golden_store.open_reference(streamed, model, domain_text, CONFIG)
    stack = build_stack({"path": "bundled:target"}, [{"kind": "weight_quant", "method": "rtn", "bits": 4}])
    taken: list[int] = []
    with open_session(stack) as session:
        session.scoring_group = lambda width, cached=False: 2  # groups of two chunks, as a batched engine asks
        expected = compare(whole, score_text(session, chunks, CONFIG, reference=whole))
        with reference.rows() as rows:
            real_take = rows.take

            def counting_take(count: int) -> Any:
                taken.append(count)
                return real_take(count)

            rows.take = counting_take  # type: ignore[method-assign]
            streamed_result = compare_scored(iter_scores(session, chunks, CONFIG, rows))
    assert taken == [c.n_scored for c in chunks], "the reference is read one chunk's rows at a time"
    assert json.dumps(streamed_result.summary, sort_keys=True) == json.dumps(expected.summary, sort_keys=True)
    assert streamed_result.summary["kl_estimator"]["kind"] == "sampled-tail"
    assert expected.summary["kl_mean"]["value"] > 1e-3  # a real difference, not two zeros
    assert set(streamed_result.per_token) == set(expected.per_token)
    for name, values in expected.per_token.items():
        np.testing.assert_array_equal(streamed_result.per_token[name], values)


def test_a_golden_damaged_inside_its_topk_arrays_is_refused_before_any_scoring(
    streamed: Path, tmp_path: Path, domain_text: str
) -> None:
    """The [tokens, k] arrays are read only while comparing, so their checksums are verified when the
    golden is opened: a flipped byte there is exit 2 at validate, not a crash halfway through a run."""
    import shutil
    import zipfile

    damaged = tmp_path / "damaged"
    shutil.copytree(streamed, damaged)
    path = damaged / golden_store.SCORES
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("top_logprobs.npy")
    data = bytearray(path.read_bytes())
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    model = build_stack({"path": "bundled:target"}).model
    with pytest.raises(ConfigError, match=r"scores\.npz is unreadable.*re-record it"):
        golden_store.open_reference(damaged, model, domain_text, CONFIG)


def test_a_candidate_longer_than_the_reference_is_refused_not_cut() -> None:
    """Blocks are cut along the reference: positions the candidate has beyond it must not vanish."""
    from qualgate.instruments.fidelity import TokenScores

    def scores(n: int) -> TokenScores:
        logprobs = np.log(np.full((n, 2), 0.4))
        return TokenScores(
            chunk=np.zeros(n, np.int32),
            target=np.arange(n),
            logprob=np.zeros(n),
            top_ids=np.zeros((n, 2), np.int64),
            top_logprobs=logprobs,
            tail_mass=np.full(n, 0.2),
            gathered=logprobs,
        )

    with pytest.raises(ConfigError, match="scored different tokens"):
        compare(scores(3), scores(5))
