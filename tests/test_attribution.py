"""Where a weight quantizer's loss comes from: a planted bad matrix is ranked first, the plan keeps the
fewest matrices at 8 bits that pass and the mixed stack it proposes measures what the plan measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from qualgate import build_stack, open_session
from qualgate import golden as golden_store
from qualgate.attribution.sweep import GoldenSubset, attribute, spread
from qualgate.cli import main
from qualgate.errors import ConfigError
from qualgate.instruments.fidelity import compare, score_text
from qualgate.layers import build_layer

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "golden" / "bundled-target"
W4 = {"kind": "weight_quant", "method": "rtn", "bits": 4, "group_size": 64}


@pytest.fixture(scope="module")
def golden_data(domain_text: str) -> tuple[Any, Any, Any]:
    manifest = golden_store.read_manifest(GOLDEN)
    config = manifest.fidelity_config()
    model = build_stack({"path": "bundled:target"}).model
    chunks, reference = golden_store.load(GOLDEN, model, domain_text, config)
    return config, chunks, reference


def test_a_planted_bad_matrix_is_ranked_first(base_session: Any, golden_data: Any) -> None:
    """8-bit RTN everywhere but one matrix at 2 bits: that matrix carries nearly all the KL, has the
    lowest weight SQNR and output cosine; the other 27 are near zero; singles add up to the whole."""
    config, chunks, reference = golden_data
    planted = "model.layers.2.mlp.up_proj"
    layer = build_layer({"kind": "weight_quant", "method": "tests.plugin_layers:PlantedWorstMatrix", "bits": 8})
    golden = GoldenSubset(config, chunks, reference, spread(len(chunks), 4))
    result = attribute(base_session, layer, golden, threshold=0.01)
    units = result["units"]
    assert len(units) == 28 and units[0]["unit"] == planted
    worst, second = units[0], units[1]
    assert worst["kl_mean"]["low"] > 10 * second["kl_mean"]["high"], "ranked first by a clear margin"
    assert worst["sqnr_db"] == min(u["sqnr_db"] for u in units) and worst["sqnr_db"] < 15 < second["sqnr_db"]
    assert worst["output_cosine"] == min(u["output_cosine"] for u in units) and worst["output_cosine"] < 0.99
    assert worst["share"] > 0.8
    assert result["whole"]["kl_mean"]["value"] == pytest.approx(result["sum_of_singles"], rel=0.3)
    # The model is back to the baseline: scoring it again gives the golden's numbers.
    again = compare(
        golden.sub_reference, score_text(base_session, golden.sub_chunks, config, reference=golden.sub_reference)
    )
    assert again.summary["kl_mean"]["value"] < 1e-6


@pytest.fixture(scope="module")
def nightly_attribution(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """`qualgate attribute` on the nightly's w4 stack, asked for a KL bound well under the stack's own."""
    out = tmp_path_factory.mktemp("attribution")
    code = main(
        [
            "attribute",
            str(REPO / "pipelines" / "nightly.yaml"),
            "--stack",
            "w4",
            "--chunks",
            "4",
            "--threshold",
            "0.002",
            "--out",
            str(out),
        ]
    )
    return code, out


def test_the_plan_keeps_the_fewest_matrices_that_pass_and_lowers_kl(nightly_attribution: tuple[int, Path]) -> None:
    code, out = nightly_attribution
    result = json.loads((out / "attribution.json").read_text())
    plan, whole = result["plan"], result["whole"]
    assert code == 0 and plan["found"] and plan["verified"]["passes"]
    assert whole["kl_mean"]["high"] > 0.002, "the whole w4 stack does not pass the asked bound"
    assert 0 < len(plan["kept"]) < 28
    assert plan["kept"] == [u["unit"] for u in result["units"][: len(plan["kept"])]], "the worst units are kept first"
    steps = {s["kept"]: s["high"] for s in plan["steps"]}
    assert steps[len(plan["kept"])] <= 0.002 and steps.get(len(plan["kept"]) - 1, 1.0) > 0.002, "the fewest"
    assert plan["verified"]["kl_mean"]["value"] < whole["kl_mean"]["value"] / 2
    assert (out / "kl_by_unit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "attribution.md").read_text()
    assert "![KL per matrix](kl_by_unit.png)" in summary and "method: mixed" in summary


def test_the_proposed_mixed_stack_measures_what_the_plan_measured(
    nightly_attribution: tuple[int, Path], golden_data: Any
) -> None:
    """The layer the plan prints, run as any stack is (built from its configuration), gives the KL the
    plan verified by swapping modules: the proposal is what was measured."""
    config, chunks, reference = golden_data
    _, out = nightly_attribution
    result = json.loads((out / "attribution.json").read_text())
    layer = yaml.safe_load(yaml.safe_dump(result["plan"]["layer"]))
    with open_session(build_stack({"path": "bundled:target"}, [layer])) as session:
        kl = compare(reference, score_text(session, chunks, config, reference=reference)).summary["kl_mean"]
    assert kl["value"] == pytest.approx(result["plan"]["verified"]["kl_mean"]["value"], rel=1e-6)


def test_attribution_per_decoder_layer(base_session: Any, golden_data: Any) -> None:
    config, chunks, reference = golden_data
    golden = GoldenSubset(config, chunks, reference, spread(len(chunks), 2))
    result = attribute(base_session, build_layer(W4), golden, threshold=1.0, granularity="layer")
    assert sorted(u["unit"] for u in result["units"]) == [f"model.layers.{i}" for i in range(4)]
    assert all(u["matrices"] == 7 and 0.9 < u["output_cosine"] < 1.0 for u in result["units"])
    assert result["plan"]["found"] and result["plan"]["kept"] == [], "under a loose bound nothing is kept"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stack", "nope"], "has no such stack; choose one of: base"),
        (["--stack", "kv4"], "has no weight_quant layer"),
        (["--stack", "w4", "--keep", "kind=kv_quant"], "not kind"),
        (["--stack", "w4", "--chunks", "1"], "at least 2 chunks"),
    ],
)
def test_attribute_refuses_bad_input_on_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["attribute", str(REPO / "pipelines" / "nightly.yaml"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_mixed_layer_naming_a_missing_module_is_exit_2() -> None:
    spec = {"kind": "weight_quant", "method": "mixed", "base": {"method": "rtn", "bits": 4}, "modules": ["model.nope"]}
    with (
        pytest.raises(ConfigError, match=r"has no module 'model\.nope'"),
        open_session(build_stack({"path": "bundled:target"}, [spec])),
    ):
        pass
    with pytest.raises(ConfigError, match="base and keep must be single quantizers"):
        build_layer({**spec, "base": {"method": "mixed"}})


def test_the_attribution_is_logged_to_mlflow(nightly_attribution: tuple[int, Path], _tracking_store: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(_tracking_store)
    experiment = client.get_experiment_by_name("qualgate-nightly")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.`qualgate.kind` = 'attribution'")
    assert runs, "an attribution run in the pipeline's experiment"
    run = runs[0]
    assert run.data.metrics["attribution/kept"] > 0 and run.data.metrics["attribution/plan_kl"] < 0.002
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"attribution.md", "kl_by_unit.png", "tables"} <= artifacts


def test_kv_rtn_quantizes_only_the_side_it_is_asked_to() -> None:
    import torch
    from transformers import AutoConfig

    from qualgate.fixtures import bundled_model_path

    config = AutoConfig.from_pretrained(bundled_model_path("target"))
    keys, values = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    k_only = build_layer({"kind": "kv_quant", "method": "rtn", "bits_k": 2, "bits_v": None}).make_cache(config)  # type: ignore[attr-defined]
    got_k, got_v = k_only.update(keys, values, 0)
    assert torch.equal(got_v, values) and not torch.allclose(got_k, keys)
    assert len(torch.unique(got_k[0, 0, 0])) <= 4 * 1, "2 bits: at most 4 levels per group of 32 channels"
    with pytest.raises(ConfigError, match="nothing would be quantized"):
        build_layer({"kind": "kv_quant", "method": "rtn", "bits_k": None, "bits_v": None})


def test_kv_sweep_keys_are_the_sensitive_side(tmp_path: Path, _tracking_store: str) -> None:
    """The K x V grid on the bundled model: 2-bit keys cost more than 2-bit values, 8 bits on both is
    ~0, the heat map, table and MLflow run are written, and the demo's FP8 cache is scored beside."""
    out = tmp_path / "kv"
    argv = ["kv-sweep", str(REPO / "pipelines" / "demo.yaml"), "--bits", "2,8", "--chunks", "2", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "kv_sweep.json").read_text())
    cells = {(str(c["bits_k"]), str(c["bits_v"])): c["kl_mean"]["value"] for c in result["cells"]}
    assert len(cells) == 8 and cells[("2", "fp")] > 2 * cells[("fp", "2")] > 0
    assert cells[("8", "8")] < 1e-4 < cells[("2", "2")]
    assert [row["name"] for row in result["layers"]] == ["kv-fp8-e4m3"]
    assert (out / "kv_heat_map.png").read_bytes()[:4] == b"\x89PNG"
    assert "![K x V heat map](kv_heat_map.png)" in (out / "kv_sweep.md").read_text()
    from mlflow import MlflowClient

    client = MlflowClient(_tracking_store)
    experiment = client.get_experiment_by_name("qualgate-demo")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.`qualgate.kind` = 'kv-sweep'")
    assert runs and "kv_sweep/k_only_2" in runs[0].data.metrics


