"""The Ray executor against the local one on the same pipeline: wall time, overhead per stack, and the
cost of one file round trip through the driver.

    python benchmarks/ray_executor.py [pipelines/nightly.yaml] [--out runs/bench-ray] [--address HOST:PORT]

Runs the pipeline cold with `--executor local`, then cold with `--executor ray` (a local Ray started by
qualgate, one CPU per stack actor, or the cluster at --address), checks that the two report.json files
are byte-identical, reruns both warm (every unit reused: what is left is scheduling, actor start-up and
file round trips), and times 500 RunFiles writes of 4 KB through the driver's file actor. Prints every
wall time, the ratio Ray / local, and the overhead per stack and per file call in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(pipeline: str, out: Path, executor: str, address: str | None) -> tuple[float, str]:
    command = [sys.executable, "-m", "qualgate", "run", pipeline, "--out", str(out), "--no-tracking"]
    command += ["--executor", executor] + (["--ray-address", address] if address else [])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        sys.exit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def file_round_trip_ms(address: str | None, calls: int = 500) -> tuple[float, float]:
    """Seconds to start (or join) Ray, and the mean milliseconds of one RemoteFiles.write (4 KB) from a
    worker through the driver's file actor."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from qualgate.executors.ray_worker import RemoteFiles, RunFilesActor

    started = time.perf_counter()
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="error")
    init = time.perf_counter() - started
    try:
        here = ray.get_runtime_context().get_node_id()
        root = Path("runs/bench-ray/files").resolve()
        files = (
            ray.remote(RunFilesActor)
            .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
            .remote(str(root))
        )

        @ray.remote(num_cpus=1)  # type: ignore[untyped-decorator]  # ray ships no stubs here
        def writer(actor: object) -> float:
            remote = RemoteFiles(actor)
            data = os.urandom(4096)
            remote.write("warm", data)
            started = time.perf_counter()
            for i in range(calls):
                remote.write(f"partial/x/{i:06d}.bin", data)
            return (time.perf_counter() - started) / calls * 1000

        ms: float = ray.get(writer.remote(files))
        shutil.rmtree(root, ignore_errors=True)
        return init, ms
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", nargs="?", default="pipelines/nightly.yaml")
    parser.add_argument("--out", default="runs/bench-ray")
    parser.add_argument("--address", default=None, help="a running Ray head; default: qualgate starts a local Ray")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    local_cold, _ = run(args.pipeline, out / "local", "local", None)
    ray_cold, output = run(args.pipeline, out / "ray", "ray", args.address)
    stacks = len(re.findall(r"^\[ray\] ", output, re.M))
    same = (out / "local" / "report.json").read_bytes() == (out / "ray" / "report.json").read_bytes()
    local_warm, _ = run(args.pipeline, out / "local", "local", None)
    ray_warm, _ = run(args.pipeline, out / "ray", "ray", args.address)
    print(f"pipeline {args.pipeline}: {stacks} stacks; report.json byte-identical: {same}")
    print(f"cold  local {local_cold:8.1f} s   ray {ray_cold:8.1f} s   ray/local {ray_cold / local_cold:.3f}")
    print(f"warm  local {local_warm:8.1f} s   ray {ray_warm:8.1f} s   (every unit reused)")
    init, ms = file_round_trip_ms(args.address)
    per_stack = (ray_warm - local_warm - init) / stacks * 1000
    print(f"Ray start-up ({'join ' + args.address if args.address else 'local ray.init'}): {init:.1f} s")
    print(f"overhead per stack ((warm ray - warm local - start-up) / stacks): {per_stack:.0f} ms")
    print(f"one 4 KB file write through the driver: {ms:.2f} ms")
    if not same:
        sys.exit("the Ray report differs from the local one")


if __name__ == "__main__":
    main()
