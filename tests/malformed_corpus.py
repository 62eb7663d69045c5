"""The malformed-input corpus: one YAML file per case in tests/malformed/, each a user mistake or an
environment fault, with the exit code and the one-line message qualgate must answer it with.

A case file holds:
  why:       what a user did (one line)
  command:   argv after `qualgate` (default: run {pipeline} --out {dir}/out --no-tracking)
  pipeline:  keys deep-merged over BASE (`~` deletes a key); or pipeline_text: the whole file, raw
  encoding:  how pipeline_text is written (default utf-8; latin-1 makes a non-UTF-8 file)
  files:     {path under {dir}: text}; files_latin1: the same, written as Latin-1
  golden:    damage done to a copy of golden/bundled-target at {dir}/golden (the pipeline then uses it)
  fault:     disk-full[-after:N] | lock-held | hide-module:<module>
  exit:      the expected exit code
  message:   a regular expression the error line must match
  absent:    strings that must not appear in any output (secrets)
`{dir}` in any string is the case's temporary directory. `python tests/malformed_corpus.py` prints
each case's exit code and first error line: the table in docs/exit-codes.md.
"""

from __future__ import annotations

import copy
import errno
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "malformed"
BASE: dict[str, Any] = {
    "version": 1,
    "name": "corpus",
    "model": {"path": "bundled:target", "dtype": "float32"},
    "backend": {"name": "hf"},
    "layers": {"w8": {"kind": "weight_quant", "method": "rtn", "bits": 8, "group_size": 64}},
    "stacks": [{"name": "w8", "layers": ["w8"]}],
    "instruments": {
        "fidelity": {"golden": "golden/bundled-target"},
        "equivalence": {"prompts": ["evals/prompts/general.jsonl"], "max_new_tokens": 4},
    },
    "tracking": {"enabled": False},
}
DEFAULT_COMMAND = ["run", "{pipeline}", "--out", "{dir}/out", "--no-tracking"]


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def cases() -> list[Path]:
    return sorted(CASES.glob("*.yaml"))


def _fill(value: Any, directory: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{dir}", str(directory))
    if isinstance(value, dict):
        return {k: _fill(v, directory) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, directory) for v in value]
    return value


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _damage_golden(target: Path, ops: list[dict[str, Any]]) -> None:
    shutil.copytree(REPO / "golden" / "bundled-target", target)
    for op in ops:
        if "truncate" in op:
            path = target / op["truncate"]
            path.write_bytes(path.read_bytes()[: op["bytes"]])
        elif "corrupt" in op:
            path = target / op["corrupt"]
            data = bytearray(path.read_bytes())
            for i in range(op["at"], op["at"] + 64):
                data[i] ^= 0xFF
            path.write_bytes(bytes(data))
        elif "delete" in op:
            (target / op["delete"]).unlink()
        elif "write" in op:
            (target / op["write"]).write_text(op["text"], encoding="utf-8")
        elif "manifest" in op:
            path = target / "manifest.json"
            path.write_text(json.dumps(_merge(json.loads(path.read_text()), op["manifest"])), encoding="utf-8")
        elif "arrays" in op:
            with np.load(target / "scores.npz") as data:
                arrays = {k: data[k] for k in data.files}
            for name, change in op["arrays"].items():
                if change == "drop":
                    arrays.pop(name)
                else:
                    arrays[name] = arrays[name][:, : int(change)]
            np.savez_compressed(target / "scores.npz", **arrays)
        else:
            raise ValueError(f"unknown golden op {op}")


def prepare(case: dict[str, Any], directory: Path) -> list[str]:
    """Write the case's files into `directory`; the argv to run."""
    directory.mkdir(parents=True, exist_ok=True)
    case = _fill(case, directory)
    for name, text in (case.get("files") or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text, encoding="utf-8")
    for name, text in (case.get("files_latin1") or {}).items():
        (directory / name).write_bytes(text.encode("latin-1"))
    pipeline_path = directory / "pipeline.yaml"
    if "pipeline_text" in case:
        pipeline_path.write_bytes(case["pipeline_text"].encode(case.get("encoding", "utf-8")))
    else:
        pipeline = _merge(BASE, case.get("pipeline") or {})
        if "golden" in case:
            _damage_golden(directory / "golden", case["golden"])
            pipeline["instruments"]["fidelity"]["golden"] = str(directory / "golden")
        pipeline_path.write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    command = case.get("command") or DEFAULT_COMMAND
    return [str(part).replace("{pipeline}", str(pipeline_path)) for part in _fill(command, directory)]


@contextmanager
def fault(name: str | None, directory: Path) -> Iterator[None]:
    """An environment fault for the duration of one command."""
    saved_fsync, saved_find = os.fsync, importlib.util.find_spec
    try:
        if name and name.startswith("disk-full"):
            # disk-full: the first fsync fails; disk-full-after:N: the disk fills after N whole writes.
            room = [int(name.partition(":")[2] or 0)]

            def full(fd: int) -> None:
                if room[0] <= 0:
                    raise OSError(errno.ENOSPC, "No space left on device")
                room[0] -= 1
                saved_fsync(fd)

            os.fsync = full
        elif name == "lock-held":
            # PID 1 is alive on every host: another run holds this run directory.
            (directory / "out").mkdir(parents=True, exist_ok=True)
            (directory / "out" / ".qualgate.lock").write_text(f"1 {os.uname().nodename}\n")
        elif name and name.startswith("hide-module:"):
            hidden = name.split(":", 1)[1]

            def find(module: str, *args: Any, **kwargs: Any) -> Any:
                return None if module.split(".")[0] == hidden else saved_find(module, *args, **kwargs)

            importlib.util.find_spec = find  # type: ignore[assignment]
        elif name:
            raise ValueError(f"unknown fault {name}")
        yield
    finally:
        os.fsync, importlib.util.find_spec = saved_fsync, saved_find


def run_case(path: Path, directory: Path) -> Outcome:
    """Run one case in this process, from the repository root, capturing what a user would see."""
    from qualgate.cli import main

    case = yaml.safe_load(path.read_text(encoding="utf-8"))
    argv = prepare(case, directory)
    out, err = StringIO(), StringIO()
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        with fault(case.get("fault"), directory), redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's own exit
                code = int(exc.code or 0)
            except BaseException as exc:  # the "before" table records what escaped main()
                import traceback

                traceback.print_exc()
                code = -1 if not isinstance(exc, Exception) else 1
    finally:
        os.chdir(cwd)
    return Outcome(code, out.getvalue(), err.getvalue())


def error_lines(outcome: Outcome) -> list[str]:
    return [line for line in outcome.err.splitlines() if line.startswith("qualgate")]


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # plug-in layers of the corpus
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for case_path in cases():
        with tempfile.TemporaryDirectory() as tmp:
            result = run_case(case_path, Path(tmp))
        first = (error_lines(result) or [line for line in result.err.splitlines() if line.strip()] or [""])[-1]
        traceback_seen = "Traceback" in result.err
        print(f"{case_path.stem}\t{result.code}\t{'traceback' if traceback_seen else 'one line'}\t{first[:150]}")
        sys.stdout.flush()