def test_the_attribution_instrument_in_a_pipeline(tmp_path: Path) -> None:
    """In a run: measured once per quantizer (a stack sharing it reuses the record), a section per stack,
    the chart linked from summary.md, and no finding of its own (a diagnosis, not a gate)."""
    pipeline = {
        "version": 1,
        "name": "attribution-run",
        "model": {"path": "bundled:target", "dtype": "float32"},
        "layers": {"w4": W4, "ng": {"kind": "speculation", "method": "ngram"}},
        "stacks": [{"layers": ["w4"]}, {"layers": ["w4", "ng"]}],
        "instruments": {
            "fidelity": {"golden": str(GOLDEN)},
            "attribution": {"chunks": 2, "threshold": 0.002, "granularity": "layer"},
        },
        "tracking": {"enabled": False},
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    sections = [s["instruments"].get("attribution") for s in report["stacks"]]
    assert sections[0] is None, "the baseline has no quantizer to attribute"
    assert sections[1] == sections[2] and sections[1]["units"][0]["unit"] == "model.layers.0"
    assert not [f for s in report["stacks"] for f in s["findings"] if f["instrument"] == "attribution"]
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "### Where `w4g64` loses (per layer, 2 chunks)" in summary
    assert (tmp_path / "run" / "plots" / "attribution_w4g64.png").is_file()
