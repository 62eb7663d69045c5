"""model.device: resolved against what this machine has, refused with the devices found, recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import pipeline_file

from qualgate import build_stack, open_session
from qualgate.cli import main
from qualgate.devices import describe, present, resolve
from qualgate.errors import ConfigError

NO_GPU = not torch.cuda.is_available() and not torch.backends.mps.is_available()


def test_auto_takes_a_gpu_when_there_is_one_else_the_cpu() -> None:
    expected = "cuda:0" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert str(resolve("auto")) == expected and "cpu" in present()
    assert resolve("cpu") == torch.device("cpu")
    info = describe(torch.device("cpu"))
    assert info["device"] == "cpu" and info["torch"] == torch.__version__ and info["capability"] is None


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_a_device_that_is_not_here_is_exit_2_naming_what_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str
) -> None:
    with pytest.raises(ConfigError, match=rf"model.device '{device}' is not present on this machine \(found: cpu\)"):
        resolve(device)
    path = pipeline_file(tmp_path, {"w8": {"kind": "weight_quant", "method": "rtn", "bits": 8}})
    data = yaml.safe_load(path.read_text())
    data["model"]["device"] = device
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"model.device '{device}' is not present" in err and str(path) in err


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_a_draft_device_that_is_not_here_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layer = {"kind": "speculation", "method": "draft_model", "draft": "bundled:draft", "draft_device": "cuda:0"}
    assert main(["validate", str(pipeline_file(tmp_path, {"spec": layer}))]) == 2
    assert "draft_device 'cuda:0' is not present on this machine (found: cpu)" in capsys.readouterr().err


def test_a_device_name_that_is_no_device_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = pipeline_file(tmp_path, {"w8": {"kind": "weight_quant", "method": "rtn", "bits": 8}})
    data = yaml.safe_load(path.read_text())
    data["model"]["device"] = "gpu"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.device" in err, err


def test_the_device_is_in_every_record_identity() -> None:
    model: dict[str, Any] = {"path": "bundled:target", "device": "cpu"}
    identity = build_stack(model).identity()["model"]
    assert identity["device"] == "cpu"
    assert build_stack({"path": "bundled:target"}).identity()["model"]["device"] == resolve("auto").type


def test_a_session_on_an_explicit_device_scores_as_auto(base_session: Any, domain_ids: list[int]) -> None:
    """The tensors a session makes are on its model's device; on this machine auto is that device."""
    with open_session(build_stack({"path": "bundled:target", "device": str(resolve("auto"))})) as explicit:
        assert explicit.device == resolve("auto")
        a, b = explicit.score(domain_ids[:64], top_k=8), base_session.score(domain_ids[:64], top_k=8)
    assert (a.logprobs == b.logprobs).all() and (a.top_ids == b.top_ids).all()
