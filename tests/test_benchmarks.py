"""The benchmarks instrument: paired statistics by hand, lm-eval parity, prompt hygiene, the bundled
tasks, and the gate on a 2-bit stack (flips and a significant McNemar) against an 8-bit one (none)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import REPO, pipeline_file, run_pipeline

from qualgate.errors import ConfigError
from qualgate.fixtures import bundled_model_path
from qualgate.instruments.benchmarks.config import BenchmarksConfig
from qualgate.instruments.benchmarks.paired import Sample, compare_task, holm, mcnemar_exact, paired_difference

TASKS = ["qg_cloze", "qg_next_name", "qg_word_order"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # task data files are relative to the working directory, as in lm-eval


def _side(correct: list[int], prompt: str = "p") -> dict[int, Sample]:
    return {i: Sample(i, float(c), f"{prompt}{i}", str(c)) for i, c in enumerate(correct)}


# -- paired statistics, by hand --------------------------------------------------------------------
def test_flips_difference_recovery_and_mcnemar_by_hand() -> None:
    # 10 documents: baseline right on 0-5; candidate loses 0, 1, 2 (b = 3) and gains 7 (c = 1).
    baseline = _side([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    candidate = _side([0, 0, 0, 1, 1, 1, 0, 1, 0, 0])
    result = compare_task("t", "acc", baseline, candidate)
    assert (result.b, result.c, result.n) == (3, 1, 10)
    assert result.flip_rate == pytest.approx(0.4)
    d = (1 - 3) / 10
    se = math.sqrt(((3 + 1) / 10 - d * d) / 10)
    assert result.difference.value == pytest.approx(d) and result.difference.se == pytest.approx(se)
    assert result.difference.low == pytest.approx(d - 1.959964 * se, rel=1e-5)
    assert result.accuracy_baseline.value == 0.6 and result.accuracy_candidate.value == 0.4
    assert result.accuracy_baseline.se == pytest.approx(math.sqrt(0.6 * 0.4 / 9))
    assert result.recovery.value == pytest.approx(0.4 / 0.6)
    assert result.recovery.low == pytest.approx(1 + result.difference.low / 0.6)
    # McNemar exact: two-sided binomial, 3 of 4 at 1/2: P(X<=1) + P(X>=3) = (1 + 4 + 4 + 1) / 16
    assert result.mcnemar_p == pytest.approx(10 / 16)
    assert [f["doc_id"] for f in result.flips] == [0, 1, 2, 7]
    assert [f["kind"] for f in result.flips] == ["b", "b", "b", "c"]


def test_mcnemar_and_holm_reference_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(35, 14) == pytest.approx(0.0038, abs=2e-4)
    # Holm: sorted p 0.01, 0.02, 0.04 (m = 3) -> 0.03, 0.04, 0.04 (monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_no_flips_still_carry_an_interval() -> None:
    """The paired SE is 0 when nothing flipped; a zero-width interval would certify any n."""
    d = paired_difference(0, 0, 100)
    assert d.value == 0 and d.low == pytest.approx(-(1 - 0.025 ** (1 / 100))) and d.high == -d.low
    assert 0.036 < d.high < 0.037
    assert paired_difference(0, 0, 10_000).high < paired_difference(0, 0, 100).high


def test_prompt_drift_and_non_binary_metrics_are_refused() -> None:
    with pytest.raises(ConfigError, match="rendered prompt of 1 documents differs"):
        compare_task("t", "acc", _side([1, 0]), {**_side([1, 0]), 1: Sample(1, 0.0, "other")})
    with pytest.raises(ConfigError, match="not 0/1 per document"):
        compare_task("t", "bleu", {0: Sample(0, 0.5, "a0"), 1: Sample(1, 1.0, "a1")}, _side([1, 1], "a"))
    with pytest.raises(ConfigError, match="different documents"):
        compare_task("t", "acc", _side([1, 0, 1]), _side([1, 0]))


# -- lm-eval through a qualgate session ---------------------------------------------------------------
def _evaluate(lm: Any, tasks: list[str], limit: int | None = None) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=str(REPO / "evals" / "tasks"), include_defaults=False)
    return simple_evaluate(  # type: ignore[no-any-return]
        model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0
    )


@pytest.mark.slow
def test_multiple_choice_metrics_equal_lm_evals_own_hf_model(base_session: Any) -> None:
    """acc and acc_norm (lm-eval's built-in multiple-choice metrics) through qualgate equal those of
    lm-eval's HF model class on the same model, document by document."""
    from lm_eval.models.huggingface import HFLM

    from qualgate.instruments.benchmarks.lm import QualgateLM

    theirs = _evaluate(
        HFLM(pretrained=str(bundled_model_path("target")), batch_size=1, device="cpu", dtype="float32"),
        ["qg_cloze", "qg_word_order"],
        limit=60,
    )
    ours = _evaluate(QualgateLM(base_session), ["qg_cloze", "qg_word_order"], limit=60)
    for task in ("qg_cloze", "qg_word_order"):
        for metric in ("acc,none", "acc_norm,none"):
            if metric in theirs["results"][task]:
                assert ours["results"][task][metric] == theirs["results"][task][metric], (task, metric)
        by_doc = {s["doc_id"]: s for s in theirs["samples"][task]}
        for sample in ours["samples"][task]:
            other = by_doc[sample["doc_id"]]
            assert sample["acc"] == other["acc"] and sample["arguments"] == other["arguments"]
            ll_ours = [float(r[0]) for r in sample["filtered_resps"]]
            ll_theirs = [float(r[0]) for r in other["filtered_resps"]]
            assert ll_ours == pytest.approx(ll_theirs, rel=1e-4, abs=1e-4)


def test_one_bos_only(base_session: Any) -> None:
    from qualgate.instruments.benchmarks.lm import QualgateLM

    lm = QualgateLM(base_session)
    bos = base_session.bos_token_id
    assert lm.tok_encode("import os") == [bos, *base_session.encode("import os", add_bos=False)]
    assert lm.tok_encode("<s>import os") == lm.tok_encode("import os"), "a rendered BOS is not doubled"
    assert lm.tok_encode("import os", add_special_tokens=False)[0] != bos
    context, continuation = lm._encode_pair("The value of", " x")
    assert context.count(bos) == 1 and context[0] == bos and bos not in continuation
    lm.scored_sequences = [[bos, 5, 6], [bos, 7, bos, 8]]
    with pytest.raises(ConfigError, match="1 of 2 benchmark requests carry a BOS token after the first position"):
        lm.check_hygiene()


@pytest.mark.slow
def test_bundled_tasks_score_clearly_above_chance(base_session: Any) -> None:
    from qualgate.instruments.benchmarks import run as bench

    config = BenchmarksConfig(tasks=TASKS)
    results = bench.run_tasks(base_session, config, bench.task_manager(config, "test"), None)
    chance = {"qg_cloze": 0.25, "qg_word_order": 0.5, "qg_next_name": 1 / base_session.vocab_size}
    for task, result in results.items():
        correct = np.array([s.correct for s in result.samples.values()])
        low = correct.mean() - 1.96 * correct.std(ddof=1) / math.sqrt(correct.size)
        assert low > chance[task] + 0.05, (task, correct.mean())
    assert len({s.prompt_hash for s in results["qg_cloze"].samples.values()}) == len(results["qg_cloze"].samples)


# -- the instrument in a pipeline ----------------------------------------------------------------------
@pytest.mark.slow
def test_two_bit_flips_significantly_eight_bit_does_not(tmp_path: Path) -> None:
    layers = {
        "w8": {"kind": "weight_quant", "method": "rtn", "bits": 8},
        "w2": {"kind": "weight_quant", "method": "rtn", "bits": 2, "group_size": None},
    }
    path = pipeline_file(tmp_path, layers, stacks=[{"layers": []}, {"layers": ["w8"]}, {"layers": ["w2"]}])
    data = yaml.safe_load(path.read_text())
    # One task: 1,000 paired documents resolve the 2-bit model's small loss (35 vs 14 flips measured);
    # a second task would only add requests (Holm across tasks is covered by hand above).
    data["instruments"] = {"benchmarks": {"tasks": ["qg_word_order"]}}
    data.pop("gate", None)  # the default tiers: recovery warn 0.99, fail 0.97
    data["tracking"] = {"enabled": False}
    path.write_text(yaml.safe_dump(data))
    assert run_pipeline(path, tmp_path / "run") == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    stacks = {s["name"]: s for s in report["stacks"]}
    tasks = {
        name: {t["task"]: t for t in stacks[name]["instruments"]["benchmarks"]["tasks"]} for name in ("w8g128", "w2")
    }
    order_w2, order_w8 = tasks["w2"]["qg_word_order"], tasks["w8g128"]["qg_word_order"]
    assert order_w2["flips_b"] > 2 * order_w2["flips_c"] and order_w2["holm_p"] < 0.05, order_w2
    assert order_w8["holm_p"] > 0.5 and order_w8["flips_b"] + order_w8["flips_c"] <= 2, order_w8
    assert order_w2["recovery"]["low"] < 0.97 and stacks["w2"]["verdict"] == "fail"
    assert any("benchmarks.qg_word_order.recovery lower bound" in r for r in stacks["w2"]["reasons"])
    flips = stacks["w2"]["instruments"]["benchmarks"]["flips"]["qg_word_order"]
    assert len(flips) == order_w2["flips_b"] + order_w2["flips_c"]
    assert {"doc_id", "kind", "baseline", "candidate"} <= set(flips[0]) and flips[0]["baseline"].startswith("choice")
    samples = json.loads((tmp_path / "run" / stacks["w2"]["instruments"]["benchmarks"]["samples"]).read_text())
    assert [t["task"] for t in samples] == ["qg_word_order"] and len(samples[0]["samples"]) == 1000
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "### Benchmarks (paired with the baseline, per document)" in summary and "| `w2` | qg_word_order" in summary


def test_unknown_task_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = pipeline_file(
        tmp_path, {"w8": {"kind": "weight_quant", "method": "rtn", "bits": 8}}, stacks=[{"layers": ["w8"]}]
    )
    data = yaml.safe_load(path.read_text())
    data["instruments"] = {"benchmarks": {"tasks": ["qg_clozee"], "include": ["evals/tasks"]}}
    path.write_text(yaml.safe_dump(data))
    assert run_pipeline(path, tmp_path / "run", "--no-tracking") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown task 'qg_clozee'" in err and "qg_cloze" in err
