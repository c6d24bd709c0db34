"""``answer_scores`` (batched, padded, logits only where answers are) vs a plain per-example loop."""

from __future__ import annotations

import math

import pytest
from eval_helpers import ARCHS, loop_scores, tiny_lm

from sftlens.evaluation.generate import PrefixCache, shared_prefix_length
from sftlens.evaluation.teacher_forced import AnswerScores, answer_scores

SHOTS = "Question : how many is 1 + 2 ? Answer : 1 + 2 = 3 . #### 3 " * 3


@pytest.mark.parametrize("arch", ARCHS)
def test_answer_scores_match_a_per_example_loop(arch, tok):
    model = tiny_lm(arch)
    prompts = [
        SHOTS + "Question : how many ? Answer :",
        "Question : 7 ? Answer :",  # much shorter: the batch is padded, the answer starts early
        SHOTS + "Question : how many is the 3 + 4 and 5 ? Answer :",
        SHOTS[:40] + "Question : a ? Answer :",
        "Question : 5 + 5 ? Answer :",
    ]
    targets = [
        " 3 #### 3",
        " 1 + 6 = 7 . #### 7",
        " 12 #### 12",
        " 2 #### 2",
        " 5 + 5 = 10 #### 10",
    ]
    got = answer_scores(model, tok, prompts, targets, batch_size=3)
    want = [loop_scores(model, tok, p, t) for p, t in zip(prompts, targets)]
    for pe, (nll, hits, n) in zip(got.per_example, want):
        assert pe["tokens"] == n
        assert pe["correct"] == hits
        assert pe["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert got.tokens == sum(w[2] for w in want)
    assert got.answer_nll == pytest.approx(sum(w[0] for w in want) / got.tokens, rel=1e-5)
    assert got.answer_token_acc == sum(w[1] for w in want) / got.tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_answer_scores_from_a_shared_prefix_cache(arch, tok):
    model = tiny_lm(arch)
    questions = ["how many ?", "7 ?", "how many is the 3 + 4 and 5 ?", "a ?"]
    prompts = [SHOTS + f"Question : {q} Answer :" for q in questions]
    targets = [" 3 #### 3", " 1 + 6 = 7 . #### 7", " 12 #### 12", " 2 #### 2"]
    ids = [tok(p)["input_ids"] for p in prompts]
    prefix = PrefixCache(model, ids[0][: shared_prefix_length(ids)])
    assert len(prefix) > 40
    got = answer_scores(model, tok, prompts, targets, batch_size=3, prefix=prefix)
    for pe, p, t in zip(got.per_example, prompts, targets):
        nll, hits, n = loop_scores(model, tok, p, t)
        assert (pe["tokens"], pe["correct"]) == (n, hits)
        assert pe["nll_sum"] == pytest.approx(nll, rel=1e-5)
    with pytest.raises(ValueError, match="start with the prefix"):
        answer_scores(model, tok, ["Question : 1 ?"], [" 1"], prefix=prefix)


def test_answer_scores_means_and_rows():
    s = AnswerScores(nll_sum=3.0, correct=1, tokens=4)
    assert (s.answer_nll, s.answer_token_acc) == (0.75, 0.25)
    assert s.rows() == [
        {"layer": None, "metric": "answer_nll", "value": 0.75},
        {"layer": None, "metric": "answer_token_acc", "value": 0.25},
    ]
    empty = AnswerScores()
    assert math.isnan(empty.answer_nll) and math.isnan(empty.answer_token_acc)
