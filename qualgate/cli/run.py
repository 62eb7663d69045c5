"""The main job: `qualgate run`, `qualgate validate`, `qualgate report`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from qualgate import report as publish
from qualgate.config import Pipeline, load_pipeline
from qualgate.errors import EXIT_GATE_FAILED, EXIT_INFRASTRUCTURE, EXIT_PASS, ConfigError
from qualgate.preflight import preflight
from qualgate.progress import progress
from qualgate.run.runner import Runner
from qualgate.run_lock import LOCK_FILE, RunLock
from qualgate.tracking.finish import track_run
from qualgate.tracking.state import now_ms

DEFAULT_PIPELINE = "pipelines/demo.yaml"
# The verdict's exit code. inconclusive and error are judged into pass/warn/fail by the gate's policy
# before they reach a report's verdict; listed so a report never maps to a KeyError.
EXIT = {
    "pass": EXIT_PASS,
    "inconclusive": EXIT_PASS,
    "warn": EXIT_PASS,
    "fail": EXIT_GATE_FAILED,
    "error": EXIT_GATE_FAILED,
}


def _fresh(out: Path) -> None:
    """--fresh: discard everything in the run directory but the lock this run holds."""
    for entry in out.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _tracking_uri(pipeline: Pipeline, cli_uri: str | None, disabled: bool, where: str) -> None:
    if disabled or not pipeline.tracking.enabled:
        return
    from qualgate.tracking.mlflow_log import check_uri, resolve_uri

    check_uri(resolve_uri(cli_uri, pipeline.tracking.uri), "--tracking-uri" if cli_uri else f"{where}: tracking URI")


def _with_executor(pipeline: Pipeline, name: str | None, address: str | None) -> Pipeline:
    """--executor and --ray-address win over the pipeline's `executor:` section."""
    if address and (name or pipeline.executor.name) != "ray":
        raise ConfigError("--ray-address needs the ray executor; add --executor ray")
    update: dict[str, Any] = {}
    if name:
        update["name"] = name
    if address:
        update["address"] = address
    if not update:
        return pipeline
    return pipeline.model_copy(update={"executor": pipeline.executor.model_copy(update=update)})


def cmd_run(args: argparse.Namespace) -> int:
    path = Path(args.pipeline)
    args.log_dir = args.out  # an internal error's traceback goes under the run directory
    pipeline = _with_executor(load_pipeline(path), args.executor, args.ray_address)
    out = Path(args.out or f"runs/{pipeline.name}")
    args.log_dir = out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a run directory; pass a directory path")
    if args.resume and not (out / "records").is_dir():
        raise ConfigError(f"--resume: {out} holds no earlier run; drop --resume to start one")
    # Every check that needs no model, before the run directory is touched: exit 2 in seconds.
    checked = preflight(pipeline, str(path))
    _tracking_uri(pipeline, args.tracking_uri, args.no_tracking, str(path))

    def bar(label: str) -> Any:
        context = progress(label)
        callback = context.__enter__()

        def update(done: int, total: int) -> None:
            callback(done, total)
            if done == total:
                context.__exit__(None, None, None)

        return update

    started = now_ms()
    with RunLock(out):
        if args.fresh:
            _fresh(out)
        publish.supersede(out)
        runner = Runner(pipeline, str(path), out, on_progress=bar)
        result = runner.run(checked)  # managed engine servers stop with it, whatever ends it
        publish.write(result, out)
    publish.print_report(result)
    print(
        f"{len(runner.planned)} stacks; {runner.computed} units measured, {runner.reused} reused; "
        f"report: {out / 'report.json'}"
    )
    tracked = track_run(out, result, pipeline, started, args.tracking_uri, args.no_tracking)
    gate = EXIT[result["verdict"]]
    # A tracking failure is exit 3 only when the gate itself passed: a failed gate must read as failed.
    return gate if gate or tracked else EXIT_INFRASTRUCTURE


def cmd_validate(args: argparse.Namespace) -> int:
    where = args.pipeline
    pipeline = load_pipeline(Path(where))
    stacks = preflight(pipeline, where).planned
    _tracking_uri(pipeline, None, False, where)
    names = [f"{p.stack.name} (control)" if p.role == "control" else p.stack.name for p in stacks]
    print(f"{where}: valid; {len(stacks)} stacks: " + ", ".join(names))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    result = publish.read(Path(args.run_dir))
    publish.print_report(result)
    return EXIT[result["verdict"]]


def add_commands(commands: Any) -> None:
    run = commands.add_parser("run", help="evaluate a pipeline and gate it (default: pipelines/demo.yaml)")
    run.add_argument("pipeline", nargs="?", default=DEFAULT_PIPELINE)
    run.add_argument("--out", default=None, help="run directory (default: runs/<pipeline name>)")
    run.add_argument(
        "--resume", action="store_true", help="continue an interrupted run (rerunning the same command does too)"
    )
    run.add_argument("--fresh", action="store_true", help="discard earlier records in the run directory")
    run.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: the pipeline's tracking.uri, else MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (the run directory is kept)")
    run.add_argument(
        "--executor",
        choices=["local", "ray"],
        default=None,
        help="where the stacks are measured: this process (local, the default) or a Ray cluster (qualgate[ray])",
    )
    run.add_argument(
        "--ray-address", default=None, help="the Ray head, host:port (default: executor.address, else a local Ray)"
    )
    run.set_defaults(func=cmd_run)
    val = commands.add_parser("validate", help="check a pipeline file and list the stacks it plans")
    val.add_argument("pipeline")
    val.set_defaults(func=cmd_validate)
    rep = commands.add_parser("report", help="print the report of a finished run and exit with its verdict")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)
