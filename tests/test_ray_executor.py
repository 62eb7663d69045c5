"""The Ray executor on a real two-node cluster on this machine: the report byte-identical to a local
run's, a worker SIGKILLed mid-stack retried, a SIGKILLed driver resumed by rerunning the command, an
unreachable head, a stack that fails only on its worker, and the optional extra."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from helpers import REPO, run_pipeline

pytest.importorskip("ray")
from ray_cluster import RayCluster

T = TypeVar("T")

LAYERS = {
    "w8": {"kind": "weight_quant", "method": "rtn", "bits": 8},
    "w4": {"kind": "weight_quant", "method": "rtn", "bits": 4, "group_size": 64},
    # Valid to every check that needs no model; the 256-wide projections refuse it when the stack loads.
    "bad": {"kind": "weight_quant", "method": "rtn", "bits": 4, "group_size": 48},
}


def pipeline(
    tmp: Path, stacks: list[list[str]], golden: Path, name: str = "ray", executor: dict[str, object] | None = None
) -> Path:
    """Fidelity on the 6-chunk golden: the checks are about where and how the work ran, not its intervals."""
    data = {
        "version": 1,
        "name": name,
        "model": {"path": "bundled:target"},
        # One torch thread in the local run and in every stack actor: two actors on two cores, each with
        # the driver's two threads, would fight over the cores (and one count keeps the numbers identical).
        "backend": {"name": "hf", "options": {"threads": 1}},
        "layers": LAYERS,
        "stacks": [{"layers": s} for s in stacks],
        "instruments": {"fidelity": {"golden": str(golden)}},
        **({"executor": executor} if executor else {}),
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


STACKS = [[], ["w8"], ["w4"]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    found = RayCluster().start()
    yield found
    found.stop()


@pytest.fixture(scope="module")
def local_report(tmp_path_factory: pytest.TempPathFactory, small_golden: Path) -> bytes:
    """The reference: the same pipeline, measured in this process by the local executor."""
    import torch

    tmp = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()  # the backend's threads option sets this process's count: restore it
    try:
        assert run_pipeline(pipeline(tmp, STACKS, small_golden), tmp / "run", "--no-tracking") in (0, 1)
    finally:
        torch.set_num_threads(threads)
    return (tmp / "run" / "report.json").read_bytes()


def start(path: Path, out: Path, cluster: RayCluster, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "qualgate", "run", str(path), "--out", str(out), "--executor", "ray"]
    return subprocess.Popen(
        [*command, "--ray-address", cluster.address, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def ray_lines(output: str) -> list[re.Match[str]]:
    pattern = r"\[ray\] (\d+)/(\d+) stack (\S+) on node (\w+) \(host \S+, pid (\d+)\): (.*)"
    return list(re.finditer(pattern, output))


def wait_for(condition: Callable[[], T | None], timeout: float = 120) -> T:
    """Poll until `condition()` is truthy and return its value. A stack's partial directory is removed
    the moment the stack finishes, so a glob can race with that removal: it only means "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except FileNotFoundError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def checkpointed_worker(out: Path) -> int | None:
    """A measuring worker's pid once the baseline is recorded and a layered stack has checkpointed a chunk."""
    if not any((out / "records").glob("*.json")) or not any((out / "partial").glob("*/*.npz")):
        return None
    workers = measuring_workers()
    return workers[0] if workers else None


