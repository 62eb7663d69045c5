"""The run store: identity keys, atomic records, and chunk checkpoints that survive a crash."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import qualgate.store
from qualgate.errors import ConfigError, InfrastructureError
from qualgate.instruments.fidelity import FidelityConfig, chunk_text, score_text
from qualgate.store import RunStore, file_sha256, identity_key

CONFIG = FidelityConfig(max_chunks=6)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def source_hash(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """qualgate's own source hash, set by the test (store.identity_key reads it at every call)."""
    current = {"hash": "src-1"}
    monkeypatch.setattr(qualgate.store, "package_source_hash", lambda: current["hash"])
    return current


def test_identity_key_is_the_hash_of_the_canonical_json(source_hash: dict[str, str]) -> None:
    identity = {"b": 1, "a": [1, 2], "path": Path("x/y.txt"), "nested": {"z": 1.5, "y": None}}
    # keys sorted at every level, no spaces, a Path as its string, qualgate's source hash included
    blob = '{"a":[1,2],"b":1,"nested":{"y":null,"z":1.5},"path":"x/y.txt","qualgate_source":"src-1"}'
    key = identity_key(identity)
    assert key == _sha(blob.encode())[:32] and len(key) == 32


def test_identity_key_ignores_key_order_and_follows_every_value(source_hash: dict[str, str]) -> None:
    identity = {"stack": {"model": "m", "layers": ["w4", "kv"]}, "config": {"n_ctx": 512, "seed": 0}}
    reordered = {"config": {"seed": 0, "n_ctx": 512}, "stack": {"layers": ["w4", "kv"], "model": "m"}}
    assert identity_key(reordered) == identity_key(identity)
    variants = [
        {**identity, "config": {"n_ctx": 256, "seed": 0}},
        {**identity, "config": {"n_ctx": 512, "seed": 1}},
        {**identity, "stack": {"model": "m2", "layers": ["w4", "kv"]}},
        {**identity, "stack": {"model": "m", "layers": ["kv", "w4"]}},  # layer order is part of a stack
        {**identity, "extra": None},
    ]
    keys = {identity_key(v) for v in variants}
    assert len(keys) == len(variants) and identity_key(identity) not in keys


def test_identity_key_changes_with_qualgate_source(source_hash: dict[str, str]) -> None:
    identity = {"config": {"n_ctx": 512}}
    before = identity_key(identity)
    source_hash["hash"] = "src-2"  # an edited checkout or a new commit
    assert identity_key(identity) != before
    source_hash["hash"] = "src-1"
    assert identity_key(identity) == before


def test_file_sha256_of_a_file_is_sha256sum_of_its_bytes(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"\x00\x01")
    assert file_sha256(tmp_path / "w.bin") == _sha(b"\x00\x01")
    (tmp_path / "w.bin").rename(tmp_path / "v.bin")  # the path is part of identities beside the hash
    assert file_sha256(tmp_path / "v.bin") == _sha(b"\x00\x01")


def test_file_sha256_of_a_directory_walks_its_files_by_relative_path_size_and_bytes(tmp_path: Path) -> None:
    root = tmp_path / "tasks"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "b.txt").write_text("yz")
    (root / "a.txt").write_text("x")
    # sorted paths: a.txt, sub (a directory: skipped), sub/b.txt
    assert file_sha256(root) == _sha(b"a.txt\x001\x00x" + b"sub/b.txt\x002\x00yz")
    (root / "sub" / "b.txt").rename(root / "sub" / "c.txt")  # a renamed file is another directory
    assert file_sha256(root) == _sha(b"a.txt\x001\x00x" + b"sub/c.txt\x002\x00yz")
    (root / "a.txt").write_text("X")
    assert file_sha256(root) == _sha(b"a.txt\x001\x00X" + b"sub/c.txt\x002\x00yz")
    (tmp_path / "empty").mkdir()
    assert file_sha256(tmp_path / "empty") == _sha(b"")


def test_file_sha256_tells_apart_what_names_alone_would_merge(tmp_path: Path) -> None:
    for name, files in {"d1": {"a/x.txt": "1"}, "d2": {"b/x.txt": "1"}, "d3": {"ab": "c"}, "d4": {"a": "bc"}}.items():
        for rel, text in files.items():
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).write_text(text)
    assert file_sha256(tmp_path / "d1") != file_sha256(tmp_path / "d2")  # same name, other subdirectory
    assert file_sha256(tmp_path / "d3") != file_sha256(tmp_path / "d4")  # name/content boundary
    with pytest.raises(ConfigError, match=r"missing.*does not exist"):
        file_sha256(tmp_path / "missing")


