"""scripts/gpu-check: skipped without a GPU, and its agreement path run on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

SCRIPT = REPO / "scripts" / "gpu-check"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script runs for real")
def test_without_a_gpu_it_says_skipped_and_exits_0() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0 and done.stdout.startswith("no GPU: skipped"), done.stdout + done.stderr


@pytest.mark.slow
def test_the_baseline_agreement_path_on_the_cpu(tmp_path: Path) -> None:
    """Both checks the script makes on a GPU, on the CPU: HF against the golden, and vLLM's CPU build
    against it (a server the script starts, when the vLLM environment exists, as in CI)."""
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--no-ladder", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout[done.stdout.index("check ") :].splitlines()
    assert table[0].split(" | ")[0].strip() == "check" and len(table) == 4, table
    row = dict(zip(["check", "kl", "top1", "verdict"], [c.strip() for c in table[2].split(" | ")], strict=True))
    assert row["check"] == "CPU golden vs HF on cpu" and row["verdict"] == "agree", row
    assert float(row["kl"].split()[0]) < 1e-4 and float(row["top1"].split()[0]) >= 0.999
    vllm = dict(zip(["check", "kl", "top1", "verdict"], [c.strip() for c in table[3].split(" | ")], strict=True))
    if (REPO / ".venv-vllm" / "bin" / "python").is_file():
        assert vllm["check"] == "HF golden vs vLLM" and vllm["verdict"] == "agree", vllm
        assert (tmp_path / "baseline-vllm" / "report.json").is_file()
    else:
        assert vllm["verdict"].startswith("skipped (no vLLM environment"), vllm
