"""Near-tie branches (qualgate/fixtures/judge_branches.py): the pairs the bundled judge learns to tie."""

from __future__ import annotations

import math

import pytest

from qualgate.fixtures.judge_branches import NEAR_TIE, branched, near_tie_positions
from qualgate.fixtures.judge_pairs import ANSWER_TOKENS, Pair, requests


def test_a_near_tie_is_the_answers_own_top_token_with_the_runner_up_close() -> None:
    torch = pytest.importorskip("torch")
    probs = torch.tensor(
        [
            [0.50, 0.45, 0.05],  # answer token 0, runner-up 0.1 nats behind: a near-tie
            [0.90, 0.05, 0.05],  # sure
            [0.45, 0.50, 0.05],  # the answer took the runner-up (sampled, not greedy): not its near-tie
            [0.40, 0.40, 0.20],  # exactly tied
        ]
    )
    assert near_tie_positions(probs.log(), [0, 0, 0, 0], margin=0.5) == [0, 3]
    assert near_tie_positions(probs.log(), [0, 0, 0, 0], margin=math.log(0.5 / 0.45) / 2) == [3]


def test_branches_part_from_the_greedy_answer_at_a_near_tie_and_are_ties_in_both_orders() -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    from qualgate.fixtures import MODELS_DIR
    from qualgate.fixtures.corpus import build_corpus, split
    from qualgate.fixtures.judge_pairs import questions
    from qualgate.fixtures.judge_train import greedy_answers

    tokenizer = AutoTokenizer.from_pretrained(MODELS_DIR / "tokenizer")
    target = LlamaForCausalLM.from_pretrained(MODELS_DIR / "target")
    qs = questions(split(build_corpus())[1], tokenizer, 24, seed=5)
    greedy = greedy_answers(target, tokenizer, qs)
    made = branched(target, tokenizer, qs, greedy, share=1.0, seed=7, margin=0.5)
    assert len(made) >= 12, "most greedy answers of a small model have a near-tie in their first two thirds"
    assert made == branched(target, tokenizer, qs, greedy, share=1.0, seed=7, margin=0.5), "seeded"
    by_question = {q.text: (q, g) for q, g in zip(qs, greedy, strict=True)}
    for pair in made:
        q, g = by_question[pair.question]
        assert pair.kind == NEAR_TIE and pair.good == g and pair.bad != g
        head = [tokenizer.bos_token_id, *tokenizer(q.text, add_special_tokens=False)["input_ids"]]
        mine = tokenizer(g, add_special_tokens=False)["input_ids"]
        theirs = tokenizer(pair.bad, add_special_tokens=False)["input_ids"]
        t = next(n for n, (x, y) in enumerate(zip(mine, theirs, strict=False)) if x != y)
        assert t < 2 * ANSWER_TOKENS // 3 + 1 and len(theirs) <= ANSWER_TOKENS + 2
        with torch.no_grad():
            logits = target(torch.tensor([head + mine[:t]])).logits[0, -1]
        top = torch.log_softmax(logits, -1).topk(2)
        assert top.indices.tolist() == [mine[t], theirs[t]], "the greedy token against the runner-up"
        assert float(top.values[0] - top.values[1]) <= 0.5
    assert [verdict for _, verdict in requests(made[0])] == ["tie", "tie"]
    damaged = Pair(made[0].question, made[0].good, made[0].bad, "quantized")
    assert [verdict for _, verdict in requests(damaged)] == ["A", "B"]


def test_pooled_long_requests_keep_every_example_once_and_pad_less() -> None:
    """--judge-pool-long: a flood is twice a plain request's length, and a batch is padded to its
    longest request; batching the floods among themselves keeps the epoch (every example once, batches
    in shuffled order), keeps the plain batches as mixed as before, and cuts the padding."""
    import random

    from qualgate.fixtures.judge_finetune import Example, JudgeSettings, batches

    rng = random.Random(0)
    data = [
        Example([0] * rng.choice([400, 450, 480, 900]), [1], "A", "", ((0, 0), (0, 0), 0), "", ((0, 0), (0, 0)))
        for _ in range(1000)
    ]

    def padded(bs: list[list[int]]) -> int:
        return sum(len(b) * max(len(data[i].prompt) for i in b) for b in bs)

    plain = batches(data, JudgeSettings(), random.Random(1))
    pooled = batches(data, JudgeSettings(pool_long=True), random.Random(1))
    for bs in (plain, pooled):
        assert sorted(i for b in bs for i in b) == list(range(1000))
    assert all(len({len(data[i].prompt) > 600 for i in b}) == 1 for b in pooled), "floods only with floods"
    assert padded(pooled) < 0.8 * padded(plain)
    assert pooled == batches(data, JudgeSettings(pool_long=True), random.Random(1)), "seeded"
    order = list(range(1000))
    random.Random(1).shuffle(order)
    assert plain == [order[n : n + 16] for n in range(0, 1000, 16)], "off: the batches the bundled judge had"