def measuring_workers() -> list[int]:
    """Stack actors in the middle of a call (Ray titles the process `ray::StackWorker.measure`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if title.startswith(b"ray::StackWorker.measure"):
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_ray_run_is_byte_identical_spread_over_both_nodes_and_tagged(
    tmp_path: Path, cluster: RayCluster, local_report: bytes, small_golden: Path
) -> None:
    out = tmp_path / "run"
    code, output = finish(start(pipeline(tmp_path, STACKS, small_golden), out, cluster))
    assert code in (0, 1) and "Traceback" not in output, output[-3000:]  # the verdict: the report, compared below
    assert (out / "report.json").read_bytes() == local_report
    lines = ray_lines(output)
    assert sorted(m[3] for m in lines) == ["base", "w4g64", "w8g128"] and lines[0][3] == "base", output[-3000:]
    assert [m[1] for m in lines] == ["1", "2", "3"] and all(m[2] == "3" for m in lines)
    nodes = set(cluster.nodes())
    placement = json.loads((out / "executor.json").read_text())
    assert placement["executor"] == "ray" and {m[4] for m in lines} <= nodes
    # The two layered stacks run at once, one CPU each: one on each node.
    assert placement["stacks"]["w8g128"]["node"] != placement["stacks"]["w4g64"]["node"]
    assert "3 stacks; 3 units measured, 0 reused" in output
    # MLflow gets the runs a local run logs, each stack tagged with the executor and its node.
    from mlflow.tracking import MlflowClient

    uid = json.loads((out / "tracking.json").read_text())["run_uid"]
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], f"tags.`qualgate.run_uid` = '{uid}'"
    )
    tags = {r.data.tags["qualgate.kind"] + ":" + r.data.tags.get("qualgate.stack", ""): r.data.tags for r in runs}
    assert set(tags) == {"run:", "stack:base", "stack:w8g128", "stack:w4g64"}
    assert all(t["qualgate.executor"] == "ray" for t in tags.values())
    assert tags["stack:w4g64"]["qualgate.node"].split()[0] == placement["stacks"]["w4g64"]["node"]


@pytest.mark.slow
def test_a_worker_killed_mid_stack_is_retried_and_the_report_is_unchanged(
    tmp_path: Path, cluster: RayCluster, local_report: bytes, small_golden: Path
) -> None:
    out = tmp_path / "run"
    proc = start(pipeline(tmp_path, STACKS, small_golden), out, cluster, "--no-tracking")
    # Once the baseline is in and a layered stack has checkpointed a chunk: SIGKILL its worker.
    killed = wait_for(lambda: checkpointed_worker(out))
    os.kill(killed, signal.SIGKILL)
    code, output = finish(proc)
    assert code in (0, 1) and "Traceback" not in output, output[-3000:]  # the verdict: the report, compared below
    assert (out / "report.json").read_bytes() == local_report
    lines = ray_lines(output)
    assert len(lines) == 3 and killed not in {int(m[5]) for m in lines}, "the killed worker's stack ran again"


@pytest.mark.slow
def test_a_worker_lost_with_no_restarts_left_is_replaced_by_the_driver(
    tmp_path: Path, cluster: RayCluster, local_report: bytes, small_golden: Path
) -> None:
    """Ray may not restart the actor (max_restarts: 0): the driver measures the stack on a new worker,
    which reuses the lost one's checkpoints, and the report is still the local run's."""
    executor = {"name": "ray", "max_restarts": 0, "max_task_retries": 1}
    out = tmp_path / "run"
    proc = start(pipeline(tmp_path, STACKS, small_golden, executor=executor), out, cluster, "--no-tracking")
    killed = wait_for(lambda: checkpointed_worker(out))
    os.kill(killed, signal.SIGKILL)
    code, output = finish(proc)
    assert code in (0, 1) and "Traceback" not in output, output[-3000:]
    assert re.search(r"its worker was lost \(\w+\); retrying on a new worker \(attempt 2/2\)", output), output[-3000:]
    assert (out / "report.json").read_bytes() == local_report


@pytest.mark.slow
def test_a_killed_driver_resumes_by_rerunning_the_command(
    tmp_path: Path, cluster: RayCluster, local_report: bytes, small_golden: Path
) -> None:
    path, out = pipeline(tmp_path, STACKS, small_golden), tmp_path / "run"
    proc = start(path, out, cluster, "--no-tracking")
    wait_for(lambda: len(list((out / "records").glob("*.json"))) >= 2)
    proc.kill()
    proc.communicate()
    code, output = finish(start(path, out, cluster, "--no-tracking"))
    assert code in (0, 1) and "Traceback" not in output, output[-3000:]  # the verdict: the report, compared below
    assert (out / "report.json").read_bytes() == local_report
    measured, reused = map(int, re.search(r"(\d+) units measured, (\d+) reused; report", output).groups())  # type: ignore[union-attr]
    assert reused >= 2 and measured + reused == 3, output[-2000:]


@pytest.mark.slow
def test_a_stack_failing_on_its_worker_is_reported_and_the_others_finish(
    tmp_path: Path, cluster: RayCluster, small_golden: Path
) -> None:
    path, out = pipeline(tmp_path, [[], ["w8"], ["bad"]], small_golden, name="rayfail"), tmp_path / "run"
    code, output = finish(start(path, out, cluster, "--no-tracking"))
    assert code == 2, output[-3000:]
    error = [line for line in output.splitlines() if line.startswith("qualgate: error:")]
    assert len(error) == 1 and "1 of 3 stacks failed on the Ray cluster" in error[0], output[-3000:]
    assert "w4g48: weight_quant/rtn: group_size 48 does not divide" in error[0] and "rerun the same command" in error[0]
    assert "Traceback" not in output
    # The two good stacks are in the store: fixing the layer measures only it.
    assert len(list((out / "records").glob("*.json"))) == 2
    assert not (out / "report.json").exists()


def test_an_unreachable_head_is_exit_3_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], small_golden: Path
) -> None:
    from server_process import free_port

    address = f"127.0.0.1:{free_port()}"
    path = pipeline(tmp_path, [[]], small_golden)
    assert run_pipeline(path, tmp_path / "run", "--no-tracking", "--executor", "ray", "--ray-address", address) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"the Ray head at {address} is unreachable" in err and "ray start --head" in err


def test_without_the_extra_ray_is_exit_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, small_golden: Path
) -> None:
    import importlib.util

    from qualgate import requirements

    real = importlib.util.find_spec
    monkeypatch.setattr(requirements.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    assert run_pipeline(pipeline(tmp_path, [[]], small_golden), tmp_path / "run", "--executor", "ray") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'qualgate[ray]'" in err and "executor 'ray'" in err


def test_executor_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str], small_golden: Path) -> None:
    from qualgate.cli import main

    path = pipeline(tmp_path, [[]], small_golden)
    data = yaml.safe_load(path.read_text())
    data["executor"] = {"name": "ray", "num_cpu": 2}
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "num_cpu" in err and "num_cpus" in err and err.count("\n") == 0
    assert run_pipeline(pipeline(tmp_path, [[]], small_golden), tmp_path / "run", "--ray-address", "127.0.0.1:1") == 2
    assert "--ray-address needs the ray executor" in capsys.readouterr().err
