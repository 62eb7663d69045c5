"""A record is reused only by the same code: layer classes, their modules, the backend and qualgate itself."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from helpers import run_pipeline as _run

from qualgate import build_layer
from qualgate.code_identity import class_identity, package_source_hash

PLUGIN = '''
from collections.abc import Sequence
from qualgate.layers.speculation import DraftModel


class Draft(DraftModel):
    """Same method name and parameters as the built-in; {accept}"""

    def accept(self, draft: Sequence[int], target_logprobs) -> int:
        top = target_logprobs.topk({k}, dim=-1).indices.tolist()
        accepted = 0
        for token, allowed in zip(draft, top):
            if token not in allowed:
                break
            accepted += 1
        return accepted
'''


def _write_plugin(directory: Path, name: str, k: int) -> None:
    doc = "greedy acceptance" if k == 1 else f"accepts any of the target's top {k}"
    (directory / f"{name}.py").write_text(PLUGIN.replace("{accept}", doc).replace("{k}", str(k)))
    sys.modules.pop(name, None)


def _pipeline(tmp_path: Path, method: str) -> Path:
    prompts = REPO / "evals" / "prompts" / "general.jsonl"
    data = {
        "version": 1,
        "name": "identity",
        "model": {"path": "bundled:target"},
        "layers": {"spec": {"kind": "speculation", "method": method, "num_speculative_tokens": 4}},
        "stacks": [{"layers": ["spec"]}],
        "instruments": {"equivalence": {"prompts": [str(prompts)], "max_new_tokens": 16, "probes": False}},
        "gate": {"real_divergences": {"fail": 0}},
        "tracking": {"enabled": False},
    }
    path = tmp_path / f"{method.replace(':', '_')}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _counts(out: str) -> tuple[int, int]:
    found = re.search(r"(\d+) units measured, (\d+) reused", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))


@pytest.mark.slow
def test_records_know_their_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert _run(_pipeline(tmp_path, "draft_model"), out) == 0
    assert _counts(capsys.readouterr().out) == (1, 0)
    assert _run(_pipeline(tmp_path, "draft_model"), out) == 0
    assert _counts(capsys.readouterr().out) == (0, 1), "an unchanged rerun reuses the record"

    # Same method and parameters, another class (a plug-in subclass with greedy acceptance): remeasured.
    _write_plugin(tmp_path, "identity_plugin", 1)
    assert _run(_pipeline(tmp_path, "identity_plugin:Draft"), out) == 0
    assert _counts(capsys.readouterr().out) == (1, 0)
    assert _run(_pipeline(tmp_path, "identity_plugin:Draft"), out) == 0
    assert _counts(capsys.readouterr().out) == (0, 1)

    # The plug-in module edited in place (top-2 acceptance): remeasured, and now it fails.
    _write_plugin(tmp_path, "identity_plugin", 2)
    assert _run(_pipeline(tmp_path, "identity_plugin:Draft"), out) == 1
    assert _counts(capsys.readouterr().out) == (1, 0)


def test_layer_identity_names_its_class_and_module_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_plugin(tmp_path, "identity_probe_plugin", 1)
    builtin = build_layer({"kind": "speculation", "method": "draft_model"})
    plugin = build_layer({"kind": "speculation", "method": "identity_probe_plugin:Draft"})
    assert builtin.identity()["code"]["class"] == "qualgate.layers.speculation:DraftModel"
    assert plugin.identity()["code"]["class"] == "identity_probe_plugin:Draft"
    assert builtin.identity()["params"] == plugin.identity()["params"] and builtin.identity() != plugin.identity()
    sources = plugin.identity()["code"]["sources"]
    assert set(sources) >= {"identity_probe_plugin", "qualgate.layers.speculation", "qualgate.layers.base"}
    before = sources["identity_probe_plugin"]
    (tmp_path / "identity_probe_plugin.py").write_text(
        (tmp_path / "identity_probe_plugin.py").read_text() + "\n# edit\n"
    )
    assert class_identity(type(plugin))["sources"]["identity_probe_plugin"] != before, "read from disk each time"


def test_package_hash_covers_every_source_file() -> None:
    digest = package_source_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and package_source_hash() == digest
    assert any(p.name == "code_identity.py" for p in (REPO / "qualgate").rglob("*.py"))
