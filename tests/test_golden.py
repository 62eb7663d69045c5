"""The golden store: round trip, identity checks that name what changed, drift detection, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qualgate import ConfigError, ModelSpec, build_stack, golden_record, open_session
from qualgate import golden as golden_store
from qualgate.cli import main
from qualgate.fixtures import bundled_model_path
from qualgate.instruments.fidelity import FidelityConfig, chunk_text, compare, score_text
from qualgate.noise_floor import check_thresholds, floor_values

CONFIG = FidelityConfig(max_chunks=3)
TEXT_PATH = str(Path(__file__).resolve().parent.parent / "evals" / "domain" / "cpython_docs_heldout.txt")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, base_session: Any, domain_text: str) -> Path:
    out = tmp_path_factory.mktemp("golden") / "target"
    golden_record.record(base_session, domain_text, CONFIG, out, text_source=TEXT_PATH)
    return out


def test_round_trip_equals_fresh_scoring(recorded: Path, base_session: Any, domain_text: str) -> None:
    manifest = golden_store.read_manifest(recorded)
    assert manifest.n_chunks == 3 and manifest.n_tokens == 3 * 255
    assert manifest.model["files"]["model.safetensors"] == base_session.stack.model.fingerprint()["model.safetensors"]
    assert 0 < manifest.bytes_per_token < 2 * base_session.vocab_size / 4, "far smaller than a float16 full row"
    chunks, stored = golden_store.load(recorded, base_session.stack.model, domain_text, CONFIG)
    assert chunks == chunk_text(base_session, domain_text, CONFIG)
    fresh = score_text(base_session, chunks, CONFIG)
    np.testing.assert_array_equal(stored.top_ids, fresh.top_ids)
    np.testing.assert_allclose(stored.logprob, fresh.logprob, atol=1e-5)
    self_compare = compare(stored, score_text(base_session, chunks, CONFIG, reference=stored)).summary
    assert self_compare["kl_mean"]["value"] < 1e-6 and self_compare["same_top1"]["value"] == 1.0


def test_a_changed_weight_file_is_named(recorded: Path, tmp_path: Path, domain_text: str) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(bundled_model_path("target"), model_dir)
    manifest = json.loads((recorded / "manifest.json").read_text())
    manifest["model"]["path"] = str(model_dir)
    copy = tmp_path / "golden"
    shutil.copytree(recorded, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    golden_store.load(copy, ModelSpec(path=str(model_dir)), domain_text, CONFIG)  # identical copy: fine
    with (model_dir / "model.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x00\x80\x3f")
    with pytest.raises(ConfigError, match=r"model file model\.safetensors changed"):
        golden_store.load(copy, ModelSpec(path=str(model_dir)), domain_text, CONFIG)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dtype": "bfloat16"}, "baseline dtype float32 -> bfloat16"),
        ({"text": "x"}, "text changed"),
        ({"config": {"n_ctx": 256}}, "fidelity.n_ctx 512 -> 256"),
        ({"config": {"top_k": 32}}, "fidelity.top_k 64 -> 32"),
        ({"config": {"mode": "rolling"}}, "fidelity.mode llamacpp -> rolling"),
    ],
)
def test_each_kind_of_mismatch_is_a_clear_error(
    recorded: Path, domain_text: str, change: dict[str, Any], message: str
) -> None:
    model = ModelSpec(path="bundled:target", dtype=change.get("dtype", "float32"))
    text = domain_text + change.get("text", "")
    config = CONFIG.model_copy(update=change.get("config", {}))
    with pytest.raises(ConfigError, match=message) as info:
        golden_store.load(recorded, model, text, config)
    assert str(info.value).startswith(str(recorded)) and "qualgate golden record" in str(info.value)


def test_verify_reports_drift(recorded: Path, base_session: Any, domain_text: str, tmp_path: Path) -> None:
    clean = golden_store.verify(recorded, base_session, domain_text, CONFIG, sample_chunks=2)
    assert not clean["drifted"] and clean["max_abs_logprob_diff"] < 1e-5 and clean["chunks_checked"] == [0, 2]
    tampered = tmp_path / "tampered"
    shutil.copytree(recorded, tampered)
    data = dict(np.load(tampered / "scores.npz"))
    data["logprob"] = data["logprob"] + np.float32(0.01)
    np.savez_compressed(tampered / "scores.npz", **data)
    drifted = golden_store.verify(tampered, base_session, domain_text, CONFIG, sample_chunks=2)
    assert drifted["drifted"] and drifted["max_abs_logprob_diff"] == pytest.approx(0.01, rel=1e-3)


def test_record_refuses_a_stack_with_layers(tmp_path: Path, domain_text: str) -> None:
    with (
        open_session(build_stack({"path": "bundled:target"}, [{"kind": "speculation", "method": "ngram"}])) as s,
        pytest.raises(ConfigError, match="record the baseline"),
    ):
        golden_record.record(s, domain_text, CONFIG, tmp_path / "g")


def test_missing_or_corrupt_manifest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; record a golden baseline first"):
        golden_store.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        golden_store.read_manifest(tmp_path)


def test_cli_record_verify_noise_floor_and_fidelity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g"
    assert main(["golden", "record", "--out", str(out), "--text", TEXT_PATH, "--max-chunks", "2"]) == 0
    assert main(["golden", "verify", str(out), "--sample-chunks", "2"]) == 0
    assert main(["golden", "noise-floor", str(out), "--block-size", "1"]) == 0
    floors = floor_values(out)
    assert floors["kl_mean"] < 1e-6 and floors["same_top1"] > 0.99
    with pytest.raises(ConfigError, match="below the noise floor"):
        check_thresholds({"kl_mean": floors["kl_mean"] / 2}, floors, "pipelines/demo.yaml: gate")
    check_thresholds({"kl_mean": 0.01, "same_top1": 0.9}, floors, "pipelines/demo.yaml: gate")
    summary_file = tmp_path / "w2.json"
    per_token = tmp_path / "w2.csv"
    assert (
        main(
            [
                "fidelity",
                str(out),
                "--layer",
                "kind=weight_quant,method=rtn,bits=2",
                "--json",
                str(summary_file),
                "--per-token",
                str(per_token),
            ]
        )
        == 0
    )
    rows = per_token.read_text().splitlines()
    assert rows[0].startswith("chunk,target,nll_reference,nll_candidate,kl,") and len(rows) == 1 + 2 * 255
    summary = json.loads(summary_file.read_text())
    assert summary["kl_mean"]["value"] > 100 * floors["kl_mean"]
    assert "fidelity: w2g128" in capsys.readouterr().out


def test_cli_user_mistakes_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fidelity", str(tmp_path / "nope")]) == 2
    assert "does not exist; record one: qualgate golden record" in capsys.readouterr().err
    assert main(["golden", "record", "--out", str(tmp_path / "g"), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "text file" in capsys.readouterr().err
    assert main(["golden", "record", "--out", str(tmp_path / "g"), "--text", TEXT_PATH, "--max-chunks", "1"]) == 0
    assert main(["fidelity", str(tmp_path / "g"), "--layer", "kind=weight_quant,method=rnt"]) == 2
    assert "did you mean 'rtn'" in capsys.readouterr().err
    assert main(["fidelity", str(tmp_path / "g"), "--layer", "bits"]) == 2
    assert "not key=value" in capsys.readouterr().err
