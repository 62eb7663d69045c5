"""weight_quant/checkpoint: a compressed-tensors checkpoint of the bundled target (made in the test by
compressed-tensors itself, tests/compressed_checkpoint.py) measured as a layer, a planted wrong
quantizer scale caught by the default gate, and checkpoints of another model refused before a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from compressed_checkpoint import make_checkpoint
from helpers import pipeline_file, run_pipeline

from qualgate import build_layer
from qualgate.cli import main
from qualgate.fixtures import bundled_model_path
from qualgate.layers.weight_quant import fake_quantize_groupwise, quantizable_linears
from qualgate.models import ModelSpec, load_hf_model

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "target-w4a16")


@pytest.fixture(scope="module")
def wrong_scale(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scales written at half what the weights need: every group's outer codes clip."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "target-w4a16-halfscale", scale_factor=0.5)


def test_the_checkpoint_holds_the_formats_dequantized_weights(w4a16: Path) -> None:
    """W4A16 is symmetric int4 in groups of 128 with scale absmax / 7.5: after decompression every
    Linear but lm_head equals qualgate's own symmetric RTN at the same grid; lm_head is untouched."""
    baseline = load_hf_model(ModelSpec())
    reference = {name: linear.weight.detach().clone() for name, linear in quantizable_linears(baseline, True)}
    layer = build_layer({"kind": "weight_quant", "method": "checkpoint", "path": str(w4a16)})
    assert layer.name == "ckpt-target-w4a16" and not layer.lossless
    loaded = layer.apply(baseline)
    linears = dict(quantizable_linears(loaded, True))
    assert set(linears) == set(reference)
    for name, linear in linears.items():
        if name.endswith("lm_head"):
            assert linear.weight.equal(reference[name]), "ignored by the scheme"
            continue
        expected = fake_quantize_groupwise(reference[name], 4, 128, symmetric=True)
        assert (linear.weight - expected).abs().max().item() < 1e-6, name
        assert not linear.weight.equal(reference[name])


def test_the_files_not_the_path_are_the_layers_identity(w4a16: Path, tmp_path: Path) -> None:
    def files(path: Path) -> Any:
        return build_layer({"kind": "weight_quant", "method": "checkpoint", "path": str(path)}).identity()["files"]

    copy = shutil.copytree(w4a16, tmp_path / "target-w4a16")
    first = files(copy)
    assert first == files(w4a16), "a copy is the same checkpoint"
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
    (copy / "config.json").write_text(json.dumps(config))
    assert files(copy) != first, "an edited checkpoint is another layer: nothing cached is reused"


def _mismatched(source: Path, tmp_path: Path, change: str) -> Path:
    copy = shutil.copytree(source, tmp_path / "ckpt")
    if change == "architecture":
        config = json.loads((copy / "config.json").read_text())
        config["num_hidden_layers"] = 3
        (copy / "config.json").write_text(json.dumps(config))
    else:  # the byte-level fixture's tokenizer: same architecture family, another vocabulary
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(bundled_model_path("bytes") / name, copy / name)
    return copy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("architecture", "is not a quantization of the baseline model: num_hidden_layers 3 != baseline 4"),
        ("tokenizer", "ships another tokenizer than the baseline's: "),
    ],
)
def test_a_checkpoint_of_another_model_is_exit_2_before_the_run(
    w4a16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str, message: str
) -> None:
    ckpt = _mismatched(w4a16, tmp_path, change)
    layers = {"ckpt": {"kind": "weight_quant", "method": "checkpoint", "path": str(ckpt)}}
    path = pipeline_file(tmp_path, layers, stacks=[{"layers": ["ckpt"]}])
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err
    if change == "tokenizer":
        assert "vocabulary differs" in err


def test_a_directory_without_a_model_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layers = {"ckpt": {"kind": "weight_quant", "method": "checkpoint", "path": str(tmp_path / "nowhere")}}
    assert main(["validate", str(pipeline_file(tmp_path, layers))]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no config.json" in err and "layers.ckpt" in err and err.count("\n") == 0, err


@pytest.mark.slow
def test_the_checkpoint_is_gated_and_a_wrong_scale_fails(w4a16: Path, wrong_scale: Path, tmp_path: Path) -> None:
    """Against the golden: the checkpoint measures as qualgate's own RTN on the same grid (the same
    weights, so the same KL to float noise), and the checkpoint with a wrong scale fails on KL."""
    layers = {
        "ckpt": {"kind": "weight_quant", "method": "checkpoint", "path": str(w4a16)},
        "bad": {"kind": "weight_quant", "method": "checkpoint", "path": str(wrong_scale)},
        "rtn": {"kind": "weight_quant", "method": "rtn", "bits": 4, "group_size": 128, "symmetric": True},
    }
    path = pipeline_file(tmp_path, layers, stacks=[{"layers": [name]} for name in layers], tracking={"enabled": False})
    data = yaml.safe_load(path.read_text())
    del data["instruments"]["equivalence"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert run_pipeline(path, tmp_path / "run") == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    stacks = {s["name"]: s for s in report["stacks"]}
    kl = {name: s["instruments"]["fidelity"]["kl_mean"]["value"] for name, s in stacks.items()}
    assert kl["ckpt-target-w4a16"] == pytest.approx(kl["w4g128-symmetric"], rel=1e-4, abs=1e-7)
    assert 0 < kl["ckpt-target-w4a16"] < 0.05 and stacks["ckpt-target-w4a16"]["verdict"] != "fail"
    bad = stacks["ckpt-target-w4a16-halfscale"]
    assert bad["verdict"] == "fail" and any("kl_mean" in r for r in bad["reasons"]), bad["reasons"]
    assert kl["ckpt-target-w4a16-halfscale"] > 10 * kl["ckpt-target-w4a16"]
    assert stacks["ckpt-target-w4a16"]["layers"][0]["path"] == str(w4a16)
