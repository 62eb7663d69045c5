"""The bundled judge's tie stage (qualgate/fixtures/judge_ties.py): near-tie branches learned after stage 1,
and the judge as the interpolation of the two stages' weights."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from qualgate.fixtures import MODELS_DIR, model_card
from qualgate.fixtures.judge_finetune import Example, JudgeSettings, examples
from qualgate.fixtures.judge_pairs import Pair
from qualgate.fixtures.judge_ties import TieStage, interpolated, tie_stage

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bundled() -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(MODELS_DIR / "tokenizer")
    return (
        tokenizer,
        LlamaForCausalLM.from_pretrained(MODELS_DIR / "target"),
        LlamaForCausalLM.from_pretrained(MODELS_DIR / "judge"),
    )


def weights(model: Any) -> dict[str, Any]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_interpolated_weights_lie_between_the_two_models(bundled: tuple[Any, Any, Any]) -> None:
    _, start, _ = bundled
    end = copy.deepcopy(start)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in end.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    before = weights(start)
    for mix in (0.0, 0.25, 1.0):
        mixed = weights(interpolated(start, end, mix))
        far = {name: (1 - mix) * before[name] + mix * t for name, t in end.state_dict().items()}
        assert all(torch.equal(mixed[name], far[name]) for name in mixed), mix
    assert all(torch.equal(before[n], t) for n, t in start.state_dict().items()), "start is left as it was"


def reply_loss(model: Any, data: list[Example]) -> float:
    """Mean cross-entropy of the reply tokens (the verdict) after each prompt."""
    total = 0.0
    with torch.no_grad():
        for e in data:
            ids = torch.tensor([e.prompt + e.reply])
            labels = torch.full_like(ids, -100)
            labels[0, len(e.prompt) :] = torch.tensor(e.reply)
            total += float(model(input_ids=ids, labels=labels).loss)
    return total / len(data)


def test_the_tie_stage_learns_ties_and_leaves_stage_1_as_it_was(bundled: tuple[Any, Any, Any]) -> None:
    from qualgate.fixtures.corpus import build_corpus, split
    from qualgate.fixtures.judge_branches import branched
    from qualgate.fixtures.judge_pairs import questions
    from qualgate.fixtures.judge_train import greedy_answers

    tokenizer, target, judge = bundled
    qs = questions(split(build_corpus())[1], tokenizer, 8, seed=5)
    greedy = greedy_answers(target, tokenizer, qs)
    rehearsed = examples(tokenizer, [Pair(q.text, g, g[::-1], "shuffled") for q, g in zip(qs, greedy, strict=True)])
    settings = JudgeSettings(batch_size=8)
    stage = TieStage(share=1.0, rehearsal=4, lr=1e-3, warmup=1, mix=0.5)
    ties = examples(
        tokenizer, branched(target, tokenizer, qs, greedy, 1.0, settings.seed + 7, settings.near_tie_margin)
    )
    assert ties and {e.verdict for e in ties} == {"tie"}
    before = weights(judge)
    stage2, mixed = tie_stage(judge, target, tokenizer, qs, greedy, rehearsed, settings, stage)
    assert all(torch.equal(before[n], t) for n, t in judge.state_dict().items()), "stage 1 is left as it was"
    assert reply_loss(stage2, ties) < reply_loss(judge, ties) - 0.1, "the near-ties' tie is learned"
    halfway = weights(interpolated(judge, stage2, 0.5))
    assert all(torch.equal(halfway[n], t) for n, t in mixed.state_dict().items()), "the judge is the mix"


def test_the_card_records_both_stages_of_the_bundled_judge() -> None:
    """The served judge is checked in test_judge_model.py; the card holds what training measured."""
    judge = model_card()["models"]["judge"]
    stage1, final, tie = judge["stage1"]["heldout"], judge["heldout"], judge["tie_stage"]
    assert final["accuracy"] >= 0.9 and final["position_consistency"] >= 0.9, "issue 22's targets"
    assert final["near_ties_tied"] > stage1["near_ties_tied"], "the mix ties more answers of equal standing"
    assert tie["stage2_heldout"]["near_ties_tied"] > final["near_ties_tied"], "the tie stage alone, more"
    assert 0 < tie["mix"] < 1 and tie["share"] > 0
