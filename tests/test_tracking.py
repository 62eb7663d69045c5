"""MLflow tracking against a real `mlflow server`: run tree, params, metrics and steps, artifacts,
datasets, a server killed mid-run, idempotent sync, comparison with the last passing run, and the UI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO, pipeline_file, run_pipeline
from mlflow_server import MlflowServer, free_port

from qualgate.cli import main
from qualgate.tracking.layout import build_layout
from qualgate.tracking.mlflow_log import DEFAULT_URI, Tracker, resolve_uri
from qualgate.tracking.state import TrackingState

LAYERS = {
    "w8": {"kind": "weight_quant", "method": "rtn", "bits": 8},
    "spec": {"kind": "speculation", "method": "ngram"},
}
STACKS = ["base", "w8g128", "w8g128+spec-ngram4", "spec-ngram4"]
ARTIFACTS = Path(os.environ.get("QUALGATE_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def _client(url: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url)


def _runs(url: str, experiment: str, filter_string: str = "") -> list[Any]:
    client = _client(url)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else list(client.search_runs([exp.experiment_id], filter_string=filter_string))


# -- layout (no MLflow) ---------------------------------------------------------------------------
def _report(verdict: str = "pass") -> dict[str, Any]:
    def fidelity(kl: float) -> dict[str, Any]:
        est = {"value": kl, "low": kl / 2, "high": kl * 2, "se": kl / 4}
        return {
            "kl_mean": est,
            "ppl_ratio": {"value": 1.01, "low": 1.0, "high": 1.02, "se": float("nan")},
            "same_top1": {"value": 0.99, "low": 0.98, "high": 1.0, "se": 0.01},
            "kl_percentiles": {"p99": kl * 10},
            "kl_by_confidence": [{"bucket": "[0.25,0.5)", "n": 3, "kl_mean": kl}],
            "top_k": 64,
            "dp_rms": float("nan"),
        }

    stack = {
        "name": "w4g64",
        "layers": [{"name": "w4", "kind": "weight_quant", "method": "rtn", "bits": 4}],
        "role": "ladder",
        "step": 1,
        "lossless": False,
        "instruments": {"fidelity": fidelity(0.003)},
        "findings": [{"status": "warn"}],
        "verdict": "warn",
        "reasons": ["fidelity.same_top1 lower bound 0.94 crosses warn 0.95"],
    }
    base = {**stack, "name": "base", "layers": [], "role": "baseline", "step": 0, "verdict": "pass", "reasons": []}
    base["instruments"] = {"fidelity": fidelity(1e-9)}
    part = {"vs_baseline": 0.003, "vs_previous": 0.003, "interaction": 0.0, "sum_of_singles": 0.003}
    return {
        "pipeline": "p",
        "verdict": verdict,
        "reasons": [],
        "provenance": {"model": {"path": "bundled:target"}, "git": {"commit": "abc", "dirty": False}},
        "stacks": [base, stack],
        "compound": {
            "baseline": {"kl_mean": 1e-9, "ln_ppl_ratio": 0.0, "top1_loss": 0.0},
            "ladder": [
                {
                    "stack": "w4g64",
                    "step": 1,
                    "layers": ["w4"],
                    **{m: part for m in ("kl_mean", "ln_ppl_ratio", "top1_loss")},
                }
            ],
        },
    }


def test_layout_names_steps_params_and_drops_non_finite_values() -> None:
    layout = build_layout(_report(), "uid1")
    assert layout.parent.tags["qualgate.run_uid"] == "uid1" and layout.parent.tags["mlflow.source.git.commit"] == "abc"
    assert ("ladder/kl_mean", 1e-9, 0) in layout.parent.metrics and (
        "ladder/kl_mean",
        0.003,
        1,
    ) in layout.parent.metrics
    w4 = layout.stacks[1].spec
    metrics = {key: (value, step) for key, value, step in w4.metrics}
    assert metrics["fidelity/kl_mean"] == (0.003, 1) and metrics["fidelity/kl_mean_high"] == (0.006, 1)
    assert metrics["fidelity/kl_confidence_0.25-0.5"] == (0.003, 1), "MLflow keys allow no brackets or commas"
    assert metrics["compound/kl_mean_vs_baseline"] == (0.003, 1)
    assert "fidelity/dp_rms" not in metrics, "NaN is not logged"
    assert all(math.isfinite(v) for _, v, _ in w4.metrics)
    assert w4.params["layers.w4.bits"] == "4" and w4.params["stack.layers"] == "w4"
    assert w4.tags["qualgate.verdict"] == "warn" and "same_top1" in w4.tags["qualgate.reasons"]
    assert layout.stacks[0].spec.params["stack.layers"] == "(baseline)"


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert DEFAULT_URI == "sqlite:///mlflow.db"
    assert resolve_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}", "a local store in the working directory"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    assert resolve_uri() == "http://team:5000"
    assert resolve_uri(pipeline="http://pipe:5000") == "http://pipe:5000"
    assert resolve_uri("http://cli:5000", "http://pipe:5000") == "http://cli:5000"


def test_traces_land_in_the_trackers_store_and_leave_the_process_uri_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trace exporter needs MLflow's process-wide URI; after the upload the caller's URI (variable and
    module global) is exactly as it was, so a later run in the same process does not log to this store."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from qualgate.instruments.base import Assessment, TraceRecord

    caller = f"sqlite:///{tmp_path / 'caller.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", caller)
    monkeypatch.delenv("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    client = mlflow.MlflowClient(store)
    experiment = client.create_experiment("traces")
    run_id = client.create_run(experiment).info.run_id
    record = TraceRecord("judge p1", {"prompt": "Q"}, {"outcome": "loss"}, {"qualgate.prompt_id": "p1"},
                         [Assessment("outcome", "loss", "B then A", "bundled:judge")])  # fmt: skip
    Tracker(store).log_traces(run_id, experiment, [record])
    assert os.environ["MLFLOW_TRACKING_URI"] == caller and tracking_utils._tracking_uri is None
    assert "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING" not in os.environ
    assert mlflow.get_tracking_uri() == caller
    (trace,) = client.search_traces(locations=[experiment], run_id=run_id)
    assert trace.info.tags["qualgate.prompt_id"] == "p1"
    assert [(a.name, a.value) for a in trace.info.assessments] == [("outcome", "loss")]


@pytest.mark.slow
def test_default_run_leaves_a_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No server, no URI: the run lands in ./mlflow.db with artifacts beside it."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(REPO)
    path = pipeline_file(tmp_path, {"w8": LAYERS["w8"]}, tracking={"experiment": "local"})
    assert run_pipeline(path, tmp_path / "run") == 0
    state = TrackingState.load(tmp_path / "run")
    assert state.status == "logged" and state.uri == f"sqlite:///{db}"
    runs = _runs(state.uri, "local")
    assert len(runs) == 1 + 2
    parent = next(r for r in runs if r.data.tags["qualgate.kind"] == "run")
    assert parent.info.artifact_uri.startswith((db.parent / "mlartifacts").as_uri())
    assert (tmp_path / "run" / "plots" / "waterfall_kl_mean.png").is_file()


# -- a real server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def logged(server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("logged")
    os.chdir(REPO)
    path = pipeline_file(tmp, LAYERS, tracking={"experiment": "qg-test"})
    data = yaml.safe_load(path.read_text())
    data["instruments"]["benchmarks"] = {"tasks": ["qg_cloze"], "limit": 20}
    data["gate"] = {"recovery": {"warn": 0.3, "fail": 0.1}}  # 20 documents resolve little; not gated here
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # the layer order is the ladder order
    code = run_pipeline(path, tmp / "run", "--tracking-uri", server.url)
    return {"code": code, "run_dir": tmp / "run", "pipeline": path, "state": TrackingState.load(tmp / "run")}


@pytest.mark.slow
def test_run_tree_params_metrics_steps_and_artifacts(server: MlflowServer, logged: dict[str, Any]) -> None:
    assert logged["code"] == 0
    state, run_dir = logged["state"], logged["run_dir"]
    report = json.loads((run_dir / "report.json").read_text())
    assert state.status == "logged" and state.uri == server.url
    client = _client(server.url)
    runs = _runs(server.url, "qg-test", f"tags.`qualgate.run_uid` = '{state.run_uid}'")
    [parent] = [r for r in runs if r.data.tags["qualgate.kind"] == "run"]
    assert parent.info.run_id == state.parent_run_id and parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert (
        tags["qualgate.pipeline"] == "t" and tags["qualgate.verdict"] == "pass" and tags["qualgate.complete"] == "true"
    )
    assert tags["git.commit"] == report["provenance"]["git"]["commit"] and tags["git.dirty"] in ("true", "false")
    assert len(tags["model.sha256"]) == 64 and len(tags["golden.sha256"]) == 64

    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(STACKS), "one nested child per stack, named by its layers"
    w8 = children["w8g128"]
    assert w8.data.params["layers.w8.bits"] == "8" and w8.data.params["layers.w8.method"] == "rtn"
    assert w8.data.tags["qualgate.verdict"] == "pass"
    stack = next(s for s in report["stacks"] if s["name"] == "w8g128")
    kl = stack["instruments"]["fidelity"]["kl_mean"]
    assert w8.data.metrics["fidelity/kl_mean"] == pytest.approx(kl["value"])
    assert w8.data.metrics["fidelity/kl_mean_low"] == pytest.approx(kl["low"])
    assert w8.data.metrics["fidelity/kl_mean_high"] == pytest.approx(kl["high"])
    spec = children["w8g128+spec-ngram4"]
    assert spec.data.metrics["equivalence/real_divergences"] == 0
    assert spec.data.metrics["equivalence/speculation/acceptance_rate"] > 0
    # The ladder position is the step: on each child, and as the parent's series along the ladder.
    [point] = client.get_metric_history(spec.info.run_id, "fidelity/kl_mean")
    assert point.step == 2
    ladder = client.get_metric_history(parent.info.run_id, "ladder/kl_mean")
    assert [m.step for m in sorted(ladder, key=lambda m: m.step)] == [0, 1, 2]
    assert children["spec-ngram4"].data.metrics["fidelity/kl_mean"] < 1e-6, "a lossless single layer"

    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.json", "summary.md", "junit.xml", "plots", "tables"} <= files
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/waterfall_kl_mean.png", "plots/kl_distribution.png"} <= plots
    downloaded = Path(client.download_artifacts(parent.info.run_id, "report.json", str(run_dir / "dl")))
    assert json.loads(downloaded.read_text()) == report
    table = json.loads(
        Path(client.download_artifacts(w8.info.run_id, "tables/fidelity_tokens.json", str(run_dir / "dl"))).read_text()
    )
    assert "kl" in table["columns"] and len(table["data"]) == stack["instruments"]["fidelity"]["n_tokens"]
    assert {a.path for a in client.list_artifacts(spec.info.run_id, "tables")} >= {
        "tables/divergences.json",
        "tables/benchmarks_qg_cloze.json",
        "tables/benchmark_flips.json",
    }
    task = next(t for t in stack["instruments"]["benchmarks"]["tasks"] if t["task"] == "qg_cloze")
    assert w8.data.metrics["benchmarks/qg_cloze/recovery_low"] == pytest.approx(task["recovery"]["low"])
    assert w8.data.metrics["benchmarks/qg_cloze/flips_b"] == task["flips_b"]
    datasets = {d.dataset.name: d.dataset.digest for d in parent.inputs.dataset_inputs}
    assert datasets["domain-text"] == report["provenance"]["golden"]["text"]["sha256"][:16] and "general" in datasets


@pytest.mark.slow
def test_sync_twice_creates_no_duplicates_and_replaces_a_partial_upload(
    server: MlflowServer, logged: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, state = logged["run_dir"], logged["state"]
    before = len(_runs(server.url, "qg-test"))
    assert main(["sync", str(run_dir)]) == 0
    assert "already there" in capsys.readouterr().out
    assert len(_runs(server.url, "qg-test")) == before

    # A partial upload (a sync that died half way) under a new uid is deleted and redone, once.
    report = json.loads((run_dir / "report.json").read_text())
    partial = TrackingState.new(state.started_ms)
    tracker = Tracker(server.url)
    experiment_id = tracker.experiment_id("qg-test")
    tracker._create(experiment_id, build_layout(report, partial.run_uid).parent, partial.started_ms)
    copy = run_dir.parent / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("records", "partial", "dl"))
    partial.uri, partial.experiment, partial.status = server.url, "qg-test", "failed"
    partial.save(copy)
    assert main(["sync", str(copy)]) == 0 and main(["sync", str(copy)]) == 0
    mine = _runs(server.url, "qg-test", f"tags.`qualgate.run_uid` = '{partial.run_uid}'")
    assert len([r for r in mine if r.data.tags["qualgate.kind"] == "run"]) == 1 and len(mine) == 1 + len(STACKS)
    assert all(r.data.tags.get("qualgate.complete") == "true" for r in mine if r.data.tags["qualgate.kind"] == "run")


@pytest.mark.slow
def test_compare_with_the_last_passing_run(
    server: MlflowServer, logged: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", str(logged["run_dir"])]) == 0, "the first run has nothing before it"
    assert "no earlier passing run" in capsys.readouterr().out
    # The same pipeline again (records reused, so the same numbers): a second, later MLflow run.
    shutil.copytree(logged["run_dir"] / "records", tmp_path / "again" / "records")
    shutil.copytree(logged["run_dir"] / "samples", tmp_path / "again" / "samples")
    assert run_pipeline(logged["pipeline"], tmp_path / "again", "--tracking-uri", server.url) == 0
    assert main(["compare", str(tmp_path / "again"), "--fail-on-change"]) == 0
    result = json.loads((tmp_path / "again" / "compare.json").read_text())
    assert result["previous_run_id"] in {
        logged["state"].parent_run_id,
        *(r.info.run_id for r in _runs(server.url, "qg-test")),
    }
    kl = [c for c in result["changes"] if c["metric"] == "kl_mean"]
    assert len(kl) == len(STACKS) and all(c["delta"] == 0 and not c["significant"] for c in kl)


@pytest.mark.slow
def test_killed_server_loses_nothing(tmp_path: Path) -> None:
    """The server dies while the run measures: the run finishes, says so (exit 3, the gate passed),
    and `qualgate sync` uploads it to a restarted server, once however often it is called."""
    first = MlflowServer(tmp_path / "server").start()
    # Two stacks are enough: the server dies after the first record, long before the report.
    path = pipeline_file(tmp_path, {"w8": LAYERS["w8"]}, stacks=[{"layers": ["w8"]}], tracking={"experiment": "killed"})
    out = tmp_path / "run"
    command = [sys.executable, "-m", "qualgate", "run", str(path), "--out", str(out), "--tracking-uri", first.url]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "records").glob("*.json")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    first.stop()  # mid-run: at least one unit finished, the report not yet written
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 3, (stdout, stderr)
    assert "tracking failed" in stderr and f"qualgate sync {out}" in stderr
    assert json.loads((out / "report.json").read_text())["verdict"] == "pass", "the gate's result is kept"
    state = TrackingState.load(out)
    assert state.status == "failed" and "unreachable" in (state.error or "")

    second = MlflowServer(tmp_path / "server", port=free_port()).start()  # same database, new address
    try:
        for _ in range(2):
            assert main(["sync", str(out), "--tracking-uri", second.url]) == 0
        runs = _runs(second.url, "killed")
        assert len([r for r in runs if r.data.tags["qualgate.kind"] == "run"]) == 1
        assert sorted(r.info.run_name for r in runs if r.data.tags["qualgate.kind"] != "run") == ["base", "w8g128"]
        assert TrackingState.load(out).status == "logged"
    finally:
        second.stop()


@pytest.mark.slow
def test_tracking_failure_never_hides_a_failed_gate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = pipeline_file(
        tmp_path, {"w2": {"kind": "weight_quant", "method": "rtn", "bits": 2}}, stacks=[{"layers": ["w2"]}]
    )
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert run_pipeline(path, tmp_path / "run", "--tracking-uri", unreachable) == 1
    err = capsys.readouterr().err
    assert f"tracking server {unreachable} is unreachable" in err and "qualgate sync" in err
    assert TrackingState.load(tmp_path / "run").status == "failed"


def test_sync_of_a_directory_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sync", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tracking.json is missing" in err and "qualgate run" in err


# -- the MLflow UI in headless Chromium ----------------------------------------------------------
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_mlflow_ui_compares_the_stacks(server: MlflowServer, logged: dict[str, Any]) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    state = logged["state"]
    children = _runs(server.url, "qg-test", f"tags.`mlflow.parentRunId` = '{state.parent_run_id}'")
    ids = json.dumps([r.info.run_id for r in children])
    url = (
        f"{server.url}/#/compare-runs?runs={urllib.parse.quote(ids)}"
        f"&experiments={urllib.parse.quote(json.dumps([state.experiment_id]))}"
    )
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]
    flags += ["--window-size=1600,2400", "--virtual-time-budget=30000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "mlflow-compare.html").write_text(dom)
    subprocess.run(
        [browser, *flags, f"--screenshot={ARTIFACTS / 'mlflow-compare.png'}", url], capture_output=True, timeout=180
    )
    assert f"Comparing {len(STACKS)} Runs" in dom
    for name in STACKS:
        assert name in dom, f"stack {name} is shown"
    assert "fidelity/kl_mean" in dom and "layers.w8.bits" in dom
    assert (ARTIFACTS / "mlflow-compare.png").stat().st_size > 10_000