def test_records_round_trip_and_torn_records_are_redone(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.put("k", {"x": 1})
    assert store.get("k") == {"x": 1} and store.get("missing") is None
    (store.records / "torn.json").write_text('{"x": ')
    assert store.get("torn") is None


def test_records_live_in_records_as_sorted_json(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs" / "demo")  # parents are created
    assert store.records == tmp_path / "runs" / "demo" / "records" and store.records.is_dir()
    store.put("k1", {"b": 2, "a": [1, "x"]})
    store.put("k2", {})
    assert (store.records / "k1.json").read_text(encoding="utf-8") == '{"a": [1, "x"], "b": 2}'
    assert sorted(p.name for p in store.records.iterdir()) == ["k1.json", "k2.json"], "no temporary left"
    assert len(store) == 2
    again = RunStore(tmp_path / "runs" / "demo")  # reopening an existing run (--resume)
    assert again.get("k1") == {"a": [1, "x"], "b": 2} and len(again) == 2


def test_store_failures_are_infrastructure_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(InfrastructureError, match=r"^cannot write .*file/records \(Not a directory\)"):
        RunStore(tmp_path / "file")
    store = RunStore(tmp_path / "run")
    store.put("k", {"x": 1})

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(
        InfrastructureError, match=r"^disk full writing .*k\.json \(\d+ bytes needed, [\d,]+ free\); free space"
    ):
        store.put("k", {"x": 2})
    assert store.get("k") == {"x": 1}, "a failed write leaves the old record whole"
    assert len(store) == 1


def test_checkpoint_directories(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert store.generations("g").directory == "partial/g"
    assert store.chunks("c").directory == "partial/c"
    assert store.requests("r").directory == "requests/r"
    store.generations("g").save("p0", {})
    store.chunks("c").save(0, {"x": np.zeros(1)})
    assert (tmp_path / "partial" / "g" / "p0.json").is_file() and (tmp_path / "partial" / "c" / "000000.npz").is_file()
    assert len(store) == 0, "checkpoints are not records"


def test_json_checkpoint_round_trip_torn_and_discard(tmp_path: Path) -> None:
    checkpoint = RunStore(tmp_path).generations("unit")
    checkpoint.save("p0", {"tokens": [1, 2], "text": "é"})
    assert checkpoint.load("p0") == {"tokens": [1, 2], "text": "é"} and checkpoint.load("p1") is None
    assert sorted(p.name for p in (tmp_path / checkpoint.directory).iterdir()) == ["p0.json"]
    (tmp_path / checkpoint.directory / "p1.json").write_text('{"tokens": [1', encoding="utf-8")
    assert checkpoint.load("p1") is None, "torn by a kill: generated again"
    assert RunStore(tmp_path).generations("unit").load("p0") == {"tokens": [1, 2], "text": "é"}
    checkpoint.discard()
    assert not (tmp_path / checkpoint.directory).exists()
    checkpoint.discard()  # twice is fine


def test_chunk_checkpoint_round_trip_torn_and_discard(tmp_path: Path) -> None:
    checkpoint = RunStore(tmp_path).chunks("unit")
    part = {"logprob": np.array([-0.5, -1.25]), "top_ids": np.array([[3, 1], [2, 0]])}
    checkpoint.save(7, part)
    assert sorted(p.name for p in (tmp_path / checkpoint.directory).iterdir()) == ["000007.npz"]
    loaded = checkpoint.load(7)
    assert loaded is not None and sorted(loaded) == ["logprob", "top_ids"]
    np.testing.assert_array_equal(loaded["logprob"], part["logprob"])
    np.testing.assert_array_equal(loaded["top_ids"], part["top_ids"])
    assert checkpoint.load(8) is None
    resumed = RunStore(tmp_path).chunks("unit").load(7)  # reopened by --resume
    assert resumed is not None and resumed["logprob"].tolist() == [-0.5, -1.25]
    (tmp_path / checkpoint.directory / "000008.npz").write_bytes(b"not an npz")  # numpy: ValueError
    assert checkpoint.load(8) is None, "unreadable: scored again"
    checkpoint.discard()
    assert not (tmp_path / checkpoint.directory).exists()
    checkpoint.discard()


@pytest.mark.parametrize("cut", ["empty", "truncated"])
def test_a_truncated_chunk_checkpoint_is_scored_again(tmp_path: Path, cut: str) -> None:
    checkpoint = RunStore(tmp_path).chunks("unit")
    checkpoint.save(0, {"logprob": np.arange(1000.0)})
    path = tmp_path / checkpoint.directory / "000000.npz"
    whole = path.read_bytes()
    path.write_bytes(b"" if cut == "empty" else whole[: len(whole) // 2])
    assert checkpoint.load(0) is None


class _Crash(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("batching", [False, True])
def test_an_interrupted_scoring_resumes_without_redoing_chunks(
    base_session: Any, domain_text: str, tmp_path: Path, batching: bool
) -> None:
    """One chunk at a time, finished chunks are never scored again; in batches, a group is reused only
    whole, so the resumed scores are the bits an uninterrupted run computes (batch shapes move them)."""
    chunks = chunk_text(base_session, domain_text, CONFIG)
    clean = score_text(base_session, chunks, CONFIG)
    checkpoint = RunStore(tmp_path).chunks("unit")
    group = 2 if batching else 1
    base_session.scoring_group = lambda width, cached=False: group

    def crash_after_three(done: int, total: int) -> None:
        if done == 3:
            raise _Crash

    calls: list[int] = []
    real_score, real_batch = base_session.score, base_session.score_batch

    def counting_score(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_score(*args, **kwargs)

    def counting_batch(requests: Any) -> Any:
        calls.extend(1 for _ in requests)
        return real_batch(requests)

    try:
        with pytest.raises(_Crash):
            score_text(base_session, chunks, CONFIG, on_chunk=crash_after_three, checkpoint=checkpoint)
        base_session.score, base_session.score_batch = counting_score, counting_batch
        resumed = score_text(base_session, chunks, CONFIG, checkpoint=checkpoint)
    finally:
        for name in ("score", "score_batch", "scoring_group"):
            base_session.__dict__.pop(name, None)
    # A group's chunks are all saved before the first is handed on: with batches of two the crash (in the
    # callback of chunk 3) leaves groups 0-1 and 2-3 whole, and only 4-5 are scored again.
    assert len(calls) == len(chunks) - (4 if batching else 3), "finished chunks are not scored again"
    for field in ("chunk", "target", "logprob", "top_ids", "top_logprobs", "tail_mass"):
        np.testing.assert_array_equal(getattr(resumed, field), getattr(clean, field))


@pytest.mark.slow
def test_an_interrupted_equivalence_resumes_per_prompt(tmp_path: Path) -> None:
    from qualgate import build_stack, open_session
    from qualgate.instruments.equivalence import EquivalenceConfig, load_prompts, reference_stack, run_equivalence

    prompts = load_prompts(Path(__file__).resolve().parent.parent / "evals" / "prompts" / "general.jsonl")[:6]
    config = EquivalenceConfig(max_new_tokens=12)
    stack = build_stack({"path": "bundled:target"}, [{"kind": "speculation", "method": "draft_model"}])
    with open_session(stack) as candidate, open_session(reference_stack(stack)) as reference:
        clean = run_equivalence(candidate, reference, prompts, config).summary()
        assert clean["layer_stats"]["speculation"] == candidate.layer_stats()["speculation"], (
            "per-generation counters add up to the session's"
        )
    checkpoint = RunStore(tmp_path).generations("unit")
    with open_session(stack) as candidate, open_session(reference_stack(stack)) as reference:
        real_generate = candidate.generate
        calls: list[int] = []

        def crash_after_two(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 3:
                raise _Crash
            return real_generate(*args, **kwargs)

        candidate.generate = crash_after_two
        with pytest.raises(_Crash):
            run_equivalence(candidate, reference, prompts, config, checkpoint=checkpoint)
        calls.clear()
        candidate.generate = lambda *a, **k: (calls.append(1), real_generate(*a, **k))[1]
        resumed = run_equivalence(candidate, reference, prompts, config, checkpoint=checkpoint).summary()
    assert len(calls) == len(prompts) - 2, "finished prompts are not generated again"
    assert resumed == clean


def test_threads_writing_the_same_file_at_once_all_succeed(tmp_path: Path) -> None:
    """A judge's control asks one request in both orders, and both answers are cached under one key by
    concurrent threads: each write must land whole, none may fail for the other's temporary file."""
    from concurrent.futures import ThreadPoolExecutor

    from qualgate.fsio import atomic_write

    target = tmp_path / "cache" / "same.json"
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: atomic_write(target, b'{"verdict": "tie"}' * 1000), range(200)))
    assert target.read_bytes() == b'{"verdict": "tie"}' * 1000
    assert [p.name for p in target.parent.iterdir()] == ["same.json"], "no temporary file left behind"
